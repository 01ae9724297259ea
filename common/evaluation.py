"""Accuracy and loss of a classifier on encoded rows."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
from torch import nn
from torch.nn import functional as F

from common.batching import Encoded
from common.features import pooled_features
from common.model import TextClassifier


@dataclass(frozen=True)
class EvalResult:
    """Mean cross-entropy and accuracy over ``num_examples`` rows.

    For a causal language model (``model.task = causal-lm``) the loss is the mean
    over the tokens that carry loss, the accuracy is next-token accuracy on them, and
    ``perplexity`` is ``exp(loss)``; classifiers leave it ``None``.
    """

    loss: float
    accuracy: float
    num_examples: int
    perplexity: float | None = None

    def as_metrics(self) -> dict[str, float]:
        """The evaluation columns of a metrics line: ``eval_loss``,
        ``eval_accuracy`` and, for a causal language model, ``eval_perplexity``."""
        metrics = {"eval_loss": self.loss, "eval_accuracy": self.accuracy}
        if self.perplexity is not None:
            metrics["eval_perplexity"] = self.perplexity
        return metrics


@torch.no_grad()
def evaluate_head(
    head: nn.Linear, features: torch.Tensor, labels: np.ndarray
) -> EvalResult:
    """Evaluate ``head`` on pooled ``features`` ``(n, hidden)`` with ``labels``."""
    logits = head(features.to(head.weight.dtype)).float()  # (n, num_labels)
    targets = torch.from_numpy(labels).to(logits.device)
    count = len(labels)
    return EvalResult(
        loss=F.cross_entropy(logits, targets).item(),
        accuracy=(logits.argmax(-1) == targets).sum().item() / count,
        num_examples=count,
    )


def evaluate(model: TextClassifier, encoded: Encoded, pad_id: int) -> EvalResult:
    """Evaluate ``model`` on every row of ``encoded`` (eval mode, no gradients)."""
    return evaluate_head(
        model.head, pooled_features(model, encoded, pad_id), encoded.labels
    )
