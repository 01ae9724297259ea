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

``lora.layers = N`` puts the adapters on the top N blocks of the backbone's block
stack (:func:`block_stack`): the shallowest list of alike blocks, that is a
transformer's layers (``model.layers`` of Llama, ``transformer.h`` of GPT-2,
``layers`` of a ViT) and a CNN's stages (``encoder.stages`` of ResNet and
ConvNeXt). Targets outside the stack (a ResNet's stem, a pooler) then get none, and
``all-linear`` means every linear layer inside the chosen blocks. Only the text
classifier also caches the output of the blocks below
(:mod:`common.tasks.text_classification.frozen_prefix`).
"""

from __future__ import annotations

import dataclasses
import re
from collections.abc import Mapping

import torch
from peft import LoraConfig, PeftModel, get_peft_model
from peft.utils.constants import TRANSFORMERS_MODELS_TO_LORA_TARGET_MODULES_MAPPING
from torch import nn

from common.config import DEFAULTS, ConfigError, LoraSettings

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


def block_stack(model: nn.Module) -> tuple[str, int]:
    """Where the backbone's blocks sit: the dotted name of its block stack and how
    many blocks it holds.

    The stack is the shallowest ``nn.ModuleList`` whose children are all of one
    class (the longest, where several are equally shallow).

    Raises
    ------
    ConfigError
        When the backbone has no such list, naming ``lora.layers``.
    """
    stacks = [
        (name, len(module))
        for name, module in model.named_modules()
        if isinstance(module, nn.ModuleList)
        and len(module) > 0
        and len({type(child) for child in module}) == 1
    ]
    if not stacks:
        raise ConfigError(
            f"config key 'lora.layers': {type(model).__name__} has no stack of "
            "blocks (a list of alike layers or stages) to pick the top ones from; "
            "set lora.layers = 0 to adapt every layer"
        )
    return min(stacks, key=lambda stack: (stack[0].count("."), -stack[1]))


def _top_blocks(model: nn.Module, top: int) -> tuple[str, list[int]]:
    """The block stack's name and the indices of its top ``top`` blocks."""
    stack, count = block_stack(model)
    if top > count:
        raise ConfigError(
            f"config key 'lora.layers': {top} blocks asked for, but this backbone "
            f"({type(model).__name__}) has {count} in {stack}; use 1 to {count}, or "
            "0 to adapt every block"
        )
    return stack, adapted_layers(count, top)


def linear_inside(model: nn.Module, stack: str) -> list[str]:
    """Names of the linear layers (and GPT-2's Conv1D) inside the block stack."""
    from transformers.pytorch_utils import Conv1D

    prefix = stack + "."
    return sorted(
        {
            name.rsplit(".", 1)[-1]
            for name, module in model.named_modules()
            if name.startswith(prefix) and isinstance(module, (nn.Linear, Conv1D))
        }
    )


def wrap_with_lora(
    model: nn.Module, settings: LoraSettings, seed: int, task_type: str | None = None
) -> PeftModel:
    """Wrap ``model`` with LoRA, A drawn from ``seed`` (B starts at zero), leaving the
    global random state as it was.

    With ``settings.layers = N`` only the top N blocks of :func:`block_stack` get
    adapters.

    Raises
    ------
    ConfigError
        When ``lora.layers`` exceeds the backbone's blocks, or it has none.
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
    stack, indices = "", None
    if settings.layers:
        stack, indices = _top_blocks(model, settings.layers)
        if targets == "all-linear":  # PEFT takes block indices with a name list only
            targets = linear_inside(model, stack)
    config = LoraConfig(
        r=settings.r,
        lora_alpha=settings.alpha,
        lora_dropout=settings.dropout,
        target_modules=targets,
        bias="none",
        task_type=task_type,
        # GPT-2's projections are transposed linear layers (transformers' Conv1D).
        fan_in_fan_out=_targets_conv1d(
            model, ("all-linear",) if targets == "all-linear" else tuple(targets)
        ),
        layers_to_transform=indices,
        # PEFT reads a module's block index as "<pattern>.<index>." in its name.
        layers_pattern=re.escape(stack) if stack else None,
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


def adapted_layers(num_layers: int, top: int) -> list[int]:
    """Indices of the top ``top`` layers out of ``num_layers`` (all for ``top = 0``).

    Raises
    ------
    ValueError
        When ``top`` exceeds the number of layers, naming ``lora.layers``.
    """
    if top > num_layers:
        raise ValueError(
            f"lora.layers = {top} but this backbone has {num_layers} layers; "
            f"use 1 to {num_layers}, or 0 to adapt every layer"
        )
    return list(range(num_layers - top if top else 0, num_layers))


def require_same_tensors(expected: set[str], state: Mapping[str, object]) -> None:
    """Refuse an adapter ``state`` whose tensor names are not exactly ``expected``
    (the names a model's trainable tensors go by).

    Raises
    ------
    KeyError
        Naming up to three missing and three unexpected tensors.
    """
    if set(state) != expected:
        missing, extra = sorted(expected - set(state)), sorted(set(state) - expected)
        raise KeyError(
            f"adapter state mismatch: missing {missing[:3]}, unexpected {extra[:3]}"
        )
