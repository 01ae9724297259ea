"""The transfer recipe: pooling choice, label-name head, head-only and lp-ft training,
cached features, and how each reaches the federation, the baselines and the export."""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from transformers import AutoTokenizer, PreTrainedTokenizerBase

from client.finetune import LocalTraining, finetune, train_head, train_phase
from common import keys
from common.backbone import pooling_mode
from common.batching import Encoded, encode
from common.codec import apply_delta
from common.config import ConfigError, LoraSettings, RunConfig
from common.data import Example
from common.evaluation import evaluate_head
from common.feature_cache import FeatureCache
from common.sharing import encoder_digest, shared_subset
from common.tasks.text_classification.bench import Workbench
from common.tasks.text_classification.evaluation import evaluate
from common.tasks.text_classification.features import pooled_features
from common.tasks.text_classification.label_head import (
    LOGIT_SCALE,
    LabelDescriptionError,
    humanise,
    init_head_from_texts,
    label_texts,
)
from common.tasks.text_classification.model import (
    HEAD_PREFIX,
    TextClassifier,
    adapter_state,
    attach_lora,
    load_adapter_state,
    load_encoder,
)
from common.wire import from_array_record
from simulations.inprocess_grid import Tamper
from tests.conftest import InProcessGrid, build_tiny_backbone, write_jsonl

LORA = LoraSettings(r=4, alpha=8, dropout=0.0, target_modules=("query", "value"))
#: Label texts made of words in the tiny vocabulary (unknown words would all be [UNK]).
LABEL_TEXTS = ["send money", "book flight", "lights on", "recipe cook"]
TEXTS = [
    "please send money to my savings account now",
    "book flight",
    "lights on",
    "how much is in the balance of my account",
    "recipe",
    "cook food today",
]


def classifier(
    backbone: Path, num_labels: int = 4, pooling: str = "mean", seed: int = 0
) -> TextClassifier:
    """A freshly seeded classifier on ``backbone`` (LoRA B is zero)."""
    model = attach_lora(load_encoder(backbone), LORA, pooling, num_labels, seed)
    model.eval()
    return model


