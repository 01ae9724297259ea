"""Accuracy and loss of a classifier on encoded rows."""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch.nn import functional as F

from common.batching import Encoded, collate, sequential_batches
from common.model import TextClassifier


@dataclass(frozen=True)
class EvalResult:
    """Mean cross-entropy and accuracy over ``num_examples`` rows."""

    loss: float
    accuracy: float
    num_examples: int


@torch.no_grad()
def evaluate(
    model: TextClassifier, encoded: Encoded, pad_id: int, batch_size: int = 64
) -> EvalResult:
    """Evaluate ``model`` on every row of ``encoded`` (eval mode, no gradients)."""
    device = next(model.head.parameters()).device
    was_training = model.training
    model.eval()
    total_loss, correct = 0.0, 0
    lengths = [len(ids) for ids in encoded.ids]
    for rows in sequential_batches(lengths, batch_size):
        batch = {k: v.to(device) for k, v in collate(encoded, rows, pad_id).items()}
        with torch.autocast(
            device.type, dtype=torch.bfloat16, enabled=device.type == "cuda"
        ):
            logits = model(batch["input_ids"], batch["attention_mask"])
        logits = logits.float()
        total_loss += F.cross_entropy(logits, batch["labels"], reduction="sum").item()
        correct += (logits.argmax(-1) == batch["labels"]).sum().item()
    model.train(was_training)
    count = len(encoded)
    return EvalResult(
        loss=total_loss / count, accuracy=correct / count, num_examples=count
    )
