"""The text classifier as a :class:`~common.tasks.base.Task`."""

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
class TextClassification:
    """Texts with labels, a text encoder with LoRA, pooling and a linear head."""

    name: str = "text-cls"
    summary: str = "a text classifier: encoder, pooling, linear head"
    noun: str = "a text classifier"
    has_labels: bool = True
    reads_instructions: bool = False
    generates: bool = False

    def config_rules(self) -> tuple[ConfigRule, ...]:
        return ()

    def read_rows(self, path: str, data: DataConfig) -> list[Example]:
        from common.row_cache import read_examples

        return read_examples(path, data.text_column, data.label_column)

    def check_rows(
        self, config: RunConfig, labels: tuple[str, ...], rows: Sequence[list[Example]]
    ) -> None:
        from common.data import encode_labels

        for part in rows:
            encode_labels(part, labels)
        if config.head.init != "random":  # closed-form starts from the label names
            from common.tasks.text_classification.label_head import (
                label_texts,  # loads torch: only when needed
            )

            label_texts(labels, config.head.label_descriptions)

    def check_simulation_data(self, data: DataConfig) -> None:
        """Without ``data.path`` a simulation reads the built-in demo corpus."""

    def open_bench(
        self, config: RunConfig, labels: tuple[str, ...], test_examples: list[Example]
    ) -> RunBench:
        from common.tasks.text_classification.bench import Workbench

        return Workbench.open(config, labels, test_examples)

    def onnx_plan(self, source: Path) -> OnnxPlan:
        from common.tasks.text_classification.export import onnx_plan

        return onnx_plan(source)

    def open_classifier(self, folder: Path) -> Classifier | None:
        from common.tasks.text_classification.inference import load_classifier

        return load_classifier(folder)


#: The text classifier.
TEXT_CLASSIFICATION = TextClassification()
