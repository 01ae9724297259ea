"""Accuracy and loss of a classifier on encoded rows; the summable totals a site
reports for them."""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import torch
from torch import nn
from torch.nn import functional as F


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
    tokens: int = 0  # a causal language model: the tokens that carry loss

    def as_metrics(self) -> dict[str, float]:
        """The evaluation columns of a metrics line: ``eval_loss``,
        ``eval_accuracy`` and, for a causal language model, ``eval_perplexity``."""
        metrics = {"eval_loss": self.loss, "eval_accuracy": self.accuracy}
        if self.perplexity is not None:
            metrics["eval_perplexity"] = self.perplexity
        return metrics


@dataclass(frozen=True)
class EvalTotals:
    """What a site's evaluation adds to the others': sums, never means, so that the
    coordinator (or the secure sum) needs only to add them.

    Attributes
    ----------
    examples : int
        Rows scored.
    correct : int
        Correct predictions: rows for a classifier, next tokens for a causal LM.
    loss_sum : float
        Cross-entropy summed over the rows (a causal LM: the NLL over its tokens).
    tokens : int
        A causal LM's tokens that carry loss; 0 for a classifier.
    """

    examples: int = 0
    correct: int = 0
    loss_sum: float = 0.0
    tokens: int = 0

    #: Length of :meth:`as_vector`.
    WIDTH = 4

    @classmethod
    def of(cls, result: EvalResult | None) -> EvalTotals:
        """The totals behind ``result`` (``None``: a site with no rows)."""
        if result is None:
            return cls()
        weight = result.tokens or result.num_examples
        return cls(
            examples=result.num_examples,
            correct=round(result.accuracy * weight),
            loss_sum=result.loss * weight,
            tokens=result.tokens,
        )

    def as_vector(self) -> np.ndarray:
        """``(examples, correct, loss_sum, tokens)`` as ``(4,) float64``."""
        return np.array(
            [self.examples, self.correct, self.loss_sum, self.tokens], np.float64
        )

    @classmethod
    def from_vector(cls, vector: np.ndarray) -> EvalTotals:
        """The inverse of :meth:`as_vector` (counts rounded to integers)."""
        examples, correct, loss_sum, tokens = (float(v) for v in vector)
        return cls(round(examples), round(correct), loss_sum, round(tokens))

    def __add__(self, other: EvalTotals) -> EvalTotals:
        return EvalTotals(
            self.examples + other.examples,
            self.correct + other.correct,
            self.loss_sum + other.loss_sum,
            self.tokens + other.tokens,
        )

    def result(self) -> EvalResult | None:
        """Accuracy, mean loss and (a causal LM) perplexity; ``None`` without rows."""
        weight = self.tokens or self.examples
        if weight == 0:
            return None
        loss = self.loss_sum / weight
        return EvalResult(
            loss=loss,
            accuracy=self.correct / weight,
            num_examples=self.examples,
            perplexity=math.exp(min(loss, 700.0)) if self.tokens else None,
            tokens=self.tokens,
        )


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
