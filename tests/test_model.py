"""The classifier: pooling, seeded LoRA attachment, adapter state, finetuning."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from client.finetune import LocalTraining, finetune
from common.backbone import (
    BackboneError,
    fingerprint,
    locate_on_site,
    pooling_mode,
    store_bundle,
)
from common.batching import bucketed_order, collate, encode
from common.codec import Float32Codec, apply_delta, delta, l2_norm
from common.config import LoraSettings
from common.tasks.text_classification.model import (
    HEAD_PREFIX,
    adapter_state,
    attach_lora,
    load_adapter_state,
    load_encoder,
    pool,
)
from tests.conftest import build_tiny_backbone

LORA = LoraSettings(r=4, alpha=8, dropout=0.0, target_modules=("query", "value"))


def classifier(backbone: Path, seed: int = 0, labels: int = 3):  # type: ignore[no-untyped-def]
    return attach_lora(
        load_encoder(backbone), LORA, pooling_mode(backbone), labels, seed
    )


def test_mean_pooling_ignores_padding_tokens() -> None:
    # Prepare: the second row's last token is padding with a huge value
    hidden = torch.tensor([[[1.0, 2.0], [3.0, 4.0]], [[1.0, 1.0], [1000.0, 1000.0]]])
    mask = torch.tensor([[1, 1], [1, 0]])

    # Execute
    pooled = pool(hidden, mask, "mean")

    # Assert
    torch.testing.assert_close(pooled, torch.tensor([[2.0, 3.0], [1.0, 1.0]]))


@pytest.mark.parametrize(
    ("mode", "expected"), [("cls", [[1.0, 9.0]]), ("max", [[3.0, 9.0]])]
)
def test_cls_and_max_pooling(mode: str, expected: list[list[float]]) -> None:
    hidden = torch.tensor([[[1.0, 9.0], [3.0, 4.0], [50.0, 50.0]]])
    pooled = pool(hidden, torch.tensor([[1, 1, 0]]), mode)
    torch.testing.assert_close(pooled, torch.tensor(expected))


def test_backbone_pooling_is_read_from_the_sentence_transformers_config(
    tmp_path: Path,
) -> None:
    with_config = build_tiny_backbone(tmp_path / "st", mean_pooling=True)
    plain = build_tiny_backbone(tmp_path / "plain", mean_pooling=False)
    assert (pooling_mode(with_config), pooling_mode(plain)) == ("mean", "cls")


def test_fingerprint_changes_when_the_weights_change(tmp_path: Path) -> None:
    first = build_tiny_backbone(tmp_path / "a", seed=1)
    same = build_tiny_backbone(tmp_path / "b", seed=1)
    other = build_tiny_backbone(tmp_path / "c", seed=2)
    assert fingerprint(first) == fingerprint(same) != fingerprint(other)


def test_fingerprint_changes_when_the_model_config_changes(tmp_path: Path) -> None:
    # Prepare: the same weights under another architecture config
    first = build_tiny_backbone(tmp_path / "a", seed=1)
    other = build_tiny_backbone(tmp_path / "b", seed=1)
    config = json.loads((other / "config.json").read_text())
    (other / "config.json").write_text(json.dumps(config | {"hidden_act": "relu"}))

    # Execute / Assert
    assert fingerprint(first) != fingerprint(other)


def test_fingerprint_frames_each_file_so_moved_boundaries_differ(
    tmp_path: Path,
) -> None:
    # Prepare: one file holding what, unframed, reads as the name and bytes of two
    one, two = tmp_path / "one", tmp_path / "two"
    one.mkdir(), two.mkdir()
    (one / "a.safetensors").write_bytes(b"Q" + b"b.safetensors\0" + b"Z")
    (two / "a.safetensors").write_bytes(b"Q")
    (two / "b.safetensors").write_bytes(b"Z")

    # Execute / Assert
    assert fingerprint(one) != fingerprint(two)


@pytest.mark.parametrize("forged", ["../../elsewhere", "ab" * 32 + "/..", "", "A" * 64])
def test_a_fingerprint_that_is_not_64_hex_digits_never_becomes_a_path(
    forged: str, tmp_path: Path
) -> None:
    with pytest.raises(BackboneError, match="not 64 hex digits"):
        store_bundle({}, forged, tmp_path / "cache")
    with pytest.raises(BackboneError, match="not 64 hex digits"):
        locate_on_site("minilm", forged, tmp_path / "cache")
    assert not (tmp_path / "cache").exists()


def test_the_initial_adapter_is_a_pure_function_of_the_seed(
    tiny_backbone: Path,
) -> None:
    # Execute
    first, again, other = (
        adapter_state(classifier(tiny_backbone, seed)) for seed in (3, 3, 4)
    )

    # Assert
    assert all(np.array_equal(first[k], again[k]) for k in first)
    assert any(not np.array_equal(first[k], other[k]) for k in first if "lora_A" in k)
    assert all(not v.any() for k, v in first.items() if "lora_B" in k), (
        "LoRA B starts at zero"
    )


def test_adapter_state_holds_only_lora_and_head_tensors(tiny_backbone: Path) -> None:
    state = adapter_state(classifier(tiny_backbone))
    assert state and all("lora_" in k or k.startswith(HEAD_PREFIX) for k in state)
    assert {k for k in state if k.startswith(HEAD_PREFIX)} == {
        "head.weight",
        "head.bias",
    }


def test_loading_an_adapter_state_round_trips(tiny_backbone: Path) -> None:
    # Prepare
    model = classifier(tiny_backbone)
    changed = {k: v + 0.5 for k, v in adapter_state(model).items()}

    # Execute
    load_adapter_state(model, changed)

    # Assert
    assert all(np.allclose(adapter_state(model)[k], changed[k]) for k in changed)


def test_loading_an_adapter_state_with_wrong_names_is_refused(
    tiny_backbone: Path,
) -> None:
    model = classifier(tiny_backbone)
    state = adapter_state(model)
    state["head.extra"] = state.pop("head.bias")
    with pytest.raises(KeyError, match="missing"):
        load_adapter_state(model, state)


def test_an_unknown_lora_target_names_the_key_and_the_choices(
    tiny_backbone: Path,
) -> None:
    settings = LoraSettings(r=4, alpha=8, dropout=0.0, target_modules=("q_proj",))
    with pytest.raises(ValueError, match="lora.target-modules = q_proj.*query"):
        attach_lora(load_encoder(tiny_backbone), settings, "mean", 3, 0)


def test_delta_and_apply_are_inverse() -> None:
    reference = {"a": np.arange(4, dtype=np.float32), "b": np.ones((2, 2), np.float32)}
    local = {"a": reference["a"] * 3, "b": reference["b"] - 2}
    change = delta(local, reference)
    restored = apply_delta(reference, change)
    assert all(np.array_equal(restored[k], local[k]) for k in local)
    assert l2_norm(change) == pytest.approx(
        np.sqrt((4 * np.arange(4) ** 2).sum() + 4 * 4)
    )


def test_float32_codec_is_lossless() -> None:
    change = {"w": np.random.default_rng(0).normal(size=(3, 5)).astype(np.float32)}
    codec = Float32Codec()
    assert np.array_equal(codec.decode(codec.encode(change), change)["w"], change["w"])


def test_batches_pad_to_their_longest_row_and_cover_every_row() -> None:
    lengths = [3, 9, 4, 8, 5, 2, 7]
    batches = bucketed_order(lengths, 3, np.random.default_rng(0))
    assert sorted(r for b in batches for r in b) == list(range(len(lengths)))
    from common.batching import Encoded

    encoded = Encoded(
        ids=[[1] * n for n in lengths], labels=np.zeros(len(lengths), np.int64)
    )
    batch = collate(encoded, [0, 1], pad_id=0)
    assert (
        batch["input_ids"].shape == (2, 9)
        and batch["attention_mask"].sum().item() == 12
    )


def test_finetuning_lowers_the_training_loss(tiny_backbone: Path) -> None:
    # Prepare
    from transformers import AutoTokenizer

    model = classifier(tiny_backbone, labels=2)
    tokenizer = AutoTokenizer.from_pretrained(str(tiny_backbone))
    texts = ["good great love", "bad awful hate"] * 8
    encoded = encode(tokenizer, texts, [0, 1] * 8, 16)
    plan = LocalTraining(
        epochs=1,
        max_steps=0,
        batch_size=4,
        lr=0.01,
        head_lr=0.01,
        weight_decay=0.0,
        seed=0,
    )

    # Execute
    first = finetune(model, encoded, tokenizer.pad_token_id, plan)
    later = [finetune(model, encoded, tokenizer.pad_token_id, plan) for _ in range(7)][
        -1
    ]

    # Assert
    assert later.train_loss < first.train_loss
    assert first.samples == 16 and first.steps == 4 and first.device == "cpu"


def test_max_steps_caps_local_training(tiny_backbone: Path) -> None:
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(str(tiny_backbone))
    encoded = encode(tokenizer, ["good film"] * 20, [0] * 20, 16)
    plan = LocalTraining(
        epochs=2,
        max_steps=3,
        batch_size=4,
        lr=0.01,
        head_lr=0.01,
        weight_decay=0.0,
        seed=0,
    )
    result = finetune(classifier(tiny_backbone, labels=2), encoded, 0, plan)
    assert (result.steps, result.samples) == (3, 12)


def test_an_adapter_state_with_other_tensors_is_refused_naming_them(
    tiny_backbone: Path,
) -> None:
    # Prepare: one tensor missing, one the model does not have
    model = classifier(tiny_backbone)
    before = adapter_state(model)
    state = dict(before)
    del state["head.bias"]
    state["head.extra"] = np.zeros(1, np.float32)

    # Execute
    with pytest.raises(
        KeyError, match=r"missing \['head.bias'\], unexpected \['head.extra'\]"
    ):
        load_adapter_state(model, state)

    # Assert: nothing was loaded
    assert all(np.array_equal(adapter_state(model)[k], before[k]) for k in before)
