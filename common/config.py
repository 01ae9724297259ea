"""Run configuration: the one reader of the flat kebab-case keys.

Every setting a user can give lives in :data:`DEFAULTS` under the same flat key that
``[tool.flwr.app.config]`` in pyproject.toml, TOML config files and ``--set`` use.
:meth:`RunConfig.from_flat` is the only function that reads those keys; the rest of
the code base works with the frozen dataclasses below.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

ConfigValue = bool | int | float | str

#: Every known key with its default. The type of the default is the type of the key.
DEFAULTS: dict[str, ConfigValue] = {
    "num-server-rounds": 3,
    "seed": 42,
    "model.name": "minilm",
    "model.task": "text-cls",
    "model.distribute": "auto",
    "model.max-length": 128,
    "model.pooling": "native",
    "model.quantize": "none",
    "head.init": "label-names",
    "head.label-descriptions": "",
    "lora.r": 8,
    "lora.alpha": 16,
    "lora.dropout": 0.05,
    "lora.target-modules": "query,value",
    "lora.layers": 0,
    "data.path": "",
    "data.test-path": "",
    "data.text-column": "text",
    "data.label-column": "label",
    "data.prompt-column": "",
    "data.response-column": "response",
    "data.image-column": "image",
    "data.labels": "",
    "data.partition": "column:domain",
    "data.dirichlet-alpha": 0.5,
    "data.holdout-fraction": 0.2,
    "sim.num-clients": 4,
    "sim.cpus-per-client": 1.0,
    "sim.gpus-per-client": 0.0,
    "sim.local-baseline": True,
    "train.fraction": 1.0,
    "train.min-clients": 1,
    "train.local-epochs": 1,
    "train.max-steps": 0,
    "train.batch-size": 16,
    "train.lr": 0.002,
    "train.weight-decay": 0.0,
    "train.timeout": 600.0,
    "train.max-update-norm": 10.0,
    "train.max-weight": 10000.0,
    "train.mode": "lora",
    "train.lp-rounds": 1,
    "train.head-lr": 0.0,
    "train.lp-lr": 0.0,
    "aggregation": "fedavg",
    "aggregation.trim-fraction": 0.1,
    "fedprox.mu": 0.01,
    "server.lr": 0.0,
    "server.beta1": 0.9,
    "server.beta2": 0.99,
    "server.tau": 0.001,
    "server.momentum": 0.9,
    "codec": "fp32",
    "codec.topk-fraction": 0.05,
    "secagg.enabled": False,
    "secagg.neighbours": 0,
    "secagg.threshold": 0,
    "secagg.clip-norm": 10.0,
    "secagg.max-weight": 10000.0,
    "secagg.timeout": 120.0,
    "dp.enabled": False,
    "dp.level": "client",
    "dp.mode": "central",
    "dp.clip-norm": 1.0,
    "dp.noise-multiplier": 1.0,
    "dp.delta": 1e-5,
    "dp.target-epsilon": 0.0,
    "dp.adaptive-clip": False,
    "dp.target-quantile": 0.5,
    "dp.clip-lr": 0.2,
    "dp.clipped-count-stddev": 0.0,
    "eval.every": 1,
    "output.dir": "",
    "resume": False,
}

#: Keys a resumed run may change; every other key must match the checkpoint's.
RESUMABLE_CHANGES = (
    "num-server-rounds",
    "eval.every",
    "output.dir",
    "resume",
    "train.timeout",
    "secagg.timeout",
    # The accountant is rebuilt from the rounds spent, so a new budget is exact.
    "dp.target-epsilon",
)

PARTITION_KINDS = ("iid", "dirichlet", "column:<name>")
AGGREGATION_RULES = (
    "fedavg",
    "fedprox",
    "fedavgm",
    "fedadam",
    "fedyogi",
    "ffa",
    "fedsa",
    "flexlora",
    "fedavg-per-label",
    "median",
    "trimmed-mean",
)
#: Rules that read each client's update and so cannot run behind secure aggregation.
RULES_NEEDING_INDIVIDUAL_UPDATES = (
    "flexlora",
    "fedavg-per-label",
    "median",
    "trimmed-mean",
)
CODECS = ("fp32", "fp16", "bf16", "int8", "int4", "topk")
#: Rules that treat the LoRA factors specially (pointless without LoRA training).
FACTOR_RULES = ("ffa", "fedsa", "flexlora")
#: Server optimisers and their default server learning rate (``server.lr = 0``).
SERVER_OPTIMISER_LR = {"fedavgm": 1.0, "fedadam": 0.01, "fedyogi": 0.01}
DISTRIBUTE_MODES = ("auto", "never")
POOLING_MODES = ("native", "mean", "cls", "max")
QUANTISATIONS = ("none", "8bit", "4bit")
HEAD_INITS = ("label-names", "random")
#: What is fine-tuned: a text classifier, a causal language model, or an image
#: classifier.
TASKS = ("text-cls", "causal-lm", "image-cls")
TRAIN_MODES = ("lora", "head", "lp-ft")
#: Where DP noise is added: by the coordinator, or split among the clients.
DP_MODES = ("central", "distributed")
#: What DP protects: a whole site (DP-FedAvg) or each of its rows (DP-SGD).
DP_LEVELS = ("client", "sample")


class ConfigError(ValueError):
    """A configuration key is unknown, has the wrong type, or an invalid value."""


def _coerce(key: str, value: Any) -> ConfigValue:
    """Return ``value`` as the type of ``DEFAULTS[key]`` or raise
    :class:`ConfigError`."""
    expected = type(DEFAULTS[key])
    if expected is bool:
        if isinstance(value, bool):
            return value
        if isinstance(value, str) and value.lower() in ("true", "false"):
            return value.lower() == "true"
    elif expected is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        if isinstance(value, str):
            try:
                return int(value)
            except ValueError:
                pass
    elif expected is float:
        number: float | None = None
        if isinstance(value, int | float) and not isinstance(value, bool):
            number = float(value)
        elif isinstance(value, str):
            try:
                number = float(value)
            except ValueError:
                pass
        if number is not None and math.isfinite(number):
            return number
    elif isinstance(value, str):
        return value
    raise ConfigError(
        f"config key '{key}' expects a "
        f"{'finite ' if expected is float else ''}{expected.__name__} "
        f"(default {DEFAULTS[key]!r}) but got {value!r}"
    )


def _check_known(flat: Mapping[str, Any]) -> None:
    unknown = sorted(set(flat) - set(DEFAULTS))
    if unknown:
        import difflib

        hints = []
        for key in unknown:
            close = difflib.get_close_matches(key, DEFAULTS, n=1)
            hints.append(
                f"'{key}'" + (f" (did you mean '{close[0]}'?)" if close else "")
            )
        raise ConfigError(
            "unknown config key(s): "
            + ", ".join(hints)
            + ". Run `fedgraft keys` to list every key with its default."
        )


def _require(condition: bool, key: str, message: str) -> None:
    if not condition:
        raise ConfigError(f"config key '{key}': {message}")


@dataclass(frozen=True)
class ModelConfig:
    """Which backbone to fine-tune and how clients obtain it.

    Attributes
    ----------
    name : str
        ``minilm`` for the packaged all-MiniLM-L6-v2, a local directory, or a hub id.
    distribute : str
        ``auto``: the coordinator sends the weights to a client that lacks them;
        ``never``: such a client fails the round.
    max_length : int
        Token limit per text; longer texts are truncated.
    pooling : str
        ``native``: pool as the backbone was trained (its sentence-transformers
        pooling config; the first token when it has none); or force ``mean``,
        ``cls`` or ``max``.
    quantize : str
        ``none``, or ``4bit`` / ``8bit``: clients load the frozen backbone's linear
        layers quantised by bitsandbytes (QLoRA), on CUDA or a CPU; the adapters and
        the coordinator stay in full precision.
    task : str
        ``text-cls`` (a text classifier: encoder, pooling, linear head),
        ``causal-lm`` (a causal language model, no head; evaluated by perplexity) or
        ``image-cls`` (an image backbone, pooling, linear head).
    """

    name: str
    distribute: str
    max_length: int
    pooling: str
    quantize: str = "none"
    task: str = "text-cls"


@dataclass(frozen=True)
class HeadConfig:
    """How the classification head starts.

    Attributes
    ----------
    init : str
        ``label-names``: rows are the normalised embeddings of the label names (or
        of their descriptions), so round 0 already classifies zero-shot; ``random``:
        small random rows.
    label_descriptions : str
        Optional JSON file mapping each label to the text embedded for it.
    """

    init: str
    label_descriptions: str


@dataclass(frozen=True)
class LoraSettings:
    """LoRA hyper-parameters handed to every client.

    ``layers`` limits the adapters to the top blocks of the backbone's stack of
    blocks (0: every block); a text encoder then also caches the frozen layers'
    output (:mod:`common.frozen_prefix`).
    """

    r: int
    alpha: int
    dropout: float
    target_modules: tuple[str, ...]
    layers: int = 0


@dataclass(frozen=True)
class DataConfig:
    """Where the rows come from and how they are split into clients.

    Attributes
    ----------
    task : str
        ``model.task``: what a row holds. ``text-cls``: a text and a label;
        ``causal-lm``: a text the loss covers (``text_column``, or
        ``response_column`` after the prompt in ``prompt_column``); ``image-cls``:
        an image file (``image_column``, or an image folder) and a label.
    prompt_column : str
        Instruction data (``causal-lm``): the prompt, which conditions the response
        but carries no loss; empty = plain text, every token carries loss.
    response_column : str
        Instruction data: the response, the only tokens that carry loss.
    image_column : str
        ``image-cls`` files: the image path, relative to the listing file.
    """

    path: str
    test_path: str
    text_column: str
    label_column: str
    labels: tuple[str, ...]
    partition: str
    dirichlet_alpha: float
    holdout_fraction: float
    task: str = "text-cls"
    prompt_column: str = ""
    response_column: str = "response"
    image_column: str = "image"

    @property
    def partition_column(self) -> str | None:
        """The column named by ``column:<name>``, or ``None`` for other partitions."""
        if self.partition.startswith("column:"):
            return self.partition.removeprefix("column:")
        return None


@dataclass(frozen=True)
class SimConfig:
    """Local simulation settings (Flower's Simulation Engine)."""

    num_clients: int
    cpus_per_client: float
    gpus_per_client: float
    local_baseline: bool


@dataclass(frozen=True)
class TrainConfig:
    """Round participation and the client's optimiser settings."""

    fraction: float
    min_clients: int
    local_epochs: int
    max_steps: int
    batch_size: int
    lr: float
    weight_decay: float
    timeout: float
    max_update_norm: float
    max_weight: float
    mode: str
    lp_rounds: int
    head_lr: float
    lp_lr: float

    def phase(self, server_round: int) -> str:
        """What round ``server_round`` trains: ``head`` (the backbone and adapters
        frozen) or ``lora`` (adapters and head).

        ``lp-ft`` spends its first ``lp_rounds`` rounds on the head alone (a linear
        probe), then fine-tunes the adapters (Kumar et al., ICLR 2022).
        """
        if self.mode == "head" or (
            self.mode == "lp-ft" and server_round <= self.lp_rounds
        ):
            return "head"
        return "lora"

    def head_lr_in(self, phase: str) -> float:
        """The head's learning rate in a round of ``phase``.

        Head-only rounds use ``lp_lr``; rounds that train the adapters use
        ``head_lr``. A rate of 0 falls back to the next: ``lp_lr`` -> ``head_lr``
        -> ``lr``.
        """
        head_lr = self.head_lr or self.lr
        return (self.lp_lr or head_lr) if phase == "head" else head_lr


@dataclass(frozen=True)
class AggregationConfig:
    """Which rule turns a round's updates into one delta.

    Attributes
    ----------
    rule : str
        One of :data:`AGGREGATION_RULES`.
    trim_fraction : float
        Share cut from each end by ``trimmed-mean``.
    proximal_mu : float
        ``fedprox``: weight ``mu`` of the client's proximal term
        ``mu / 2 * ||theta - theta_global||^2`` (Li et al. 2020).
    server_lr, beta1, beta2, tau, momentum : float
        Server optimisers (Reddi et al. 2021): ``fedavgm`` uses ``server_lr`` and
        ``momentum``; ``fedadam`` and ``fedyogi`` use ``server_lr``, ``beta1``,
        ``beta2`` and ``tau``. ``server_lr = 0`` takes the rule's default from
        :data:`SERVER_OPTIMISER_LR`.
    """

    rule: str
    trim_fraction: float
    proximal_mu: float
    server_lr: float
    beta1: float
    beta2: float
    tau: float
    momentum: float

    @property
    def effective_server_lr(self) -> float:
        """``server_lr``, or the rule's default when it is 0."""
        return self.server_lr or SERVER_OPTIMISER_LR.get(self.rule, 1.0)


@dataclass(frozen=True)
class CodecConfig:
    """How tensors travel.

    Attributes
    ----------
    name : str
        ``fp32`` (lossless), ``fp16``, ``bf16``, ``int8`` (stochastic rounding, one
        scale per tensor), ``int4`` (stochastic rounding, one scale per block of
        128 values; the global adapter then goes down in int8) or ``topk`` (the
        largest values with error feedback; the global adapter then goes down in
        fp32).
    topk_fraction : float
        Share of each tensor's values ``topk`` keeps.
    """

    name: str
    topk_fraction: float

    @property
    def secure_ring_bits(self) -> int:
        """The ring secure aggregation sums in with this codec: 32 bits for
        ``fp32``; 16 for ``fp16``, ``bf16``, ``int8`` and ``int4``, which then
        quantise in the fixed-point encoding itself (a rotated delta, stochastic
        rounding: half of fp32's upload)."""
        return 32 if self.name == "fp32" else 16


@dataclass(frozen=True)
class SecAggConfig:
    """Secure aggregation (SecAgg+) settings.

    Attributes
    ----------
    enabled : bool
        The coordinator learns only the sum of the deltas.
    neighbours : int
        Neighbourhood size k; 0 picks about 2 log2(n).
    threshold : int
        Shares needed to unmask; 0 picks k // 2 + 1. Must exceed k / 2.
    clip_norm : float
        L2 bound of each delta before encoding.
    max_weight : float
        Example counts are divided by this (and capped at it) before encoding.
    timeout : float
        Seconds each key or unmask stage waits for replies.
    """

    enabled: bool
    neighbours: int
    threshold: int
    clip_norm: float
    max_weight: float
    timeout: float


@dataclass(frozen=True)
class DpConfig:
    """Client-level differential privacy (DP-FedAvg, McMahan et al. 2018).

    Attributes
    ----------
    enabled : bool
        Clip every client's delta, weigh clients alike, add Gaussian noise and
        account for epsilon.
    level : str
        ``client``: DP-FedAvg protects each site as a whole (the keys below act on
        its delta); ``sample``: each site trains with DP-SGD (Opacus), protecting
        each of its rows (the keys below act on per-example gradients), and keeps
        its own accountant.
    mode : str
        ``central``: the coordinator adds ``N(0, (sigma C)^2)`` to the sum;
        ``distributed``: each of the ``m`` sampled clients adds
        ``N(0, (sigma C)^2 / m)`` before secure aggregation masks it.
    clip_norm : float
        ``C``, the L2 bound of each client's delta.
    noise_multiplier : float
        ``sigma``: the noise's standard deviation over ``C``.
    delta : float
        The delta epsilon is reported at.
    target_epsilon : float
        Stop before a round that would take epsilon above this; 0 = no budget.
    adaptive_clip : bool
        Adapt ``C`` every round towards the ``target_quantile`` of the clients'
        update norms (Andrew et al. 2021); ``clip_norm`` is then the first round's.
    target_quantile : float
        ``gamma``: the share of clients whose delta should fit within ``C``.
    clip_lr : float
        ``eta_C`` of the geometric update ``C <- C exp(-eta_C (b - gamma))``.
    clipped_count_stddev : float
        ``sigma_b``, the noise on the count of unclipped clients; 0 = ``m / 20``
        for ``m`` clients sampled in the first round.
    """

    enabled: bool
    level: str
    mode: str
    clip_norm: float
    noise_multiplier: float
    delta: float
    target_epsilon: float
    adaptive_clip: bool = False
    target_quantile: float = 0.5
    clip_lr: float = 0.2
    clipped_count_stddev: float = 0.0

    @property
    def client_level(self) -> bool:
        """DP-FedAvg is on: clip, weigh alike and noise each site's delta."""
        return self.enabled and self.level == "client"

    @property
    def sample_level(self) -> bool:
        """DP-SGD is on at every site."""
        return self.enabled and self.level == "sample"


@dataclass(frozen=True)
class RunConfig:
    """The whole, validated configuration of a run.

    Build it with :meth:`from_flat`; ``flat`` keeps the exact flat mapping for
    ``summary.json`` and for handing the configuration on unchanged.
    ``eval_every`` is ``eval.every``: the coordinator evaluates rounds 0, every
    multiple of it, and the last.
    """

    num_server_rounds: int
    seed: int
    model: ModelConfig
    head: HeadConfig
    lora: LoraSettings
    data: DataConfig
    sim: SimConfig
    train: TrainConfig
    aggregation: AggregationConfig
    codec: CodecConfig
    secagg: SecAggConfig
    dp: DpConfig
    output_dir: str
    resume: bool
    flat: Mapping[str, ConfigValue]
    eval_every: int = 1

    @classmethod
    def from_flat(cls, flat: Mapping[str, Any] | None = None) -> RunConfig:
        """Validate a flat kebab-case mapping over :data:`DEFAULTS`.

        Parameters
        ----------
        flat : Mapping[str, Any], optional
            Keys as in ``[tool.flwr.app.config]``; missing keys take their default.

        Returns
        -------
        RunConfig

        Raises
        ------
        ConfigError
            For an unknown key, a value of the wrong type, or an invalid value; the
            message names the key and says what is accepted.
        """
        given = dict(flat or {})
        _check_known(given)
        values = {
            key: _coerce(key, given.get(key, default))
            for key, default in DEFAULTS.items()
        }
        v: dict[str, Any] = values
        targets = tuple(
            t.strip() for t in v["lora.target-modules"].split(",") if t.strip()
        )
        labels = tuple(t.strip() for t in v["data.labels"].split(",") if t.strip())
        config = cls(
            num_server_rounds=v["num-server-rounds"],
            seed=v["seed"],
            model=ModelConfig(
                v["model.name"],
                v["model.distribute"],
                v["model.max-length"],
                v["model.pooling"],
                v["model.quantize"],
                task=v["model.task"],
            ),
            head=HeadConfig(v["head.init"], v["head.label-descriptions"]),
            lora=LoraSettings(
                v["lora.r"],
                v["lora.alpha"],
                v["lora.dropout"],
                targets,
                v["lora.layers"],
            ),
            data=DataConfig(
                path=v["data.path"],
                test_path=v["data.test-path"],
                text_column=v["data.text-column"],
                label_column=v["data.label-column"],
                labels=labels,
                partition=v["data.partition"],
                dirichlet_alpha=v["data.dirichlet-alpha"],
                holdout_fraction=v["data.holdout-fraction"],
                task=v["model.task"],
                prompt_column=v["data.prompt-column"],
                response_column=v["data.response-column"],
                image_column=v["data.image-column"],
            ),
            sim=SimConfig(
                v["sim.num-clients"],
                v["sim.cpus-per-client"],
                v["sim.gpus-per-client"],
                v["sim.local-baseline"],
            ),
            train=TrainConfig(
                fraction=v["train.fraction"],
                min_clients=v["train.min-clients"],
                local_epochs=v["train.local-epochs"],
                max_steps=v["train.max-steps"],
                batch_size=v["train.batch-size"],
                lr=v["train.lr"],
                weight_decay=v["train.weight-decay"],
                timeout=v["train.timeout"],
                max_update_norm=v["train.max-update-norm"],
                max_weight=v["train.max-weight"],
                mode=v["train.mode"],
                lp_rounds=v["train.lp-rounds"],
                head_lr=v["train.head-lr"],
                lp_lr=v["train.lp-lr"],
            ),
            aggregation=AggregationConfig(
                rule=v["aggregation"],
                trim_fraction=v["aggregation.trim-fraction"],
                proximal_mu=v["fedprox.mu"],
                server_lr=v["server.lr"],
                beta1=v["server.beta1"],
                beta2=v["server.beta2"],
                tau=v["server.tau"],
                momentum=v["server.momentum"],
            ),
            codec=CodecConfig(v["codec"], v["codec.topk-fraction"]),
            secagg=SecAggConfig(
                enabled=v["secagg.enabled"],
                neighbours=v["secagg.neighbours"],
                threshold=v["secagg.threshold"],
                clip_norm=v["secagg.clip-norm"],
                max_weight=v["secagg.max-weight"],
                timeout=v["secagg.timeout"],
            ),
            dp=DpConfig(
                enabled=v["dp.enabled"],
                level=v["dp.level"],
                mode=v["dp.mode"],
                clip_norm=v["dp.clip-norm"],
                noise_multiplier=v["dp.noise-multiplier"],
                delta=v["dp.delta"],
                target_epsilon=v["dp.target-epsilon"],
                adaptive_clip=v["dp.adaptive-clip"],
                target_quantile=v["dp.target-quantile"],
                clip_lr=v["dp.clip-lr"],
                clipped_count_stddev=v["dp.clipped-count-stddev"],
            ),
            output_dir=v["output.dir"],
            resume=v["resume"],
            flat=values,
            eval_every=v["eval.every"],
        )
        config._validate()
        return config

    def _validate(self) -> None:
        _require(self.num_server_rounds >= 1, "num-server-rounds", "must be at least 1")
        _require(self.eval_every >= 1, "eval.every", "must be at least 1 (every round)")
        _require(
            self.eval_every == 1 or not (self.dp.enabled and self.dp.target_epsilon),
            "eval.every",
            "a run that dp.target-epsilon may stop early must end on an evaluated "
            "round; set eval.every = 1 with a privacy budget",
        )
        _require(bool(self.model.name), "model.name", "must not be empty; use 'minilm'")
        _require(
            self.model.distribute in DISTRIBUTE_MODES,
            "model.distribute",
            f"must be one of {', '.join(DISTRIBUTE_MODES)}",
        )
        _require(self.model.max_length >= 8, "model.max-length", "must be at least 8")
        _require(
            self.model.quantize in QUANTISATIONS,
            "model.quantize",
            f"got {self.model.quantize!r}; use one of {', '.join(QUANTISATIONS)}",
        )
        _require(
            self.model.pooling in POOLING_MODES,
            "model.pooling",
            f"got {self.model.pooling!r}; use one of {', '.join(POOLING_MODES)}",
        )
        _require(
            self.head.init in HEAD_INITS,
            "head.init",
            f"got {self.head.init!r}; use one of {', '.join(HEAD_INITS)}",
        )
        _require(
            not (self.head.label_descriptions and self.head.init != "label-names"),
            "head.label-descriptions",
            "is only read when head.init = label-names",
        )
        _require(self.lora.r >= 1, "lora.r", "must be a positive rank such as 8")
        _require(self.lora.alpha >= 1, "lora.alpha", "must be positive")
        _require(0.0 <= self.lora.dropout < 1.0, "lora.dropout", "must be in [0, 1)")
        _require(
            self.lora.layers >= 0,
            "lora.layers",
            "must be 0 (adapt every layer) or the number of top layers to adapt",
        )
        _require(
            bool(self.lora.target_modules),
            "lora.target-modules",
            "name at least one module, e.g. 'query,value'",
        )
        partition = self.data.partition
        _require(
            partition in ("iid", "dirichlet")
            or (partition.startswith("column:") and len(partition) > len("column:")),
            "data.partition",
            f"got {partition!r}; use one of {', '.join(PARTITION_KINDS)}",
        )
        _require(self.data.dirichlet_alpha > 0, "data.dirichlet-alpha", "must be > 0")
        _require(
            0.0 < self.data.holdout_fraction < 1.0,
            "data.holdout-fraction",
            "must be in (0, 1)",
        )
        _require(self.sim.num_clients >= 1, "sim.num-clients", "must be at least 1")
        _require(self.sim.cpus_per_client > 0, "sim.cpus-per-client", "must be > 0")
        _require(self.sim.gpus_per_client >= 0, "sim.gpus-per-client", "must be >= 0")
        _require(
            0.0 < self.train.fraction <= 1.0, "train.fraction", "must be in (0, 1]"
        )
        _require(self.train.min_clients >= 1, "train.min-clients", "must be at least 1")
        _require(
            self.train.local_epochs >= 1, "train.local-epochs", "must be at least 1"
        )
        _require(
            self.train.max_steps >= 0, "train.max-steps", "must be >= 0 (0 = no cap)"
        )
        _require(self.train.batch_size >= 1, "train.batch-size", "must be at least 1")
        _require(
            math.isfinite(self.train.lr) and self.train.lr > 0,
            "train.lr",
            "must be > 0",
        )
        _require(self.train.weight_decay >= 0, "train.weight-decay", "must be >= 0")
        _require(self.train.timeout > 0, "train.timeout", "must be > 0 seconds")
        _require(
            self.train.max_update_norm >= 0,
            "train.max-update-norm",
            "must be >= 0 (0 = no bound)",
        )
        _require(
            math.isfinite(self.train.max_weight) and self.train.max_weight >= 1,
            "train.max-weight",
            "must be a finite count >= 1 (a site's largest weight in a plain sum)",
        )
        _require(
            self.train.mode in TRAIN_MODES,
            "train.mode",
            f"got {self.train.mode!r}; use one of {', '.join(TRAIN_MODES)}",
        )
        _require(
            self.train.mode != "lp-ft"
            or 1 <= self.train.lp_rounds < self.num_server_rounds,
            "train.lp-rounds",
            f"with train.mode = lp-ft it must be at least 1 and below "
            f"num-server-rounds ({self.num_server_rounds}), so that both phases run",
        )
        _require(
            self.train.head_lr >= 0, "train.head-lr", "must be >= 0 (0 = train.lr)"
        )
        _require(
            self.train.lp_lr >= 0, "train.lp-lr", "must be >= 0 (0 = train.head-lr)"
        )
        rule = self.aggregation.rule
        _require(
            rule in AGGREGATION_RULES,
            "aggregation",
            f"got {rule!r}; use one of {', '.join(AGGREGATION_RULES)}",
        )
        _require(
            0.0 <= self.aggregation.trim_fraction < 0.5,
            "aggregation.trim-fraction",
            "must be in [0, 0.5)",
        )
        aggregation = self.aggregation
        _require(aggregation.proximal_mu >= 0, "fedprox.mu", "must be >= 0")
        _require(
            aggregation.server_lr >= 0, "server.lr", "must be >= 0 (0 = rule default)"
        )
        for key, value in (
            ("server.beta1", aggregation.beta1),
            ("server.beta2", aggregation.beta2),
            ("server.momentum", aggregation.momentum),
        ):
            _require(0.0 <= value < 1.0, key, "must be in [0, 1)")
        _require(aggregation.tau > 0, "server.tau", "must be > 0")
        _require(
            not (self.train.mode == "head" and rule in FACTOR_RULES),
            "aggregation",
            f"aggregation = {rule} changes how LoRA factors train and travel, but "
            "train.mode = head trains no LoRA factors; use train.mode = lora or lp-ft, "
            "or another rule",
        )
        _require(
            not (self.secagg.enabled and rule in RULES_NEEDING_INDIVIDUAL_UPDATES),
            "aggregation",
            f"aggregation = {rule} needs each client's update, but secure aggregation "
            "(secagg.enabled = true) reveals only their sum; use aggregation = fedavg "
            "or set secagg.enabled = false",
        )
        _require(
            self.codec.name in CODECS,
            "codec",
            f"got {self.codec.name!r}; use one of {', '.join(CODECS)}",
        )
        _require(
            0.0 < self.codec.topk_fraction <= 1.0,
            "codec.topk-fraction",
            "must be in (0, 1]",
        )
        _require(
            not (self.secagg.enabled and self.codec.name == "topk"),
            "codec",
            "codec = topk sends each client's own choice of coordinates, which masks "
            "cannot sum; with secagg.enabled = true use fp32 (32-bit ring) or "
            "fp16, bf16, int8, int4 (16-bit ring: half the upload)",
        )
        _require(
            not (
                self.secagg.enabled
                and self.codec.name != "fp32"
                and self.dp.client_level
            ),
            "codec",
            f"codec = {self.codec.name} sums in a 16-bit ring, whose coarse stochastic "
            "rounding can push a clipped delta past dp.clip-norm (the noise is "
            "calibrated to it) and has no headroom for distributed noise; use "
            "codec = fp32 with client-level DP behind secure aggregation",
        )
        _require(
            not (rule == "flexlora" and self.codec.name in ("topk", "int4")),
            "codec",
            "aggregation = flexlora reads each site's rank from the shape of its LoRA "
            f"factors, which codec = {self.codec.name} flattens; use a codec that "
            "keeps shapes (fp32, fp16, bf16, int8)",
        )
        secagg = self.secagg
        _require(
            secagg.neighbours >= 0,
            "secagg.neighbours",
            "must be >= 0 (0 = about 2 log2 n)",
        )
        _require(
            secagg.threshold >= 0, "secagg.threshold", "must be >= 0 (0 = k // 2 + 1)"
        )
        _require(
            not (secagg.neighbours and secagg.threshold)
            or secagg.neighbours / 2 < secagg.threshold <= secagg.neighbours,
            "secagg.threshold",
            "must be above secagg.neighbours / 2 and at most secagg.neighbours "
            f"({secagg.neighbours})",
        )
        _require(secagg.clip_norm > 0, "secagg.clip-norm", "must be > 0")
        _require(secagg.max_weight >= 1, "secagg.max-weight", "must be >= 1")
        _require(secagg.timeout > 0, "secagg.timeout", "must be > 0 seconds")
        self._validate_dp()
        self._validate_task()

    def _validate_task(self) -> None:
        """Refuse settings that have no meaning for ``model.task``, naming the key.

        ``lora.layers``, ``model.quantize`` and ``dp.level = sample`` hold for every
        task. What depends on the backbone is refused where it loads: ``lora.layers``
        beyond its blocks (``common.lora_targets``), ``model.quantize`` for a
        backbone without linear layers such as a ResNet (``common.quantised``). The
        frozen-prefix cache below the top ``lora.layers`` is the text classifier's
        alone; the other tasks just place their adapters on the top blocks.
        """
        task = self.model.task
        _require(
            task in TASKS, "model.task", f"got {task!r}; use one of {', '.join(TASKS)}"
        )
        data = self.data
        _require(
            task == "causal-lm" or not data.prompt_column,
            "data.prompt-column",
            f"is read only with model.task = causal-lm (instruction data); "
            f"model.task = {task} reads data.text-column or data.image-column",
        )
        if task == "text-cls":
            return
        if task == "image-cls":
            _require(
                self.head.init == "random",
                "head.init",
                "head.init = label-names embeds the label names with a text encoder, "
                "which an image backbone does not have; set head.init = random for "
                "model.task = image-cls",
            )
            _require(
                bool(data.path),
                "data.path",
                "model.task = image-cls needs images: an image folder (one sub-folder "
                "per class) or a .csv/.jsonl file listing image paths and labels",
            )
            _require(
                self.aggregation.rule != "flexlora",
                "aggregation",
                "aggregation = flexlora refactorises 2-D LoRA factors, but an image "
                "backbone's adapters may sit on convolutions (4-D factors); use "
                "another rule with model.task = image-cls",
            )
            return
        # causal-lm: no classification head and no labels.
        refusals = (
            (
                self.model.pooling == "native",
                "model.pooling",
                "a causal language model pools nothing; leave model.pooling = native",
            ),
            (
                not self.head.label_descriptions,
                "head.label-descriptions",
                "a causal language model has no classification head",
            ),
            (
                self.train.mode == "lora",
                "train.mode",
                f"train.mode = {self.train.mode} trains a classification head, which "
                "a causal language model does not have; use train.mode = lora",
            ),
            (
                self.aggregation.rule != "fedavg-per-label",
                "aggregation",
                "fedavg-per-label averages head rows per label, but a causal language "
                "model has neither; use fedavg or another rule",
            ),
            (
                data.partition != "dirichlet",
                "data.partition",
                "dirichlet skews labels, but causal language model rows have none; use "
                "iid or column:<name>",
            ),
            (
                not data.labels,
                "data.labels",
                "a causal language model has no label map; leave data.labels empty",
            ),
            (
                not data.prompt_column or bool(data.path),
                "data.prompt-column",
                "instruction data needs data.path (the built-in demo corpus is plain "
                "text); set data.path or leave data.prompt-column empty",
            ),
            (
                not data.prompt_column or bool(data.response_column),
                "data.response-column",
                "name the response column of the instruction data",
            ),
        )
        for condition, key, message in refusals:
            _require(condition, key, f"{message} (model.task = causal-lm)")

    def _validate_dp(self) -> None:
        dp = self.dp
        _require(
            dp.level in DP_LEVELS,
            "dp.level",
            f"got {dp.level!r}; use one of {', '.join(DP_LEVELS)}",
        )
        _require(
            dp.mode in DP_MODES,
            "dp.mode",
            f"got {dp.mode!r}; use one of {', '.join(DP_MODES)}",
        )
        _require(dp.clip_norm > 0, "dp.clip-norm", "must be > 0, e.g. 1.0")
        _require(
            dp.noise_multiplier > 0, "dp.noise-multiplier", "must be > 0, e.g. 1.0"
        )
        _require(0.0 < dp.delta < 1.0, "dp.delta", "must be in (0, 1), e.g. 1e-5")
        _require(
            dp.target_epsilon >= 0, "dp.target-epsilon", "must be >= 0 (0 = no budget)"
        )
        _require(
            0.0 <= dp.target_quantile <= 1.0,
            "dp.target-quantile",
            "must be in [0, 1], e.g. 0.5 (the median norm)",
        )
        _require(dp.clip_lr > 0, "dp.clip-lr", "must be > 0, e.g. 0.2")
        _require(
            dp.clipped_count_stddev >= 0,
            "dp.clipped-count-stddev",
            "must be >= 0 (0 = the clients sampled per round / 20)",
        )
        _require(
            dp.enabled or not dp.adaptive_clip,
            "dp.adaptive-clip",
            "adapts the clip norm of client-level DP, which is off; set "
            "dp.enabled = true or dp.adaptive-clip = false",
        )
        if not dp.enabled:
            return
        if dp.level == "sample":
            _require(
                not dp.adaptive_clip,
                "dp.adaptive-clip",
                "adapts the clip norm of client-level DP; with dp.level = sample "
                "the per-example clip norm stays dp.clip-norm, so set "
                "dp.adaptive-clip = false",
            )
            self._validate_dp_sgd()
            return
        # Andrew et al. 2021, Thm 1: the delta's noise multiplier is raised to
        # (z^-2 - (2 sigma_b)^-2)^-1/2, finite only when 2 sigma_b > z. The default
        # sigma_b = m / 20 depends on the round's sample: checked at the first round.
        _require(
            not dp.adaptive_clip
            or dp.clipped_count_stddev == 0
            or 2 * dp.clipped_count_stddev > dp.noise_multiplier,
            "dp.clipped-count-stddev",
            f"must be above dp.noise-multiplier / 2 = {dp.noise_multiplier / 2:g} "
            f"(got {dp.clipped_count_stddev:g}) with dp.adaptive-clip = true, or "
            "the count of unclipped clients alone would spend the whole "
            "dp.noise-multiplier budget; raise it or lower dp.noise-multiplier",
        )
        rule = self.aggregation.rule
        _require(
            rule not in RULES_NEEDING_INDIVIDUAL_UPDATES,
            "aggregation",
            f"aggregation = {rule} reads each client's update, but dp.enabled = true "
            "bounds and noises only their sum; use a mean-based rule (fedavg, fedprox, "
            "fedavgm, fedadam, fedyogi, ffa, fedsa) or set dp.enabled = false",
        )
        _require(
            dp.mode != "distributed" or self.secagg.enabled,
            "dp.mode",
            "dp.mode = distributed splits the noise among the clients, so each "
            "client's own share is too small to hide its update from a coordinator "
            "that sees it alone; set secagg.enabled = true, or use dp.mode = central",
        )
        _require(
            not self.secagg.enabled or self.secagg.clip_norm >= dp.clip_norm,
            "secagg.clip-norm",
            f"must be at least dp.clip-norm = {dp.clip_norm:g} (got "
            f"{self.secagg.clip_norm:g}), or secure aggregation would clip the DP "
            "updates again; set secagg.clip-norm to dp.clip-norm",
        )

    def _validate_dp_sgd(self) -> None:
        rule = self.aggregation.rule
        _require(
            self.train.mode == "lora",
            "train.mode",
            f"dp.level = sample runs DP-SGD end to end, but train.mode = "
            f"{self.train.mode} trains the head on cached features; use "
            "train.mode = lora",
        )
        _require(
            rule not in ("fedprox", "fedavg-per-label"),
            "aggregation",
            f"aggregation = {rule} does not fit dp.level = sample ("
            + (
                "its proximal term has no per-example gradient"
                if rule == "fedprox"
                else "its label counts leave the site without noise"
            )
            + "); use another rule or dp.level = client",
        )
        _require(
            self.dp.target_epsilon == 0,
            "dp.target-epsilon",
            "with dp.level = sample each site keeps its own account (reported as "
            "sample_epsilon_max); the coordinator's budget stop needs dp.level = "
            "client, so set dp.target-epsilon = 0",
        )

    @property
    def update_norm_bound(self) -> float:
        """The L2 bound a plain sum holds each delta to (0 = none):
        ``train.max-update-norm``, except where it does not apply. FlexLoRA sends
        each site's factors, not a delta; under adaptive clipping without secure
        aggregation the sites send their deltas whole and the coordinator clips each
        to the round's C, which bounds it instead (a fixed bound would reject the
        large ones)."""
        if self.aggregation.rule == "flexlora" or (
            self.dp.client_level and self.dp.adaptive_clip and not self.secagg.enabled
        ):
            return 0.0
        return self.train.max_update_norm

    def check_resumable_from(self, saved: Mapping[str, Any]) -> None:
        """Refuse to resume a checkpoint written under different settings.

        Raises
        ------
        ConfigError
            Naming every key whose value differs from the checkpoint's.
        """
        changed = [
            f"{key} ({saved.get(key)!r} -> {value!r})"
            for key, value in self.flat.items()
            if key not in RESUMABLE_CHANGES and saved.get(key, DEFAULTS[key]) != value
        ]
        if changed:
            raise ConfigError(
                "cannot resume: the checkpoint was written with other settings: "
                + ", ".join(changed)
                + f"; only {', '.join(RESUMABLE_CHANGES)} may change"
            )

    def with_overrides(self, **flat: ConfigValue) -> RunConfig:
        """Return a new validated config with some flat keys replaced."""
        return RunConfig.from_flat({**self.flat, **flat})

    def as_dict(self) -> dict[str, Any]:
        """The flat mapping as a plain dict (for JSON)."""
        return dict(self.flat)


def parse_assignment(text: str) -> tuple[str, str]:
    """Split a ``key=value`` override as given to ``--set``.

    Raises
    ------
    ConfigError
        When ``text`` has no ``=`` or an empty key.
    """
    key, sep, value = text.partition("=")
    if not sep or not key.strip():
        raise ConfigError(f"override {text!r} must look like key=value, e.g. lora.r=16")
    return key.strip(), value.strip().strip('"')


__all__ = [
    "AGGREGATION_RULES",
    "DEFAULTS",
    "RULES_NEEDING_INDIVIDUAL_UPDATES",
    "AggregationConfig",
    "CodecConfig",
    "ConfigError",
    "DpConfig",
    "DataConfig",
    "HeadConfig",
    "LoraSettings",
    "ModelConfig",
    "RunConfig",
    "SecAggConfig",
    "SimConfig",
    "TASKS",
    "TrainConfig",
    "parse_assignment",
]
