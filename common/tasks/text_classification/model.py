"""The trainable model: a frozen encoder with LoRA adapters, backbone-native pooling
and a linear classification head; and the adapter state that travels between parties.
"""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Mapping
from pathlib import Path

import numpy as np
import torch
from peft import LoraConfig, get_peft_model
from peft.utils import get_peft_model_state_dict, set_peft_model_state_dict
from torch import nn
from transformers import AutoModel, PreTrainedModel

from common.codec import AdapterState
from common.config import LoraSettings
from common.lora_targets import (
    adapted_layers,
    block_stack,
    linear_inside,
    require_same_tensors,
)
from common.quantised import load_frozen
from common.sharing import HEAD_PREFIX
from common.tasks.text_classification.frozen_prefix import (
    hidden_from_prefix,
    layer_count,
)


def pool(hidden: torch.Tensor, attention_mask: torch.Tensor, mode: str) -> torch.Tensor:
    """Pool token states ``(batch, seq, hidden)`` into ``(batch, hidden)``.

    ``mean`` averages the non-padding tokens, ``max`` takes the per-feature maximum over
    them, ``cls`` takes the first token.
    """
    if mode == "cls":
        return hidden[:, 0]
    mask = attention_mask.unsqueeze(-1).to(hidden.dtype)  # (batch, seq, 1)
    if mode == "mean":
        return (hidden * mask).sum(1) / mask.sum(1).clamp(min=1e-9)
    if mode == "max":
        return (
            hidden.masked_fill(mask == 0, torch.finfo(hidden.dtype).min).max(1).values
        )
    raise ValueError(f"pooling mode {mode!r} is not one of mean, cls, max")


class TextClassifier(nn.Module):
    """Encoder (optionally wrapped by PEFT), pooling, and a linear head.

    Parameters
    ----------
    encoder : PreTrainedModel or PeftModel
        Produces ``last_hidden_state``.
    pooling : str
        ``mean``, ``cls`` or ``max``, as the backbone was trained.
    num_labels : int
        Size of the head's output.
    prefix_depth : int
        Number of lowest encoder layers that carry no adapter (``lora.layers``): their
        output can be cached (:mod:`~common.tasks.text_classification.frozen_prefix`);
        0 when every layer adapts.
    """

    def __init__(
        self,
        encoder: nn.Module,
        pooling: str,
        num_labels: int,
        prefix_depth: int = 0,
    ) -> None:
        super().__init__()
        self.encoder = encoder
        self.pooling = pooling
        self.prefix_depth = prefix_depth
        hidden = encoder.config.hidden_size
        self.head = nn.Linear(hidden, num_labels)

    def embed(
        self, input_ids: torch.Tensor, attention_mask: torch.Tensor
    ) -> torch.Tensor:
        """Pooled sentence features ``(batch, hidden)``: what the head reads."""
        hidden = self.encoder(
            input_ids=input_ids, attention_mask=attention_mask
        ).last_hidden_state
        return pool(hidden, attention_mask, self.pooling)

    def forward(
        self, input_ids: torch.Tensor, attention_mask: torch.Tensor
    ) -> torch.Tensor:
        """Logits ``(batch, num_labels)``."""
        pooled = self.embed(input_ids, attention_mask)
        return self.head(pooled.to(self.head.weight.dtype))

    def logits_from_prefix(
        self, hidden: torch.Tensor, attention_mask: torch.Tensor
    ) -> torch.Tensor:
        """Logits ``(batch, num_labels)`` from the cached output ``(batch, width,
        hidden)`` of the ``prefix_depth`` frozen layers."""
        last = hidden_from_prefix(
            self.encoder, self.prefix_depth, hidden, attention_mask
        )
        pooled = pool(last, attention_mask, self.pooling)
        return self.head(pooled.to(self.head.weight.dtype))


def lora_config(settings: LoraSettings, num_layers: int = 0) -> LoraConfig:
    """PEFT's LoraConfig for our settings (feature extraction: no task head in PEFT).

    Parameters
    ----------
    num_layers : int
        The encoder's layer count; needed when ``settings.layers`` limits LoRA to the
        top layers.
    """
    targets: str | list[str] = (
        "all-linear"
        if settings.target_modules == ("all-linear",)
        else list(settings.target_modules)
    )
    return LoraConfig(
        r=settings.r,
        lora_alpha=settings.alpha,
        lora_dropout=settings.dropout,
        target_modules=targets,
        bias="none",
        layers_to_transform=(
            adapted_layers(num_layers, settings.layers) if settings.layers else None
        ),
        layers_pattern="layer" if settings.layers else None,
    )


