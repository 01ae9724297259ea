"""The text classifier (``model.task = text-cls``): a text encoder, pooling and a
linear head.

Its parts: :mod:`common.model` (the classifier), :mod:`common.label_head` (head
initialisation from label names), :mod:`common.features` and
:mod:`common.frozen_prefix` (what head-only and partial-depth rounds reuse),
:mod:`common.evaluation`, :mod:`common.inference` (the saved model) and
:mod:`common.workbench` (the coordinator's model of a run).
"""

from common.tasks.text_classification.task import TEXT_CLASSIFICATION, TextClassification

__all__ = ["TEXT_CLASSIFICATION", "TextClassification"]
