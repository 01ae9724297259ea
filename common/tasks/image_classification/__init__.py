"""The image classifier (``model.task = image-cls``): an image backbone, pooling and
a linear head.

Its parts, as modules of this package: ``model`` (the classifier, its saved form and
the image processor), ``data`` (image folders and listings), ``bench`` (the
coordinator's model of a run), ``checks`` (its config rules), ``export`` (its ONNX
plan), ``task`` (its Task).
"""

from common.tasks.image_classification.task import (
    IMAGE_CLASSIFICATION,
    ImageClassification,
)

__all__ = ["IMAGE_CLASSIFICATION", "ImageClassification"]
