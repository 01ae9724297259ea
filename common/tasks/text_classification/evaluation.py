"""The text classifier's accuracy and loss on encoded rows."""

from __future__ import annotations

from common.batching import Encoded
from common.evaluation import EvalResult, evaluate_head
from common.tasks.text_classification.features import pooled_features
from common.tasks.text_classification.model import TextClassifier


def evaluate(model: TextClassifier, encoded: Encoded, pad_id: int) -> EvalResult:
    """Evaluate ``model`` on every row of ``encoded`` (eval mode, no gradients)."""
    return evaluate_head(
        model.head, pooled_features(model, encoded, pad_id), encoded.labels
    )
