"""``model.quantize``: a 4- or 8-bit backbone through bitsandbytes (QLoRA) where a site
has CUDA and the package, a clear refusal where it has not, never a requirement."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import numpy as np
import pytest
import torch

from common.config import ConfigError, RunConfig
from common.quantised import QuantisationUnavailable, quantisation_config
from common.tasks.text_classification.model import load_encoder


def test_full_precision_needs_neither_cuda_nor_bitsandbytes(
    tiny_backbone: Path,
) -> None:
    assert quantisation_config("none", "cpu") is None
    encoder = load_encoder(tiny_backbone, "cpu", "none")
    assert next(encoder.parameters()).dtype == torch.float32


def test_a_cpu_site_with_an_old_bitsandbytes_is_told_to_upgrade(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    import importlib.metadata

    real = importlib.util.find_spec
    monkeypatch.setattr(
        importlib.util,
        "find_spec",
        lambda name, *a: object() if name == "bitsandbytes" else real(name, *a),
    )
    monkeypatch.setattr(importlib.metadata, "version", lambda name: "0.43.1")
    with pytest.raises(QuantisationUnavailable, match="model.quantize = 4bit.*0.50"):
        quantisation_config("4bit", "cpu")


def test_a_quantised_backbone_without_bitsandbytes_says_how_to_install_it(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    real = importlib.util.find_spec
    monkeypatch.setattr(
        importlib.util,
        "find_spec",
        lambda name, *a: None if name == "bitsandbytes" else real(name, *a),
    )
    with pytest.raises(QuantisationUnavailable, match="pip install bitsandbytes"):
        quantisation_config("4bit", torch.device("cuda"))


def test_4bit_is_qlora_nf4_with_double_quantisation_and_bf16_compute(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    # Prepare: pretend the package is installed (the settings object needs no GPU)
    real = importlib.util.find_spec
    monkeypatch.setattr(
        importlib.util,
        "find_spec",
        lambda name, *a: object() if name == "bitsandbytes" else real(name, *a),
    )

    # Execute
    four = quantisation_config("4bit", "cuda")
    eight = quantisation_config("8bit", "cuda")

    # Assert
    assert four.load_in_4bit and four.bnb_4bit_quant_type == "nf4"  # type: ignore[attr-defined]
    assert four.bnb_4bit_use_double_quant  # type: ignore[attr-defined]
    assert four.bnb_4bit_compute_dtype == torch.bfloat16  # type: ignore[attr-defined]
    assert eight.load_in_8bit and not eight.load_in_4bit  # type: ignore[attr-defined]


def test_an_unknown_quantisation_is_refused_naming_the_key() -> None:
    with pytest.raises(ConfigError, match="model.quantize"):
        RunConfig.from_flat({"model.quantize": "2bit"})


HAS_BITSANDBYTES = importlib.util.find_spec("bitsandbytes") is not None


def _train_tiny_classifier(backbone: Path, device: str, mode: str) -> tuple:
    """Load ``backbone`` quantised, attach LoRA, train two epochs; return the
    result, the adapter before and after, and the model."""
    from transformers import AutoTokenizer

    from client.finetune import LocalTraining, finetune
    from common.batching import encode
    from common.config import LoraSettings
    from common.tasks.text_classification.model import adapter_state, attach_lora

    encoder = load_encoder(backbone, device, mode)
    model = attach_lora(
        encoder, LoraSettings(4, 8, 0.0, ("query", "value")), "mean", 2, 0
    )
    before = adapter_state(model)
    tokenizer = AutoTokenizer.from_pretrained(str(backbone))
    rows = encode(tokenizer, ["good great love", "bad awful hate"] * 4, [0, 1] * 4, 16)
    plan = LocalTraining(
        epochs=2, max_steps=0, batch_size=4, lr=0.01, head_lr=0.01,
        weight_decay=0.0, seed=0,
    )  # fmt: skip
    result = finetune(model, rows, tokenizer.pad_token_id, plan)
    return result, before, adapter_state(model), model


@pytest.mark.skipif(not HAS_BITSANDBYTES, reason="needs bitsandbytes")
@pytest.mark.parametrize(
    ("mode", "layer_class"), [("4bit", "Linear4bit"), ("8bit", "Linear8bitLt")]
)
def test_a_quantised_backbone_trains_its_adapters_on_a_cpu(
    mode: str, layer_class: str, tiny_backbone: Path
) -> None:
    # Execute
    result, before, after, model = _train_tiny_classifier(tiny_backbone, "cpu", mode)

    # Assert: the frozen linear layers are bitsandbytes' ...
    frozen = {type(m).__name__ for m in model.modules()}
    assert layer_class in frozen
    # ... and the LoRA factors on top of them learnt, in float32
    assert result.device == "cpu"
    assert any((after[k] != before[k]).any() for k in before if "lora_B" in k)
    assert all(v.dtype == after[k].dtype for k, v in before.items())
    assert np.isfinite(result.train_loss)


@pytest.mark.gpu
@pytest.mark.skipif(
    not torch.cuda.is_available() or not HAS_BITSANDBYTES,
    reason="needs CUDA and bitsandbytes",
)
def test_a_4bit_backbone_trains_its_adapters_on_cuda(tiny_backbone: Path) -> None:
    result, before, after, _ = _train_tiny_classifier(tiny_backbone, "cuda", "4bit")
    assert result.device == "cuda"
    assert any((after[k] != before[k]).any() for k in before if "lora_B" in k)


def test_head_features_of_a_quantised_backbone_are_cached_apart(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    # Prepare: two backbones alike but for their precision, the same rows and adapter
    from types import SimpleNamespace

    from client import runtime
    from common.batching import Encoded

    computed: list[str] = []

    def features(model: SimpleNamespace, *args: object) -> torch.Tensor:
        computed.append(model.precision)
        return torch.zeros(1, 4)

    monkeypatch.setattr(runtime, "pooled_features", features)
    rows = Encoded(ids=[[1, 2]], labels=np.array([0]))
    caches = runtime.TextCaches()

    def backbone(quantize: str) -> runtime.LoadedBackbone:
        model = SimpleNamespace(pooling="mean", precision=quantize)
        return runtime.LoadedBackbone(model, None, 0, quantize)  # type: ignore[arg-type]

    # Execute
    for quantize in ("none", "4bit", "none", "4bit"):
        runtime.cached_features(caches, backbone(quantize), rows, "rows", "digest")

    # Assert: each precision computed once, then served from the cache
    assert computed == ["none", "4bit"]
