"""The image classifier as a :class:`~common.tasks.base.Task`."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from common.config import DataConfig, RunConfig
    from common.data import Example
    from common.tasks.base import Classifier, ConfigRule, RunBench
    from common.tasks.export import OnnxPlan


@dataclass(frozen=True)
class ImageClassification:
    """Images with labels, an image backbone with LoRA, pooling and a linear
    head."""

    name: str = "image-cls"
    summary: str = "an image backbone, pooling, linear head"
    noun: str = "an image classifier"
    has_labels: bool = True
    reads_instructions: bool = False
    generates: bool = False

    def config_rules(self) -> tuple[ConfigRule, ...]:
        from common.tasks.image_classification.checks import RULES

        return RULES

    def read_rows(self, path: str, data: DataConfig) -> list[Example]:
        from common.row_cache import read_watched
        from common.tasks.image_classification.data import load_image_examples

        return read_watched(
            path, load_image_examples, (data.image_column, data.label_column)
        )

    def check_rows(
        self, config: RunConfig, labels: tuple[str, ...], rows: Sequence[list[Example]]
    ) -> None:
        from common.data import encode_labels

        for part in rows:
            encode_labels(part, labels)

    def check_simulation_data(self, data: DataConfig) -> None:
        from common.data import DataError

        if not data.path:
            raise DataError(
                "data.path: a simulation of model.task = image-cls needs images (an "
                "image folder with one sub-folder per class, or a .csv/.jsonl file "
                "listing image paths and labels); there is no built-in image corpus"
            )

    def open_bench(
        self, config: RunConfig, labels: tuple[str, ...], test_examples: list[Example]
    ) -> RunBench:
        from common.tasks.image_classification.bench import VisionWorkbench

        return VisionWorkbench.open(config, labels, test_examples)

    def onnx_plan(self, source: Path) -> OnnxPlan:
        from common.tasks.image_classification.export import onnx_plan

        return onnx_plan(source)

    def open_classifier(self, folder: Path) -> Classifier | None:
        from common.tasks.image_classification.model import MergedImageClassifier

        return MergedImageClassifier.load(folder)


#: The image classifier.
IMAGE_CLASSIFICATION = ImageClassification()
