"""The text classifier's pooled sentence features: the encoder's output pooled per
row, what a head-only round trains on (cached by :mod:`common.feature_cache`)."""

from __future__ import annotations

import torch

from common.batching import Encoded, collate, sequential_batches
from common.console import step_progress
from common.feature_cache import FEATURE_PASS
from common.tasks.text_classification.model import TextClassifier


@torch.no_grad()
def pooled_features(
    model: TextClassifier, encoded: Encoded, pad_id: int, batch_size: int = 64
) -> torch.Tensor:
    """The pooled features of every row, in row order: ``(n, hidden) float32`` on the
    model's device (eval mode, so LoRA dropout is off). On a terminal a live bar
    counts the rows done (the "feature pass")."""
    device = next(model.head.parameters()).device
    was_training = model.training
    model.eval()
    features = torch.empty(
        (len(encoded), model.encoder.config.hidden_size), device=device
    )
    lengths = [len(ids) for ids in encoded.ids]
    with step_progress(FEATURE_PASS, len(lengths)) as advance:
        for rows in sequential_batches(lengths, batch_size):
            batch = collate(encoded, rows, pad_id)
            with torch.autocast(
                device.type, dtype=torch.bfloat16, enabled=device.type == "cuda"
            ):
                pooled = model.embed(
                    batch["input_ids"].to(device), batch["attention_mask"].to(device)
                )
            features[torch.as_tensor(rows, device=device)] = pooled.float()
            advance(len(rows))
    model.train(was_training)
    return features
