"""The image classifier (``model.task = image-cls``): an image backbone, pooling and
a linear head.

Its parts: :mod:`common.tasks.image_classification.model` (the classifier, its saved form and the image
processor), :mod:`common.tasks.image_classification.data` (image folders and listings) and
:mod:`common.tasks.image_classification.bench` (the coordinator's model of a run).
"""

from common.tasks.image_classification.task import (
    IMAGE_CLASSIFICATION,
    ImageClassification,
)

__all__ = ["IMAGE_CLASSIFICATION", "ImageClassification"]
