"""The frozen-prefix cache (``lora.layers``): LoRA on the top layers only, the frozen
layers below run once per row, and training from their cached output is the same as
training the whole model."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from transformers import AutoModel, BertConfig, GPT2Config

from client import runtime
from client.finetune import LocalTraining, finetune
from common.batching import Encoded, collate
from common.config import ConfigError, LoraSettings, RunConfig
from common.tasks.text_classification.frozen_prefix import encoder_parts, prefix_states
from common.tasks.text_classification.model import adapter_state, attach_lora
from tests.test_rules import corpus, federate  # noqa: F401  (corpus is a fixture)


def four_layer_encoder(dropout: float = 0.1) -> torch.nn.Module:
    torch.manual_seed(0)
    return AutoModel.from_config(
        BertConfig(
            vocab_size=40,
            hidden_size=32,
            num_hidden_layers=4,
            num_attention_heads=4,
            intermediate_size=64,
            max_position_embeddings=32,
            hidden_dropout_prob=dropout,
            attention_probs_dropout_prob=dropout,
        )
    )


def top_layer_classifier(top: int, dropout: float = 0.1, labels: int = 3):  # type: ignore[no-untyped-def]
    model = attach_lora(
        four_layer_encoder(dropout),
        LoraSettings(4, 8, 0.0, ("query", "value"), top),
        "mean",
        labels,
        seed=0,
    )
    for name, parameter in model.named_parameters():
        if "lora_B" in name:  # B starts at zero: make the adapters matter
            torch.nn.init.normal_(parameter, std=0.5)
    return model


ROWS = Encoded(
    ids=[[2, 5, 7, 3], [2, 9, 3], [2, 11, 12, 13, 14, 15, 3], [2, 6, 3], [2, 8, 8, 3]],
    labels=np.array([0, 1, 2, 1, 0]),
)


@pytest.mark.parametrize("top", [1, 2, 3])
def test_cached_prefix_gives_the_logits_of_the_full_forward_pass(top: int) -> None:
    # Prepare: rows of different lengths, so the batch is padded
    model = top_layer_classifier(top).eval()
    batch = collate(ROWS, range(len(ROWS)), pad_id=0)

    # Execute
    states = prefix_states(model.encoder, model.prefix_depth, ROWS, pad_id=0)
    with torch.no_grad():
        full = model(batch["input_ids"], batch["attention_mask"])
        cached = model.logits_from_prefix(*states.collate(range(len(ROWS))))

    # Assert
    assert model.prefix_depth == 4 - top
    torch.testing.assert_close(cached, full, rtol=1e-5, atol=1e-5)


def test_lora_layers_puts_adapters_on_the_top_layers_only() -> None:
    state = adapter_state(top_layer_classifier(2))
    layers = {int(n.split(".layer.")[1].split(".")[0]) for n in state if "lora_" in n}
    assert layers == {2, 3}


def test_all_linear_with_lora_layers_adapts_every_linear_layer_of_the_top_layers() -> (
    None
):
    # Execute
    model = attach_lora(
        four_layer_encoder(), LoraSettings(4, 8, 0.0, ("all-linear",), 1), "mean", 3, 0
    )

    # Assert: the six linear layers of layer 3, nothing below it, not the pooler
    adapted = {
        n.split(".layer.3.")[1].removesuffix(".lora_A.weight")
        for n in adapter_state(model)
        if "lora_A" in n
    }
    assert adapted == {
        "attention.self.query",
        "attention.self.key",
        "attention.self.value",
        "attention.output.dense",
        "intermediate.dense",
        "output.dense",
    }


def test_lora_layers_above_the_layer_count_is_refused_naming_the_key() -> None:
    with pytest.raises(ValueError, match=r"lora.layers = 5 .* 4 layers"):
        top_layer_classifier(5)


def test_negative_lora_layers_is_refused_naming_the_key() -> None:
    with pytest.raises(ConfigError, match="lora.layers"):
        RunConfig.from_flat({"lora.layers": -1})


@pytest.mark.parametrize("task", ["causal-lm", "image-cls"])
def test_lora_layers_validates_outside_text_classification(task: str) -> None:
    # The other tasks place their adapters on the top blocks without this cache
    # (tests/test_task_options.py).
    flat: dict[str, object] = {"model.task": task, "lora.layers": 2, "data.path": "x"}
    if task == "image-cls":
        flat["head.init"] = "random"
    assert RunConfig.from_flat(flat).lora.layers == 2


def test_a_prefix_computed_at_another_precision_is_not_reused(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    # Prepare: the same rows, stored once by a full-precision site
    model = top_layer_classifier(1)
    full = runtime.LoadedBackbone(model, tokenizer=None, pad_id=0)  # type: ignore[arg-type]
    quantised = runtime.LoadedBackbone(model, None, 0, quantize="4bit")  # type: ignore[arg-type]
    caches = runtime.TextCaches()
    runtime.cached_prefix(caches, full, ROWS, "rows-c", tmp_path)
    calls: list[int] = []

    def counted(*args, **kwargs):  # type: ignore[no-untyped-def]
        calls.append(1)
        return prefix_states(*args, **kwargs)

    monkeypatch.setattr(runtime, "prefix_states", counted)

    # Execute
    runtime.cached_prefix(caches, quantised, ROWS, "rows-c", tmp_path)

    # Assert
    assert len(calls) == 1
    assert len(list((tmp_path / "prefix").glob("*.npz"))) == 2


def test_the_cache_refuses_an_encoder_without_bert_layers_naming_the_key() -> None:
    gpt2 = AutoModel.from_config(GPT2Config(n_layer=2, n_embd=16, n_head=2))
    with pytest.raises(ValueError, match=r"lora.layers.*GPT2Model"):
        encoder_parts(gpt2)


def test_training_from_the_cached_prefix_matches_training_the_full_model() -> None:
    # Prepare: no dropout anywhere, so both paths compute the same function
    plan = LocalTraining(
        epochs=2, max_steps=0, batch_size=2, lr=0.01, head_lr=0.01,
        weight_decay=0.0, seed=3,
    )  # fmt: skip
    cached, full = top_layer_classifier(2, 0.0), top_layer_classifier(2, 0.0)
    full.prefix_depth = 0  # the same model, trained through every layer

    # Execute
    with_cache = finetune(cached, ROWS, 0, plan)
    without = finetune(full, ROWS, 0, plan)

    # Assert
    assert with_cache.samples == without.samples == 10
    assert with_cache.train_loss == pytest.approx(without.train_loss, rel=1e-5)
    trained, reference = adapter_state(cached), adapter_state(full)
    for name in reference:
        np.testing.assert_allclose(trained[name], reference[name], atol=1e-5)


def test_a_client_computes_its_prefix_once_across_rounds(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    # Prepare
    model = top_layer_classifier(1)
    backbone = runtime.LoadedBackbone(model, tokenizer=None, pad_id=0)  # type: ignore[arg-type]
    calls: list[int] = []

    def counted(*args, **kwargs):  # type: ignore[no-untyped-def]
        calls.append(1)
        return prefix_states(*args, **kwargs)

    monkeypatch.setattr(runtime, "prefix_states", counted)
    caches = runtime.TextCaches()

    # Execute
    first = runtime.cached_prefix(caches, backbone, ROWS, "rows-a", tmp_path)
    second = runtime.cached_prefix(caches, backbone, ROWS, "rows-a", tmp_path)

    # Assert
    assert second is first and len(calls) == 1


def test_a_site_reads_its_prefix_back_from_disk_in_a_fresh_process(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    # Prepare: one message computes and stores the prefix
    model = top_layer_classifier(1)
    backbone = runtime.LoadedBackbone(model, tokenizer=None, pad_id=0)  # type: ignore[arg-type]
    caches = runtime.TextCaches()
    stored = runtime.cached_prefix(caches, backbone, ROWS, "rows-b", tmp_path)

    # Execute: a new process (empty memory) must not recompute it
    caches = runtime.TextCaches()
    monkeypatch.setattr(
        runtime, "prefix_states", lambda *a, **k: pytest.fail("recomputed")
    )
    loaded = runtime.cached_prefix(caches, backbone, ROWS, "rows-b", tmp_path)

    # Assert
    assert list((tmp_path / "prefix").glob("*.npz"))
    for a, b in zip(loaded.states, stored.states, strict=True):
        torch.testing.assert_close(a, b)


def test_a_federated_run_with_lora_layers_sends_only_the_top_layer(
    tiny_backbone: Path,
    corpus: tuple[Path, Path],  # noqa: F811
    tmp_path: Path,
) -> None:
    # Execute: the tiny backbone has 2 layers; adapt the top one
    run = federate(tiny_backbone, corpus, tmp_path / "out", **{"lora.layers": 1})

    # Assert
    lora = [name for name in run.final if "lora_" in name]
    assert lora and all(".layer.1." in name for name in lora)
    assert all(reply.content.array_records for reply in run.replies())
    for reply in run.replies():
        (record,) = reply.content.array_records.values()
        assert not any(".layer.0." in name for name in record)
    assert len(run.rows) == 3 and run.rows[-1]["eval_accuracy"] is not None
    assert list((tmp_path / "cache").rglob("prefix/*.npz"))