def load_encoder(
    backbone_dir: Path, device: torch.device | str = "cpu", quantize: str = "none"
) -> PreTrainedModel:
    """Load the frozen text encoder (safetensors are memory-mapped by transformers);
    ``quantize`` (``model.quantize``) as in :func:`common.quantised.load_frozen`."""
    return load_frozen(AutoModel, backbone_dir, device, quantize)


def attach_lora(
    encoder: PreTrainedModel,
    settings: LoraSettings,
    pooling: str,
    num_labels: int,
    seed: int,
) -> TextClassifier:
    """Wrap ``encoder`` with LoRA adapters and add a seeded head.

    The adapter's A matrices and the head are drawn from ``seed``, so the coordinator
    and any party can rebuild the same initial global adapter.

    Raises
    ------
    ValueError
        When a LoRA target module does not exist in the encoder, naming the key.
    """
    num_layers = layer_count(encoder) if settings.layers else 0
    prefix_depth = num_layers - settings.layers if settings.layers else 0
    if settings.layers and settings.target_modules == ("all-linear",):
        # PEFT takes layer indices with a list of names only.
        names = linear_inside(encoder, block_stack(encoder)[0])
        settings = dataclasses.replace(settings, target_modules=tuple(names))
    generator_state = torch.random.get_rng_state()
    torch.manual_seed(seed)
    try:
        try:
            peft_encoder = get_peft_model(encoder, lora_config(settings, num_layers))
        except ValueError as error:
            names = sorted(
                {
                    n.rsplit(".", 1)[-1]
                    for n, m in encoder.named_modules()
                    if isinstance(m, nn.Linear)
                }
            )
            raise ValueError(
                f"lora.target-modules = {','.join(settings.target_modules)} "
                "matches no layer "
                f"of this backbone ({error}); linear layers here: {', '.join(names)}, "
                "or use all-linear"
            ) from None
        model = TextClassifier(peft_encoder, pooling, num_labels, prefix_depth)
        nn.init.normal_(model.head.weight, std=0.02)
        nn.init.zeros_(model.head.bias)
    finally:
        torch.random.set_rng_state(generator_state)
    return model.to(next(encoder.parameters()).device)


def adapter_state(model: TextClassifier) -> AdapterState:
    """The trainable state: LoRA weights (PEFT's names) and the head, as float32
    numpy."""
    state = get_peft_model_state_dict(model.encoder)
    state.update({HEAD_PREFIX + k: v for k, v in model.head.state_dict().items()})
    return {
        k: v.detach().to("cpu", torch.float32).numpy().copy() for k, v in state.items()
    }


def load_adapter_state(model: TextClassifier, state: Mapping[str, np.ndarray]) -> None:
    """Overwrite every trainable tensor of ``model`` with ``state``.

    Raises
    ------
    KeyError
        When ``state`` lacks a tensor of the model or holds one it does not have.
    """
    expected = set(get_peft_model_state_dict(model.encoder)) | {
        HEAD_PREFIX + k for k in model.head.state_dict()
    }
    require_same_tensors(expected, state)
    device = next(model.head.parameters()).device
    lora = {
        k: torch.from_numpy(np.asarray(v))
        for k, v in state.items()
        if not k.startswith(HEAD_PREFIX)
    }
    result = set_peft_model_state_dict(model.encoder, lora)
    if getattr(result, "unexpected_keys", None):
        raise KeyError(
            f"adapter state has keys PEFT does not know: {result.unexpected_keys[:3]}"
        )
    head = {
        k.removeprefix(HEAD_PREFIX): torch.from_numpy(np.asarray(v)).to(device)
        for k, v in state.items()
        if k.startswith(HEAD_PREFIX)
    }
    model.head.load_state_dict(head)


def save_head(model: TextClassifier, directory: Path, labels: tuple[str, ...]) -> None:
    """Write the head, its pooling mode and the label map beside a saved encoder."""
    from safetensors.torch import save_file

    directory.mkdir(parents=True, exist_ok=True)
    save_file(
        {k: v.detach().cpu().contiguous() for k, v in model.head.state_dict().items()},
        str(directory / "head.safetensors"),
    )
    (directory / "fedgraft_head.json").write_text(
        json.dumps({"pooling": model.pooling, "labels": list(labels)}, indent=2)
    )
