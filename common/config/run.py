"""The whole run's configuration: its own keys, its sections, and validation."""

from __future__ import annotations

import difflib
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from typing import Any

from common.config import constraints
from common.config.aggregation import AggregationConfig
from common.config.aggregation_rules import AGGREGATION_RULES
from common.config.codec import CodecConfig
from common.config.data import RULES as DATA_RULES
from common.config.data import DataConfig
from common.config.dp import RULES as DP_RULES
from common.config.dp import DpConfig
from common.config.errors import ConfigError, Refusal
from common.config.head import RULES as HEAD_RULES
from common.config.head import HeadConfig
from common.config.keys import (
    ConfigValue,
    Key,
    at_least,
    build,
    declared_keys,
    key_refusals,
    one_of,
    setting,
    share,
)
from common.config.lora import LoraSettings
from common.config.model import ModelConfig
from common.config.secagg import RULES as SECAGG_RULES
from common.config.secagg import SecAggConfig
from common.config.sim import SimConfig
from common.config.tracking import TrackingConfig
from common.config.train import TrainConfig

#: Who evaluates the global model (``eval.where``): ``auto`` = the coordinator when
#: it holds evaluation rows of its own (and the sites too under a rule with
#: personalised state), else the sites.
EVAL_WHERE = ("auto", "coordinator", "sites", "both")


@dataclass(frozen=True)
class RunConfig:
    """The whole, validated configuration of a run.

    Build it with :meth:`from_flat`; ``flat`` keeps the exact flat mapping for
    ``summary.json`` and for handing the configuration on unchanged.
    ``eval_every`` is ``eval.every``: the global model is evaluated after rounds 0,
    every multiple of it, and the last; ``eval_where`` says who evaluates it, and
    ``eval_fraction`` and ``eval_min_clients`` pick the sites that do.
    """

    num_server_rounds: int = setting(
        "num-server-rounds",
        3,
        "federated rounds",
        check=at_least(1, "must be at least 1"),
        resumable=True,
    )
    seed: int = setting(
        "seed",
        42,
        "seeds the initial adapter, partitions, sampling and batch order",
    )
    model: ModelConfig = field(default_factory=ModelConfig)
    head: HeadConfig = field(default_factory=HeadConfig)
    lora: LoraSettings = field(default_factory=LoraSettings)
    data: DataConfig = field(default_factory=DataConfig)
    sim: SimConfig = field(default_factory=SimConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    aggregation: AggregationConfig = field(default_factory=AggregationConfig)
    codec: CodecConfig = field(default_factory=CodecConfig)
    secagg: SecAggConfig = field(default_factory=SecAggConfig)
    dp: DpConfig = field(default_factory=DpConfig)
    tracking: TrackingConfig = field(default_factory=TrackingConfig)
    eval_every: int = setting(
        "eval.every",
        1,
        "the global model is evaluated every N rounds, and always before the first "
        "round and after the last; other rounds' lines in `metrics.jsonl` leave the "
        "`eval_*` columns empty. Refused above 1 with `dp.target-epsilon` (a budget "
        "may end the run on an unevaluated round)",
        check=at_least(1, "must be at least 1 (every round)"),
        resumable=True,
    )
    eval_where: str = setting(
        "eval.where",
        "auto",
        "who evaluates: `coordinator` (its `data.test-path` or held-out slice), "
        '`sites` (each on its own rows; README, "Federated evaluation") or `both`; '
        "`auto` = the coordinator when it holds data (and the sites too under a "
        "rule with personalised state, `fedsa`), else the sites",
        check=one_of(EVAL_WHERE),
    )
    eval_fraction: float = setting(
        "eval.fraction",
        1.0,
        "share of the nodes that evaluate at the sites",
        check=share(),
        resumable=True,
    )
    eval_min_clients: int = setting(
        "eval.min-clients",
        1,
        "fewer sites in an evaluation leave its `sites_eval_*` columns empty",
        check=at_least(1, "must be at least 1"),
        resumable=True,
    )
    output_dir: str = setting(
        "output.dir",
        "",
        "output folder; empty = `runs/<kind>-<timestamp>`",
        resumable=True,
    )
    resume: bool = setting(
        "resume",
        False,
        "continue the run in `output.dir` from its checkpoint (`fedgraft simulate "
        "--resume DIR` sets it)",
        resumable=True,
    )
    flat: Mapping[str, ConfigValue] = field(default_factory=dict)

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
            key.name: key.coerce(given.get(key.name, key.default)) for key in KEYS
        }
        config: RunConfig = build(cls, values, flat=values)
        for refusal in config.refusals():
            raise refusal.error()
        return config

    def refusals(self) -> Iterator[Refusal]:
        """Each key's own check, then each section's rules, then those across
        sections (:mod:`common.config.constraints`), then the task's own, in that
        order."""
        yield from key_refusals(self)
        for name, rules in SECTION_RULES:
            yield from _applied(rules, getattr(self, name))
        yield from _applied(constraints.RULES, self)
        yield from _applied(constraints.task_rules(self), self)

    @property
    def update_norm_bound(self) -> float:
        """The L2 bound a plain sum holds each delta to (0 = none):
        ``train.max-update-norm``, except where it does not apply. A rule that sends
        each site's factors (FlexLoRA) sends no delta; under adaptive clipping
        without secure aggregation the sites send their deltas whole and the
        coordinator clips each to the round's C, which bounds it instead (a fixed
        bound would reject the large ones)."""
        dp = self.dp
        if AGGREGATION_RULES[self.aggregation.rule].sends_factors or (
            dp.client_level and dp.adaptive_clip and not self.secagg.enabled
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


def _applied(rules: tuple[Any, ...], part: Any) -> Iterator[Refusal]:
    for rule in rules:
        refusal = rule(part)
        if refusal is not None:
            yield refusal


def _check_known(flat: Mapping[str, Any]) -> None:
    unknown = sorted(set(flat) - set(DEFAULTS))
    if not unknown:
        return
    hints = []
    for key in unknown:
        close = difflib.get_close_matches(key, DEFAULTS, n=1)
        hints.append(f"'{key}'" + (f" (did you mean '{close[0]}'?)" if close else ""))
    raise ConfigError(
        "unknown config key(s): "
        + ", ".join(hints)
        + ". Run `fedgraft keys` to list every key with its default."
    )


#: Each section's rules across its own keys, by the attribute of the section.
SECTION_RULES: tuple[tuple[str, tuple[Any, ...]], ...] = (
    ("head", HEAD_RULES),
    ("data", DATA_RULES),
    ("secagg", SECAGG_RULES),
    ("dp", DP_RULES),
)
#: Every declared key, in the order of the dataclass fields.
KEYS: tuple[Key, ...] = tuple(declared_keys(RunConfig))
#: Every known key with its default. The type of the default is the type of the key.
DEFAULTS: dict[str, ConfigValue] = {key.name: key.default for key in KEYS}
#: Keys a resumed run may change; every other key must match the checkpoint's.
RESUMABLE_CHANGES: tuple[str, ...] = tuple(key.name for key in KEYS if key.resumable)
