"""The ``lora.*`` keys: LoRA hyper-parameters handed to every client."""

from __future__ import annotations

from dataclasses import dataclass

from common.config.keys import at_least, comma_list, satisfies, setting


@dataclass(frozen=True)
class LoraSettings:
    """LoRA hyper-parameters handed to every client (``lora.*``).

    ``layers`` limits the adapters to the top blocks of the backbone's stack of
    blocks (0: every block); a text encoder then also caches the frozen layers'
    output (:mod:`common.tasks.text_classification.frozen_prefix`).
    """

    r: int = setting(
        "lora.r", 8, "LoRA rank", check=at_least(1, "must be a positive rank such as 8")
    )
    alpha: int = setting(
        "lora.alpha",
        16,
        "LoRA scaling numerator (the update is scaled by alpha / r)",
        check=at_least(1, "must be positive"),
    )
    dropout: float = setting(
        "lora.dropout",
        0.05,
        "dropout on the LoRA branch's input",
        check=satisfies(lambda p: 0.0 <= p < 1.0, "must be in [0, 1)"),
    )
    target_modules: tuple[str, ...] = setting(
        "lora.target-modules",
        "query,value",
        "comma-separated module names, or `all-linear`; for `causal-lm` and "
        "`image-cls` the default means the backbone's usual attention targets "
        "(`q_proj,v_proj` for Llama, `c_attn` for GPT-2, `q_proj,v_proj` for ViT), "
        "else every linear layer, else every convolution (a ResNet)",
        check=satisfies(bool, "name at least one module, e.g. 'query,value'"),
        parse=comma_list,
    )
    layers: int = setting(
        "lora.layers",
        0,
        "adapt only the top N blocks (0: all): a transformer's layers (Llama's "
        "`model.layers`, GPT-2's `transformer.h`, a ViT's `layers`), a CNN's stages "
        "(`encoder.stages` of ResNet and ConvNeXt, whose stem then gets no "
        "adapter); `all-linear` then means every linear layer of those blocks, and "
        "only their tensors travel. For `text-cls` only, the frozen layers below run "
        "once per row and are cached across epochs and rounds",
        check=at_least(
            0, "must be 0 (adapt every layer) or the number of top layers to adapt"
        ),
    )
