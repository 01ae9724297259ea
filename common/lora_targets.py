"""LoRA on any backbone: which layers it targets, and the seeded wrap.

The text classifier targets what ``lora.target-modules`` names (``query,value`` by
default: BERT's attention). Causal language models and image backbones name their
layers otherwise, so for ``model.task = causal-lm`` and ``image-cls`` the default
resolves to the backbone family's usual targets:

1. PEFT's table for the model type (``q_proj,v_proj`` for Llama, ``c_attn`` for
   GPT-2);
2. else the first attention pair the backbone has (``q_proj,v_proj``, ``query,value``,
   ``c_attn``, ``query_key_value``, ``qkv``);
3. else every linear layer (``all-linear``), or, for a network without any (a
   ResNet), every convolution (PEFT's Conv2d LoRA).

Any other value of ``lora.target-modules`` (names, or ``all-linear``) is used as
given. The resolution depends only on the backbone, so the coordinator and every site
arrive at the same adapter.
"""

from __future__ import annotations

import dataclasses

import torch
from peft import LoraConfig, PeftModel, get_peft_model
from peft.utils.constants import TRANSFORMERS_MODELS_TO_LORA_TARGET_MODULES_MAPPING
from torch import nn

from common.config import DEFAULTS, LoraSettings

#: ``lora.target-modules`` at its default: resolved per backbone for new tasks.
DEFAULT_TARGETS = tuple(str(DEFAULTS["lora.target-modules"]).split(","))
_ATTENTION_TARGETS = (
    ("q_proj", "v_proj"),
    ("query", "value"),
    ("c_attn",),
    ("query_key_value",),
    ("qkv",),
)


def _leaf_names(model: nn.Module, kinds: tuple[type, ...] = (nn.Module,)) -> set[str]:
    return {
        name.rsplit(".", 1)[-1]
        for name, module in model.named_modules()
        if name and not any(module.children()) and isinstance(module, kinds)
    }


def resolve_targets(settings: LoraSettings, model: nn.Module) -> LoraSettings:
    """``settings`` with the default targets resolved for ``model`` (see module
    docstring); other targets unchanged."""
    if settings.target_modules != DEFAULT_TARGETS:
        return settings
    leaves = _leaf_names(model)
    model_type = getattr(getattr(model, "config", None), "model_type", "")
    mapped = TRANSFORMERS_MODELS_TO_LORA_TARGET_MODULES_MAPPING.get(model_type)
    candidates = ([tuple(mapped)] if mapped else []) + list(_ATTENTION_TARGETS)
    for names in candidates:
        if set(names) <= leaves:
            return dataclasses.replace(settings, target_modules=tuple(names))
    if _leaf_names(model, (nn.Linear,)):
        return dataclasses.replace(settings, target_modules=("all-linear",))
    convolutions = _leaf_names(model, (nn.Conv2d,))
    if convolutions:
        return dataclasses.replace(settings, target_modules=tuple(sorted(convolutions)))
    return settings


def _targets_conv1d(model: nn.Module, targets: tuple[str, ...]) -> bool:
    from transformers.pytorch_utils import Conv1D

    return any(
        isinstance(module, Conv1D)
        and (targets == ("all-linear",) or name.rsplit(".", 1)[-1] in targets)
        for name, module in model.named_modules()
    )


def wrap_with_lora(
    model: nn.Module, settings: LoraSettings, seed: int, task_type: str | None = None
) -> PeftModel:
    """Wrap ``model`` with LoRA, A drawn from ``seed`` (B starts at zero), leaving the
    global random state as it was.

    Raises
    ------
    ValueError
        When no layer matches the targets, naming ``lora.target-modules`` and the
        layer names the backbone has.
    """
    settings = resolve_targets(settings, model)
    targets: str | list[str] = (
        "all-linear"
        if settings.target_modules == ("all-linear",)
        else list(settings.target_modules)
    )
    config = LoraConfig(
        r=settings.r,
        lora_alpha=settings.alpha,
        lora_dropout=settings.dropout,
        target_modules=targets,
        bias="none",
        task_type=task_type,
        # GPT-2's projections are transposed linear layers (transformers' Conv1D).
        fan_in_fan_out=_targets_conv1d(model, settings.target_modules),
    )
    generator_state = torch.random.get_rng_state()
    torch.manual_seed(seed)
    try:
        return get_peft_model(model, config)
    except ValueError as error:
        names = sorted(_leaf_names(model, (nn.Linear, nn.Conv2d)))
        raise ValueError(
            f"lora.target-modules = {','.join(settings.target_modules)} matches no "
            f"layer of this backbone ({error}); its linear and convolution layers: "
            f"{', '.join(names)}, or use all-linear"
        ) from None
    finally:
        torch.random.set_rng_state(generator_state)
