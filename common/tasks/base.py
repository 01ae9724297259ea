"""What a task (``model.task``) supplies, whatever it fine-tunes.

A task is one object (:class:`Task`) that the rest of the code asks instead of
comparing task names: how its rows are read and checked, which configurations it
refuses, the coordinator's whole model of a run (:class:`RunBench`: the seeded
initial adapter, evaluation as totals, export), and how a saved model is opened for
``predict`` or ``generate``. :mod:`common.tasks.registry` maps each name to its task
and is the only place that lists them.

Torch and transformers load only when a task opens a model, so the configuration
can read the registry cheaply.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Collection, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Protocol

if TYPE_CHECKING:
    from common.codec import AdapterState
    from common.config import DataConfig, RunConfig
    from common.config.errors import Refusal
    from common.data import Example
    from common.evaluation import EvalResult
    from common.outputs import RunOutputs
    from common.tasks.export import OnnxPlan

#: Beside a saved adapter or merged model: which task wrote it.
TASK_FILE = "fedgraft_task.json"

#: A check across configuration sections: the refusal naming the key, or ``None``.
ConfigRule = Callable[["RunConfig"], "Refusal | None"]


class RunBench(Protocol):
    """The whole model of a run, as the coordinator uses it."""

    config: RunConfig
    backbone_dir: Path
    fingerprint: str
    pooling: str
    labels: tuple[str, ...]

    def state(self) -> AdapterState:
        """The current adapter state."""
        ...

    def evaluate(
        self,
        state: AdapterState | None = None,
        labels: Collection[int] | None = None,
    ) -> EvalResult:
        """Evaluate ``state`` (or the current adapter) on the evaluation rows, or on
        those of ``labels`` only (a client's own domain; a task without a label map
        refuses ``labels``)."""
        ...

    def export(self, outputs: RunOutputs, state: AdapterState) -> None:
        """Write ``adapter/`` and ``merged/`` for ``state``."""
        ...

    def backbone_facts(self) -> dict[str, object]:
        """The backbone's name, fingerprint and sizes for ``summary.json``."""
        ...


class Classifier(Protocol):
    """A saved classifier, as ``fedgraft predict`` uses it."""

    def predict(self, inputs: list[str]) -> list[tuple[str, float]]:
        """The label and its probability for each input (a text, or an image
        path)."""
        ...


class Task(Protocol):
    """Everything one task supplies to the rest of fedgraft.

    Attributes
    ----------
    name : str
        The value of ``model.task``, and what ``fedgraft_task.json`` records.
    summary : str
        What it fine-tunes, for the key reference (``model.task``'s doc).
    noun : str
        The model it fine-tunes, with its article, for messages ("a causal language
        model").
    has_labels : bool
        Its rows carry labels from a label map (a classifier's do; a causal
        language model's do not).
    reads_instructions : bool
        It reads instruction data (``data.prompt-column``,
        ``data.response-column``).
    generates : bool
        Its saved model generates text (``fedgraft generate``).
    """

    name: str
    summary: str
    noun: str
    has_labels: bool
    reads_instructions: bool
    generates: bool

    def config_rules(self) -> tuple[ConfigRule, ...]:
        """The task's own checks of a whole configuration, in the order they run
        (after those of :mod:`common.config.constraints`)."""
        ...

    def read_rows(self, path: str, data: DataConfig) -> list[Example]:
        """The rows of ``path`` (``data.path`` or ``data.test-path``) as this task
        reads them, cached per process.

        Raises
        ------
        common.data.DataError
            When a file or row cannot be read, naming it.
        """
        ...

    def check_rows(
        self, config: RunConfig, labels: tuple[str, ...], rows: Sequence[list[Example]]
    ) -> None:
        """Refuse, before a simulation starts, labelled rows or labels that a round
        would refuse later (a label outside the map, a label the head cannot
        embed); called for a task with labels only.

        Raises
        ------
        common.data.DataError
            Naming the file, line or label.
        """
        ...

    def check_simulation_data(self, data: DataConfig) -> None:
        """Refuse a simulation without rows of this task (no ``data.path`` where the
        task has no built-in demo corpus).

        Raises
        ------
        common.data.DataError
            Naming ``data.path`` and what it must hold.
        """
        ...

    def open_bench(
        self, config: RunConfig, labels: tuple[str, ...], test_examples: list[Example]
    ) -> RunBench:
        """The coordinator's model of the run, loaded with the seeded initial adapter
        and the evaluation rows."""
        ...

    def onnx_plan(self, source: Path) -> OnnxPlan:
        """What ``fedgraft export --format onnx`` traces, writes and checks for the
        merged model in ``source``.

        Raises
        ------
        common.tasks.export.ExportError
            When ``source`` does not hold what the plan needs.
        """
        ...

    def open_classifier(self, folder: Path) -> Classifier | None:
        """The saved classifier in ``folder`` for ``predict``; ``None`` for a task
        that does not classify."""
        ...


def write_task_file(directory: Path, task: str) -> None:
    """Say beside a saved model which task wrote it."""
    (directory / TASK_FILE).write_text(json.dumps({"task": task}, indent=2))


def recorded_task(directory: Path) -> str | None:
    """The task name ``directory``'s task file records; ``None`` without one (a
    folder written before tasks existed)."""
    path = directory / TASK_FILE
    if not path.exists():
        return None
    return str(json.loads(path.read_text())["task"])
