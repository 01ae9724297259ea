"""The text classifier (``model.task = text-cls``): a text encoder, pooling and a
linear head.

Its parts, as modules of this package: ``model`` (the classifier), ``label_head``
(head initialisation from label names), ``features`` and ``frozen_prefix`` (what
head-only and partial-depth rounds reuse), ``evaluation``, ``saving`` (``adapter/``
and ``merged/``), ``inference`` (the saved model), ``bench`` (the coordinator's
model of a run), ``export`` (its ONNX plan), ``task`` (its Task).
"""

from common.tasks.text_classification.task import (
    TEXT_CLASSIFICATION,
    TextClassification,
)

__all__ = ["TEXT_CLASSIFICATION", "TextClassification"]
