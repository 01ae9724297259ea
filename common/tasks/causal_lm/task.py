"""The causal language model as a :class:`~common.tasks.base.Task`."""

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
class CausalLM:
    """Plain text or instruction rows, a causal language model with LoRA, no
    head."""

    name: str = "causal-lm"
    summary: str = "a causal language model, no head; evaluated by perplexity"
    noun: str = "a causal language model"
    has_labels: bool = False
    reads_instructions: bool = True
    generates: bool = True

    def config_rules(self) -> tuple[ConfigRule, ...]:
        from common.tasks.causal_lm.checks import RULES

        return RULES

    def read_rows(self, path: str, data: DataConfig) -> list[Example]:
        from common.row_cache import read_watched
        from common.tasks.causal_lm.data import load_lm_examples

        columns = (data.text_column, data.prompt_column, data.response_column)
        return read_watched(path, load_lm_examples, columns)

    def check_rows(
        self, config: RunConfig, labels: tuple[str, ...], rows: Sequence[list[Example]]
    ) -> None:
        """A language model's rows have no labels to check (never called:
        ``has_labels`` is false)."""

    def check_simulation_data(self, data: DataConfig) -> None:
        """Without ``data.path`` a simulation reads the built-in demo corpus."""

    def open_bench(
        self, config: RunConfig, labels: tuple[str, ...], test_examples: list[Example]
    ) -> RunBench:
        from common.tasks.causal_lm.bench import CausalLMWorkbench

        return CausalLMWorkbench.open(config, labels, test_examples)

    def onnx_plan(self, source: Path) -> OnnxPlan:
        from common.tasks.causal_lm.export import onnx_plan

        return onnx_plan(source)

    def open_classifier(self, folder: Path) -> Classifier | None:
        return None


#: The causal language model.
CAUSAL_LM = CausalLM()