@pytest.fixture(scope="module")
def backbone(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The conftest's tiny mean-pooling BERT, built once for this module."""
    return build_tiny_backbone(tmp_path_factory.mktemp("worded-backbone"))


@pytest.fixture(scope="module")
def tokenizer(backbone: Path) -> PreTrainedTokenizerBase:
    return AutoTokenizer.from_pretrained(str(backbone))


def encoded_texts(
    tokenizer: PreTrainedTokenizerBase, texts: list[str], labels: list[int]
) -> Encoded:
    return encode(tokenizer, texts, labels, 32)


def lora_part(state: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    return {k: v for k, v in state.items() if not k.startswith(HEAD_PREFIX)}


def head_part(state: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    return {k: v for k, v in state.items() if k.startswith(HEAD_PREFIX)}


def same_arrays(a: dict[str, np.ndarray], b: dict[str, np.ndarray]) -> bool:
    return a.keys() == b.keys() and all(np.array_equal(a[k], b[k]) for k in a)


def perturbed_lora(model: TextClassifier, seed: int = 1) -> dict[str, np.ndarray]:
    """The model's state with every LoRA B set to noise, so the adapters matter."""
    rng = np.random.default_rng(seed)
    state = adapter_state(model)
    for name in state:
        if "lora_B" in name:
            state[name] = rng.normal(0, 0.5, state[name].shape).astype(np.float32)
    return state


def plan(**changes: Any) -> LocalTraining:
    settings: dict[str, Any] = {
        "epochs": 1,
        "max_steps": 0,
        "batch_size": 4,
        "lr": 0.01,
        "head_lr": 0.01,
        "weight_decay": 0.0,
        "seed": 0,
    }
    return LocalTraining(**{**settings, **changes})


def test_the_backbone_tokenizer_knows_the_label_words(
    tokenizer: PreTrainedTokenizerBase,
) -> None:
    ids = tokenizer(LABEL_TEXTS)["input_ids"]
    assert tokenizer.unk_token_id not in {i for row in ids for i in row}
    assert len({tuple(row) for row in ids}) == len(LABEL_TEXTS)


# -- configuration ---------------------------------------------------------------------


@pytest.mark.parametrize(
    ("flat", "key"),
    [
        ({"model.pooling": "average"}, "model.pooling"),
        ({"head.init": "zeros"}, "head.init"),
        ({"train.mode": "full"}, "train.mode"),
        (
            {"train.mode": "lp-ft", "num-server-rounds": 2, "train.lp-rounds": 2},
            "train.lp-rounds",
        ),
        (
            {"train.mode": "lp-ft", "num-server-rounds": 3, "train.lp-rounds": 0},
            "train.lp-rounds",
        ),
        ({"train.head-lr": -0.1}, "train.head-lr"),
        ({"train.lp-lr": -0.1}, "train.lp-lr"),
        (
            {"head.init": "random", "head.label-descriptions": "labels.json"},
            "head.label-descriptions",
        ),
    ],
)
def test_an_invalid_transfer_setting_is_refused_naming_its_key(
    flat: dict[str, object], key: str
) -> None:
    with pytest.raises(ConfigError, match=f"config key '{key}'"):
        RunConfig.from_flat(flat)


def test_lp_rounds_are_only_checked_against_the_round_count_in_lp_ft() -> None:
    config = RunConfig.from_flat(
        {"train.mode": "lora", "num-server-rounds": 2, "train.lp-rounds": 5}
    )
    assert config.train.lp_rounds == 5


@pytest.mark.parametrize(
    ("mode", "lp_rounds", "phases"),
    [
        ("lora", 1, ["lora", "lora", "lora", "lora"]),
        ("head", 1, ["head", "head", "head", "head"]),
        ("lp-ft", 1, ["head", "lora", "lora", "lora"]),
        ("lp-ft", 3, ["head", "head", "head", "lora"]),
    ],
)
def test_each_round_trains_the_phase_its_mode_says(
    mode: str, lp_rounds: int, phases: list[str]
) -> None:
    train = RunConfig.from_flat(
        {"train.mode": mode, "train.lp-rounds": lp_rounds, "num-server-rounds": 4}
    ).train
    assert [train.phase(r) for r in range(1, 5)] == phases


def test_the_head_learning_rate_falls_back_to_the_adapters_rate() -> None:
    default = RunConfig.from_flat({"train.lr": 0.003}).train
    own = RunConfig.from_flat({"train.lr": 0.003, "train.head-lr": 0.05}).train
    probe_config = RunConfig.from_flat(
        {"train.lr": 0.003, "train.head-lr": 0.05, "train.lp-lr": 0.5}
    )
    probe = probe_config.train
    assert [default.head_lr_in(p) for p in ("head", "lora")] == [0.003, 0.003]
    assert [own.head_lr_in(p) for p in ("head", "lora")] == [0.05, 0.05]
    assert [probe.head_lr_in(p) for p in ("head", "lora")] == [0.5, 0.05]
    head_plan = LocalTraining.from_config(probe_config, "head", seed=1)
    lora_plan = LocalTraining.from_config(probe_config, "lora", seed=1, epochs=0.5)
    assert (head_plan.lr, head_plan.head_lr, head_plan.seed) == (0.003, 0.5, 1)
    assert (lora_plan.head_lr, lora_plan.epochs) == (0.05, 0.5)


# -- label texts -----------------------------------------------------------------------


def test_label_names_become_words() -> None:
    assert humanise("book_flight") == "book flight"
    assert humanise("lost-luggage") == "lost luggage"
    assert humanise("__cook--now_") == "cook now"
    assert label_texts(("send_money", "book-flight")) == ["send money", "book flight"]


def test_descriptions_override_some_labels_and_the_rest_use_their_names(
    tmp_path: Path,
) -> None:
    descriptions = tmp_path / "labels.json"
    descriptions.write_text(json.dumps({"send_money": "transfer a payment"}))
    texts = label_texts(("send_money", "book_flight"), str(descriptions))
    assert texts == ["transfer a payment", "book flight"]


def test_a_missing_description_file_is_named(tmp_path: Path) -> None:
    missing = tmp_path / "absent.json"
    with pytest.raises(LabelDescriptionError, match=f"{missing}.*not found"):
        label_texts(("a",), str(missing))


def test_invalid_description_json_names_file_and_line(tmp_path: Path) -> None:
    broken = tmp_path / "labels.json"
    broken.write_text('{\n  "a": "first",\n  oops\n}\n')
    with pytest.raises(LabelDescriptionError, match=f"{broken}: line 3"):
        label_texts(("a",), str(broken))


def test_a_description_of_an_unknown_label_is_refused(tmp_path: Path) -> None:
    extra = tmp_path / "labels.json"
    extra.write_text(json.dumps({"a": "first", "mystery": "who"}))
    with pytest.raises(LabelDescriptionError, match=f"{extra}.*mystery"):
        label_texts(("a", "b"), str(extra))


# -- the label-name head ---------------------------------------------------------------


def test_the_label_name_head_ranks_labels_by_cosine_similarity(
    backbone: Path, tokenizer: PreTrainedTokenizerBase
) -> None:
    # Prepare
    model = classifier(backbone, num_labels=len(LABEL_TEXTS))
    pad = tokenizer.pad_token_id

    # Execute
    init_head_from_texts(model, tokenizer, LABEL_TEXTS, 32, pad)

    # Assert
    label_features = pooled_features(
        model, encoded_texts(tokenizer, LABEL_TEXTS, [0] * 4), pad
    )
    texts = TEXTS + LABEL_TEXTS
    features = pooled_features(
        model, encoded_texts(tokenizer, texts, [0] * len(texts)), pad
    )
    cosine = torch.nn.functional.cosine_similarity(
        features[:, None, :], label_features[None, :, :], dim=-1
    )  # (texts, labels)
    logits = model.head(features)
    assert torch.equal(logits.argmax(-1), cosine.argmax(-1))
    assert torch.equal(model.head.bias, torch.zeros(len(LABEL_TEXTS)))
    # A label's own text is that label, scored LOGIT_SCALE * |e_k| / mean |e|.
    own = logits[len(TEXTS) :]
    assert own.argmax(-1).tolist() == list(range(len(LABEL_TEXTS)))
    norms = label_features.norm(dim=1)
    torch.testing.assert_close(own.diagonal(), LOGIT_SCALE * norms / norms.mean())


def test_the_label_name_head_needs_one_text_per_label(
    backbone: Path, tokenizer: PreTrainedTokenizerBase
) -> None:
    model = classifier(backbone, num_labels=3)
    with pytest.raises(ValueError, match="2 label texts for a head of 3 rows"):
        init_head_from_texts(model, tokenizer, LABEL_TEXTS[:2], 32, 0)


# -- pooled features and their cache ---------------------------------------------------


@pytest.mark.parametrize("pooling", ["mean", "max", "cls"])
def test_pooled_features_are_the_embeddings_of_each_row_in_row_order(
    pooling: str, backbone: Path, tokenizer: PreTrainedTokenizerBase
) -> None:
    # Prepare: rows of mixed lengths, batched in length order across several batches
    model = classifier(backbone, pooling=pooling)
    load_adapter_state(model, perturbed_lora(model))
    encoded = encoded_texts(tokenizer, TEXTS, [0] * len(TEXTS))
    model.train()

    # Execute
    features = pooled_features(model, encoded, tokenizer.pad_token_id, batch_size=2)

    # Assert
    assert model.training, "the caller's training mode is restored"
    model.eval()
    with torch.no_grad():
        for row, ids in enumerate(encoded.ids):
            one = torch.tensor([ids])
            expected = model.embed(one, torch.ones_like(one))[0]
            torch.testing.assert_close(features[row], expected, rtol=1e-4, atol=1e-5)


def test_the_feature_cache_recomputes_only_for_a_new_digest_or_rows() -> None:
    # Prepare
    calls: list[str] = []

    def compute(tag: str) -> Callable[[], torch.Tensor]:
        def run() -> torch.Tensor:
            calls.append(tag)
            return torch.full((2, 3), float(len(calls)))

        return run

    cache = FeatureCache(capacity=2)

    # Execute
    first = cache.get("test", "digest-1", compute("a"))
    again = cache.get("test", "digest-1", compute("b"))
    changed = cache.get("test", "digest-2", compute("c"))
    other_rows = cache.get("train", "digest-2", compute("d"))
    evicted = cache.get("test", "digest-1", compute("e"))

    # Assert
    assert again is first and calls == ["a", "c", "d", "e"]
    assert not torch.equal(changed, first) and not torch.equal(other_rows, changed)
    assert not torch.equal(evicted, first) and len(cache) == 2


def test_the_encoder_digest_ignores_the_head_but_not_the_adapters(
    backbone: Path,
) -> None:
    state = adapter_state(classifier(backbone))
    new_head = {**state, "head.weight": state["head.weight"] + 1.0}
    name = next(k for k in state if "lora_A" in k)
    new_lora = {**state, name: state[name] + np.float32(1e-3)}
    assert encoder_digest(new_head) == encoder_digest(state)
    assert encoder_digest(new_lora) != encoder_digest(state)


# -- training the head and the adapters ------------------------------------------------


def test_train_head_lowers_the_loss_and_changes_only_the_head(
    backbone: Path, tokenizer: PreTrainedTokenizerBase
) -> None:
    # Prepare
    model = classifier(backbone, num_labels=2)
    load_adapter_state(model, perturbed_lora(model))
    before = adapter_state(model)
    encoded = encoded_texts(
        tokenizer, ["good great love", "bad awful hate"] * 8, [0, 1] * 8
    )
    features = pooled_features(model, encoded, tokenizer.pad_token_id)
    loss_before = evaluate_head(model.head, features, encoded.labels).loss

    # Execute
    result = train_head(
        model.head, features, encoded.labels, plan(epochs=20, head_lr=0.05)
    )

    # Assert
    after = adapter_state(model)
    assert evaluate_head(model.head, features, encoded.labels).loss < loss_before
    assert same_arrays(lora_part(after), lora_part(before))
    assert not np.array_equal(after["head.weight"], before["head.weight"])
    assert (result.samples, result.num_examples) == (320, 16)


def test_train_phase_head_reads_the_given_features_and_lora_fine_tunes(
    backbone: Path, tokenizer: PreTrainedTokenizerBase
) -> None:
    # Prepare
    model = classifier(backbone, num_labels=2)
    encoded = encoded_texts(tokenizer, ["good film", "bad film"] * 4, [0, 1] * 4)
    pad = tokenizer.pad_token_id
    features = pooled_features(model, encoded, pad)
    asked: list[str] = []

    def features_for(phase: str) -> Callable[[], torch.Tensor]:
        return lambda: asked.append(phase) or features  # type: ignore[func-returns-value]

    before = adapter_state(model)

    # Execute
    train_phase(model, encoded, pad, plan(), "head", features_for("head"))
    after_head = adapter_state(model)
    train_phase(model, encoded, pad, plan(), "lora", features_for("lora"))
    after_lora = adapter_state(model)

    # Assert
    assert asked == ["head"]
    assert same_arrays(lora_part(after_head), lora_part(before))
    assert not same_arrays(head_part(after_head), head_part(before))
    assert not same_arrays(lora_part(after_lora), lora_part(after_head))


@pytest.mark.parametrize(
    ("lr", "head_lr", "moves"), [(0.01, 0.0, "lora"), (0.0, 0.01, "head")]
)
def test_finetune_trains_adapters_and_head_at_their_own_rates(
    lr: float,
    head_lr: float,
    moves: str,
    backbone: Path,
    tokenizer: PreTrainedTokenizerBase,
) -> None:
    # Prepare
    model = classifier(backbone, num_labels=2)
    encoded = encoded_texts(tokenizer, ["good film", "bad film"] * 4, [0, 1] * 4)
    before = adapter_state(model)

    # Execute
    finetune(model, encoded, tokenizer.pad_token_id, plan(lr=lr, head_lr=head_lr))

    # Assert: a rate of 0 leaves its group bit-identical, the other group moves
    after = adapter_state(model)
    lora_same = same_arrays(lora_part(after), lora_part(before))
    head_same = same_arrays(head_part(after), head_part(before))
    assert (lora_same, head_same) == (
        (False, True) if moves == "lora" else (True, False)
    )


# -- what travels ----------------------------------------------------------------------


def test_a_head_round_trains_the_head_tensors_alone(backbone: Path) -> None:
    state = adapter_state(classifier(backbone))
    assert set(shared_subset(state, "head", "fedavg")) == {"head.weight", "head.bias"}
    assert same_arrays(shared_subset(state, "lora", "fedavg"), state)
    with pytest.raises(ValueError, match="unknown training phase 'probe'"):
        shared_subset(state, "probe", "fedavg")


def test_a_partial_delta_leaves_the_other_tensors_bit_identical(
    backbone: Path,
) -> None:
    # Prepare
    state = perturbed_lora(classifier(backbone))
    change = {k: np.full_like(v, 0.25) for k, v in head_part(state).items()}

    # Execute
    updated = apply_delta(state, change, scale=2.0)

    # Assert
    assert updated.keys() == state.keys()
    assert same_arrays(lora_part(updated), lora_part(state))
    for name in change:
        np.testing.assert_array_equal(updated[name], state[name] + np.float32(0.5))


# -- the workbench ---------------------------------------------------------------------


LABELS = ("send", "balance", "flight", "hotel")


def bench_config(backbone: Path, **overrides: object) -> RunConfig:
    return RunConfig.from_flat(
        {"model.name": str(backbone), "lora.r": 4, "lora.dropout": 0.0, **overrides}
    )


def open_bench(
    backbone: Path, examples: list[Example], **overrides: object
) -> Workbench:
    return Workbench.open(bench_config(backbone, **overrides), LABELS, examples)


def test_the_workbench_starts_the_head_from_the_label_names(
    backbone: Path, tmp_path: Path
) -> None:
    # Prepare: each label's own name (or description) as a test row
    descriptions = tmp_path / "labels.json"
    descriptions.write_text(json.dumps({"hotel": "book hotel room"}))
    named = [Example(label, label) for label in LABELS]
    described = [*named[:3], Example("book hotel room", "hotel")]

    # Execute
    by_name = open_bench(backbone, named)
    by_description = open_bench(
        backbone, described, **{"head.label-descriptions": str(descriptions)}
    )
    random = open_bench(backbone, named, **{"head.init": "random"})

    # Assert
    assert by_name.evaluate().accuracy == 1.0
    assert by_description.evaluate().accuracy == 1.0
    assert not torch.equal(by_description.model.head.weight, by_name.model.head.weight)
    assert random.model.head.weight.std().item() < 0.05
    assert by_name.model.head.weight.norm(dim=1).min().item() > 1.0


@pytest.mark.parametrize(("pooling", "expected"), [("native", "mean"), ("max", "max")])
def test_the_workbench_pools_as_model_pooling_says(
    pooling: str, expected: str, backbone: Path
) -> None:
    bench = open_bench(
        backbone, [Example("send", "send")], **{"model.pooling": pooling}
    )
    assert bench.pooling == bench.model.pooling == expected


def test_workbench_evaluation_reuses_features_only_while_the_adapters_are_unchanged(
    backbone: Path,
) -> None:
    # Prepare
    examples = [Example(text, LABELS[i % 4]) for i, text in enumerate(TEXTS)]
    bench = open_bench(backbone, examples)
    start = bench.state()
    bench.evaluate(start)
    rng = np.random.default_rng(0)
    new_head = {
        **start,
        "head.weight": rng.normal(size=start["head.weight"].shape).astype(np.float32),
    }

    # Execute
    cached = bench.evaluate(new_head)
    uncached = evaluate(bench.model, bench.test, bench.pad_id)
    new_lora = perturbed_lora(bench.model)
    after_lora = bench.evaluate(new_lora)
    after_lora_uncached = evaluate(bench.model, bench.test, bench.pad_id)

    # Assert
    assert len(bench.features) == 2, "one feature matrix per adapter state"
    assert cached.loss == pytest.approx(uncached.loss, rel=1e-5)
    assert cached.accuracy == uncached.accuracy
    assert after_lora.loss == pytest.approx(after_lora_uncached.loss, rel=1e-5)
    assert after_lora.loss != pytest.approx(cached.loss, rel=1e-3)


# -- the federation --------------------------------------------------------------------


NODES = (101, 202)


def federate(
    backbone: Path,
    data: Path,
    output: Path,
    tamper: Tamper | None = None,
    **overrides: object,
) -> tuple[InProcessGrid, list[dict[str, Any]], dict[str, np.ndarray]]:
    """Run the coordinator over two in-process clients; returns the grid, the
    metrics lines and the final global adapter."""
    from client.client_app import app as client_app
    from server.checkpoint import load_checkpoint
    from server.server_app import coordinate

    config = RunConfig.from_flat(
        {
            "model.name": str(backbone),
            "data.path": str(data),
            "data.partition": "column:domain",
            "sim.num-clients": 2,
            "num-server-rounds": 2,
            "train.batch-size": 4,
            "train.lr": 0.01,
            "lora.dropout": 0.0,
            "data.holdout-fraction": 0.25,
            "output.dir": str(output),
            **overrides,
        }
    )
    nodes = {
        node: {
            "partition-id": index,
            "num-partitions": len(NODES),
            "cache-dir": str(output.parent / "cache"),
        }
        for index, node in enumerate(NODES)
    }
    grid = InProcessGrid(client_app, nodes, tamper=tamper)
    coordinate(grid, config)  # type: ignore[arg-type]
    rows = [
        json.loads(line) for line in (output / "metrics.jsonl").read_text().splitlines()
    ]
    return grid, rows, load_checkpoint(output).state


def global_adapters(grid: InProcessGrid) -> dict[int, dict[str, np.ndarray]]:
    """The global adapter sent for each round, by round."""
    sent = {}
    for message in grid.sent:
        content = message.content
        if keys.ADAPTER_RECORD in content.array_records:
            round_ = int(content.config_records[keys.CONFIG_RECORD][keys.CFG_ROUND])
            sent[round_] = from_array_record(content.array_records[keys.ADAPTER_RECORD])
    return sent


def uploads(grid: InProcessGrid) -> list[set[str]]:
    """Tensor names of every plain training reply, in order."""
    return [
        set(reply.content.array_records[keys.ADAPTER_RECORD])
        for reply in grid.received
        if keys.ADAPTER_RECORD in reply.content.array_records
    ]


def test_lp_ft_trains_the_head_alone_for_lp_rounds_then_the_adapters(
    backbone: Path, small_jsonl: Path, tmp_path: Path
) -> None:
    # Execute
    grid, rows, final = federate(
        backbone,
        small_jsonl,
        tmp_path / "out",
        **{"train.mode": "lp-ft", "train.lp-rounds": 1},
    )

    # Assert
    assert [row["phase"] for row in rows] == [None, "head", "lora"]
    assert [row["clients"] for row in rows[1:]] == [2, 2]
    sent = global_adapters(grid)
    initial, after_probe = sent[1], sent[2]
    assert same_arrays(lora_part(after_probe), lora_part(initial))
    assert not same_arrays(head_part(after_probe), head_part(initial))
    assert not same_arrays(lora_part(final), lora_part(after_probe))
    names = uploads(grid)
    assert names[:2] == [{"head.weight", "head.bias"}] * 2
    assert all(any("lora_" in n for n in later) for later in names[2:])
    assert rows[1]["bytes_up"] < rows[2]["bytes_up"]


def test_head_mode_keeps_the_adapters_and_uploads_less_than_lora_mode(
    backbone: Path, small_jsonl: Path, tmp_path: Path
) -> None:
    # Execute
    head_grid, head_rows, head_final = federate(
        backbone,
        small_jsonl,
        tmp_path / "head",
        **{"train.mode": "head", "num-server-rounds": 1},
    )
    _, lora_rows, _ = federate(
        backbone,
        small_jsonl,
        tmp_path / "lora",
        **{"train.mode": "lora", "num-server-rounds": 1},
    )

    # Assert
    initial = global_adapters(head_grid)[1]
    assert [row["phase"] for row in head_rows] == [None, "head"]
    assert same_arrays(lora_part(head_final), lora_part(initial))
    assert not same_arrays(head_part(head_final), head_part(initial))
    per_client_head = head_rows[1]["bytes_up"] / head_rows[1]["clients"]
    per_client_lora = lora_rows[1]["bytes_up"] / lora_rows[1]["clients"]
    assert per_client_head < per_client_lora / 2


def test_a_head_round_rejects_an_upload_that_carries_adapter_tensors(
    backbone: Path,
    small_jsonl: Path,
    tmp_path: Path,
    caplog: pytest.LogCaptureFixture,
) -> None:
    # Prepare: node 101 adds a real LoRA tensor (name and shape) to its head-only reply
    from flwr.app import Array, ArrayRecord, Message

    settings = LoraSettings(r=8, alpha=16, dropout=0.0, target_modules=("query",))
    model = attach_lora(load_encoder(backbone), settings, "mean", 4, 0)
    name, tensor = next(iter(lora_part(adapter_state(model)).items()))

    def add_lora(sender: int, reply: Message) -> Message:
        records = reply.content.array_records
        if sender == 101 and not reply.has_error() and keys.ADAPTER_RECORD in records:
            arrays = {k: v.numpy() for k, v in records[keys.ADAPTER_RECORD].items()}
            arrays[name] = np.ones_like(tensor)
            records[keys.ADAPTER_RECORD] = ArrayRecord(
                {k: Array(v) for k, v in arrays.items()}
            )
        return reply

    # Execute
    with caplog.at_level("WARNING"):
        _, rows, _ = federate(
            backbone,
            small_jsonl,
            tmp_path / "out",
            tamper=add_lora,
            **{"train.mode": "head", "num-server-rounds": 1},
        )

    # Assert
    assert (rows[1]["rejected"], rows[1]["clients"]) == (1, 1)
    assert "node 101: update rejected: wrong tensor names" in caplog.text


def test_head_mode_runs_behind_secure_aggregation(
    backbone: Path, tmp_path: Path
) -> None:
    # Prepare: three sites with iid shares
    rows = [
        {"text": f"{words} number {i}", "label": label}
        for i in range(6)
        for words, label in (("send money", "send"), ("book flight", "flight"))
    ]
    data = write_jsonl(tmp_path / "three.jsonl", rows)
    from client.client_app import app as client_app
    from server.checkpoint import load_checkpoint
    from server.server_app import coordinate

    nodes = (11, 22, 33)
    config = RunConfig.from_flat(
        {
            "model.name": str(backbone),
            "data.path": str(data),
            "data.partition": "iid",
            "sim.num-clients": 3,
            "num-server-rounds": 1,
            "train.batch-size": 4,
            "train.mode": "head",
            "secagg.enabled": True,
            "secagg.max-weight": 10.0,
            "output.dir": str(tmp_path / "out"),
        }
    )
    grid = InProcessGrid(
        client_app,
        {
            node: {
                "partition-id": i,
                "num-partitions": 3,
                "cache-dir": str(tmp_path / "cache"),
            }
            for i, node in enumerate(nodes)
        },
    )

    # Execute
    coordinate(grid, config)  # type: ignore[arg-type]

    # Assert
    metrics = [
        json.loads(line)
        for line in (tmp_path / "out" / "metrics.jsonl").read_text().splitlines()
    ]
    assert (metrics[1]["phase"], metrics[1]["clients"], metrics[1]["rejected"]) == (
        "head",
        3,
        0,
    )
    initial, final = global_adapters(grid)[1], load_checkpoint(tmp_path / "out").state
    assert same_arrays(lora_part(final), lora_part(initial))
    assert not same_arrays(head_part(final), head_part(initial))


# -- export ----------------------------------------------------------------------------


def test_the_merged_export_pools_as_the_model_was_trained(
    backbone: Path, tmp_path: Path
) -> None:
    # Prepare: the backbone says mean; the run overrides it with max
    from common.outputs import RunOutputs
    from common.tasks.text_classification.inference import MergedClassifier

    assert pooling_mode(backbone) == "mean"
    bench = open_bench(backbone, [Example("send", "send")], **{"model.pooling": "max"})
    state = perturbed_lora(bench.model)

    # Execute
    bench.export(RunOutputs(tmp_path / "out"), state)

    # Assert
    merged = tmp_path / "out" / "merged"
    pooling = json.loads((merged / "1_Pooling" / "config.json").read_text())
    assert pooling["pooling_mode_max_tokens"] is True
    assert (
        not pooling["pooling_mode_mean_tokens"]
        and not pooling["pooling_mode_cls_token"]
    )
    assert pooling_mode(merged) == "max" and pooling_mode(backbone) == "mean"
    loaded = MergedClassifier.load(merged)
    assert loaded.model.pooling == "max"
    batch = bench.tokenizer(TEXTS, padding=True, return_tensors="pt")
    bench.model.eval()
    with torch.no_grad():
        expected = bench.model(batch["input_ids"], batch["attention_mask"])
        actual = loaded.model(batch["input_ids"], batch["attention_mask"])
    torch.testing.assert_close(actual, expected, rtol=1e-4, atol=1e-5)
    assert [label for label, _ in loaded.predict(TEXTS)] == [
        LABELS[i] for i in expected.argmax(-1).tolist()
    ]


# -- baselines -------------------------------------------------------------------------


def record_phases(
    monkeypatch: pytest.MonkeyPatch,
) -> list[tuple[str, bool, bool]]:
    """Wrap the baselines' ``train_phase``: per call, the phase and whether the
    adapters and the head changed."""
    import simulations.baselines as baselines

    calls: list[tuple[str, bool, bool]] = []
    original = baselines.train_phase

    def recording(model: TextClassifier, *args: Any, **kwargs: Any) -> Any:
        phase = args[3] if len(args) > 3 else kwargs["phase"]
        before = adapter_state(model)
        result = original(model, *args, **kwargs)
        after = adapter_state(model)
        calls.append(
            (
                phase,
                not same_arrays(lora_part(after), lora_part(before)),
                not same_arrays(head_part(after), head_part(before)),
            )
        )
        return result

    monkeypatch.setattr(baselines, "train_phase", recording)
    return calls


def baseline_config(backbone: Path, data: Path, output: Path) -> RunConfig:
    return RunConfig.from_flat(
        {
            "model.name": str(backbone),
            "data.path": str(data),
            "data.partition": "column:domain",
            "sim.num-clients": 2,
            "num-server-rounds": 2,
            "train.mode": "lp-ft",
            "train.lp-rounds": 1,
            "train.batch-size": 4,
            "train.lr": 0.01,
            "lora.dropout": 0.0,
            "data.holdout-fraction": 0.25,
            "output.dir": str(output),
        }
    )


def test_the_centralised_baseline_follows_the_lp_ft_phases(
    backbone: Path,
    small_jsonl: Path,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    # Prepare
    from simulations.baselines import train_centralized

    calls = record_phases(monkeypatch)
    output = tmp_path / "central"

    # Execute
    train_centralized(baseline_config(backbone, small_jsonl, output), output)

    # Assert: (phase, adapters changed, head changed) per round
    assert calls == [("head", False, True), ("lora", True, True)]
    rows = [
        json.loads(line) for line in (output / "metrics.jsonl").read_text().splitlines()
    ]
    assert [row["round"] for row in rows] == [0, 1, 2]
    assert [row.get("phase") for row in rows] == [None, "head", "lora"]
    assert all(row["train_samples"] > 0 for row in rows[1:])
    assert (output / "merged" / "config.json").exists()


def test_local_only_clients_follow_the_lp_ft_phases(
    backbone: Path,
    small_jsonl: Path,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    # Prepare
    from simulations.baselines import local_only

    calls = record_phases(monkeypatch)

    # Execute
    results = local_only(baseline_config(backbone, small_jsonl, tmp_path / "o"))

    # Assert
    assert len(results) == 2
    assert calls == [("head", False, True), ("lora", True, True)] * 2


def client_head_deltas(grid: InProcessGrid) -> dict[int, dict[str, np.ndarray]]:
    return {
        reply.metadata.src_node_id: from_array_record(
            reply.content.array_records[keys.ADAPTER_RECORD]
        )
        for reply in grid.received
        if keys.ADAPTER_RECORD in reply.content.array_records
    }


def test_a_client_does_not_reuse_features_pooled_another_way(
    backbone: Path,
    small_jsonl: Path,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    # Prepare: the same head-only round under mean pooling, then under max pooling in
    # the same process, and under max pooling in a fresh one
    import client.client_app as client_app
    from client.sites import SiteRuntime

    monkeypatch.setattr(client_app, "SITE_RUNTIME", SiteRuntime())
    overrides = {"train.mode": "head", "num-server-rounds": 1}
    federate(backbone, small_jsonl, tmp_path / "mean", **overrides)

    # Execute
    after_mean, _, _ = federate(
        backbone, small_jsonl, tmp_path / "max", **overrides, **{"model.pooling": "max"}
    )
    monkeypatch.setattr(client_app, "SITE_RUNTIME", SiteRuntime())
    fresh, _, _ = federate(
        backbone,
        small_jsonl,
        tmp_path / "fresh",
        **overrides,
        **{"model.pooling": "max"},
    )

    # Assert
    reused, expected = client_head_deltas(after_mean), client_head_deltas(fresh)
    for node in expected:
        assert same_arrays(reused[node], expected[node]), node
