"""The frozen-prefix cache: when LoRA adapts only the top ``lora.layers`` encoder
layers, the layers below them never change, so their output for a row is computed
once and every later epoch and round starts from it.

One training step then runs only the adapted layers, the pooling and the head::

    tokens -> embeddings -> frozen layers   (once per row: ``prefix_states``)
    cached states -> adapted layers -> pooling -> head   (every step:
    ``logits_from_prefix``)

The cached states are computed in evaluation mode, so the frozen layers apply no
dropout to them; the adapted layers above still do. With dropout off (evaluation) the
two paths give the same logits, which ``tests/test_frozen_prefix.py`` checks.
Encoders of the BERT family (``embeddings`` and ``encoder.layer``: BERT, RoBERTa,
MiniLM, ELECTRA, XLM-R) are supported.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import nn
from transformers.masking_utils import create_bidirectional_mask

from common.batching import Encoded, sequential_batches


@dataclass(frozen=True)
class PrefixStates:
    """The output of the frozen layers for each row, without padding.

    Attributes
    ----------
    states : list[torch.Tensor]
        ``(length_i, hidden)`` float32 per row, on the model's device.
    """

    states: list[torch.Tensor]

    def __len__(self) -> int:
        return len(self.states)

    def collate(self, rows: Sequence[int]) -> tuple[torch.Tensor, torch.Tensor]:
        """The chosen rows padded to their longest member.

        Returns
        -------
        hidden : torch.Tensor
            ``(batch, width, hidden)``; padding positions are zero (masked out).
        attention_mask : torch.Tensor
            ``(batch, width)`` int64, 1 on real tokens.
        """
        chosen = [self.states[r] for r in rows]
        width = max(len(s) for s in chosen)
        first = chosen[0]
        hidden = first.new_zeros((len(chosen), width, first.shape[-1]))
        mask = torch.zeros(
            (len(chosen), width), dtype=torch.long, device=first.device
        )  # (batch, width)
        for line, state in enumerate(chosen):
            hidden[line, : len(state)] = state
            mask[line, : len(state)] = 1
        return hidden, mask


def encoder_parts(encoder: nn.Module) -> tuple[nn.Module, nn.Module, nn.ModuleList]:
    """The base model, its embeddings and its layer stack, under any PEFT wrapper.

    Raises
    ------
    ValueError
        When the encoder has no ``embeddings`` and ``encoder.layer`` (not a BERT-family
        encoder), naming ``lora.layers``.
    """
    base = encoder.get_base_model() if hasattr(encoder, "get_base_model") else encoder
    layers = getattr(getattr(base, "encoder", None), "layer", None)
    if not isinstance(layers, nn.ModuleList) or not hasattr(base, "embeddings"):
        raise ValueError(
            f"lora.layers: the frozen-prefix cache needs a BERT-family encoder "
            f"(embeddings and encoder.layer); {type(base).__name__} has neither. "
            "Set lora.layers = 0 to adapt every layer"
        )
    return base, base.embeddings, layers


def layer_count(encoder: nn.Module) -> int:
    """Number of transformer layers of ``encoder``."""
    return len(encoder_parts(encoder)[2])


def _mask(
    base: nn.Module, hidden: torch.Tensor, attention_mask: torch.Tensor
) -> torch.Tensor | None:
    """The attention mask the layers of ``base`` expect (None: attend everywhere)."""
    return create_bidirectional_mask(
        config=base.config, inputs_embeds=hidden, attention_mask=attention_mask
    )


@torch.no_grad()
def prefix_states(
    encoder: nn.Module,
    depth: int,
    encoded: Encoded,
    pad_id: int,
    batch_size: int = 64,
) -> PrefixStates:
    """Run the embeddings and the ``depth`` lowest layers once over every row.

    The encoder is put in evaluation mode for this (no dropout) and restored.
    """
    base, embeddings, layers = encoder_parts(encoder)
    device = next(base.parameters()).device
    was_training = base.training
    base.eval()
    states: list[torch.Tensor | None] = [None] * len(encoded)
    try:
        for rows in sequential_batches([len(i) for i in encoded.ids], batch_size):
            width = max(len(encoded.ids[r]) for r in rows)
            ids = torch.full((len(rows), width), pad_id, dtype=torch.long)
            mask = torch.zeros((len(rows), width), dtype=torch.long)
            for line, row in enumerate(rows):
                ids[line, : len(encoded.ids[row])] = torch.tensor(encoded.ids[row])
                mask[line, : len(encoded.ids[row])] = 1
            ids, mask = ids.to(device), mask.to(device)
            hidden = embeddings(input_ids=ids)  # (batch, width, hidden)
            layer_mask = _mask(base, hidden, mask)
            for layer in layers[:depth]:
                hidden = layer(hidden, layer_mask)
            for line, row in enumerate(rows):
                states[row] = hidden[line, : len(encoded.ids[row])].float().clone()
    finally:
        base.train(was_training)
    return PrefixStates([s for s in states if s is not None])


def hidden_from_prefix(
    encoder: nn.Module, depth: int, hidden: torch.Tensor, attention_mask: torch.Tensor
) -> torch.Tensor:
    """The encoder's last hidden state ``(batch, width, hidden)`` from the cached
    output of its ``depth`` lowest layers."""
    base, _, layers = encoder_parts(encoder)
    layer_mask = _mask(base, hidden, attention_mask)
    for layer in layers[depth:]:
        hidden = layer(hidden, layer_mask)
    return hidden
