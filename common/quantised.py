"""A frozen backbone of any task in full precision or, with ``model.quantize = 4bit |
8bit``, with its linear layers quantised by bitsandbytes (QLoRA).

bitsandbytes quantises linear layers only (``nn.Linear`` and GPT-2's transposed
``Conv1D``): a transformer (a causal LM, a ViT) loses most of its memory, a ConvNeXt
the linear half of each block, and a ResNet, made of convolutions alone, nothing, so
it is refused rather than silently kept in full precision. Sites load the backbone
quantised; the coordinator keeps it in full precision, and the adapters (LoRA
factors, head) stay float32 on both sides, so the adapter state is the same.

The text classifier's encoder loads through :func:`load_frozen` too
(``common.tasks.text_classification.model.load_encoder``).
"""

from __future__ import annotations

from pathlib import Path
from typing import Protocol

import torch
from torch import nn
from transformers import PreTrainedModel

from common.config import ConfigError


class QuantisationUnavailable(RuntimeError):
    """``model.quantize`` asks for a quantised backbone this site cannot load."""


def quantisation_config(mode: str, device: torch.device | str) -> object | None:
    """bitsandbytes' settings for ``model.quantize`` (None for ``none``).

    4-bit is QLoRA's NF4 with double quantisation; 8-bit is LLM.int8(). The 4-bit
    layers compute in bf16 on CUDA and in float32 on a CPU (bitsandbytes' CPU
    backend; 0.50 is the version tested), where bf16 matrix products are slow. Both
    need the optional ``bitsandbytes`` package.

    Raises
    ------
    QuantisationUnavailable
        On a site without bitsandbytes (or with a version that has no CPU backend,
        on a CPU), saying how to fix it.
    """
    if mode == "none":
        return None
    import importlib.metadata
    import importlib.util

    if importlib.util.find_spec("bitsandbytes") is None:
        raise QuantisationUnavailable(
            f"model.quantize = {mode} needs the optional bitsandbytes package: "
            "pip install bitsandbytes (or set model.quantize = none)"
        )
    on_cuda = torch.device(device).type == "cuda"
    if not on_cuda and _version(importlib.metadata.version("bitsandbytes")) < (0, 50):
        raise QuantisationUnavailable(
            f"model.quantize = {mode} on a CPU needs bitsandbytes >= 0.50 (its CPU "
            "backend): pip install -U bitsandbytes, or set model.quantize = none"
        )
    from transformers import BitsAndBytesConfig

    if mode == "4bit":
        return BitsAndBytesConfig(
            load_in_4bit=True,
            bnb_4bit_quant_type="nf4",
            bnb_4bit_use_double_quant=True,
            bnb_4bit_compute_dtype=torch.bfloat16 if on_cuda else torch.float32,
        )
    return BitsAndBytesConfig(load_in_8bit=True)


def _version(text: str) -> tuple[int, ...]:
    """``"0.50.2"`` as ``(0, 50, 2)``; suffixes such as ``.dev0`` are ignored."""
    return tuple(int(part) for part in text.split(".")[:3] if part.isdigit())


class AutoLoader(Protocol):
    """A transformers Auto class (``AutoModel``, ``AutoModelForCausalLM``)."""

    def from_pretrained(self, *args: object, **kwargs: object) -> PreTrainedModel:
        """Load a model folder."""
        ...


def linear_layer_count(model: nn.Module) -> int:
    """How many layers of ``model`` bitsandbytes can quantise: linear layers (its
    own quantised ones included) and GPT-2's ``Conv1D``, not counting LoRA's own
    factors where PEFT has wrapped ``model``."""
    from transformers.pytorch_utils import Conv1D

    return sum(
        isinstance(module, (nn.Linear, Conv1D)) and ".lora_" not in f".{name}"
        for name, module in model.named_modules()
    )


def require_quantisable(model: nn.Module, quantize: str) -> None:
    """Refuse ``model.quantize`` for a backbone without linear layers.

    Raises
    ------
    ConfigError
        Naming ``model.quantize`` and the backbone's family (``config.model_type``).
    """
    if quantize == "none" or linear_layer_count(model) > 0:
        return
    family = getattr(getattr(model, "config", None), "model_type", "") or "this"
    raise ConfigError(
        f"config key 'model.quantize': {quantize} quantises a backbone's linear "
        f"layers, but the {family} backbone ({type(model).__name__}) is all "
        "convolutions, which bitsandbytes does not quantise; set model.quantize = "
        "none (or pick a backbone with linear layers: ViT, ConvNeXt)"
    )


def load_frozen(
    loader: AutoLoader,
    backbone_dir: Path,
    device: torch.device | str = "cpu",
    quantize: str = "none",
) -> PreTrainedModel:
    """Load a backbone with every weight frozen, onto ``device``.

    Parameters
    ----------
    loader : AutoLoader
        The Auto class of the task (``AutoModelForCausalLM``, ``AutoModel``).
    quantize : str
        ``model.quantize``: ``4bit`` or ``8bit`` load the linear layers' weights
        quantised by bitsandbytes straight onto ``device`` (CUDA, or a CPU with
        bitsandbytes 0.50 or later).

    Raises
    ------
    QuantisationUnavailable
        When the site cannot load a quantised backbone, saying how to fix it.
    ConfigError
        When the backbone has no linear layer to quantise, naming ``model.quantize``.
    """
    settings = quantisation_config(quantize, device)
    if settings is None:
        model = loader.from_pretrained(str(backbone_dir))
        model.requires_grad_(False)
        return model.to(device)
    target = torch.device(device)
    model = loader.from_pretrained(
        str(backbone_dir),
        quantization_config=settings,
        device_map={"": target.index or 0} if target.type == "cuda" else "cpu",
    )
    require_quantisable(model, quantize)
    model.requires_grad_(False)
    return model
