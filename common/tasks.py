"""What differs between the tasks (``model.task``) on the coordinator's side.

- ``text-cls``: a text encoder, pooling and a linear head (:mod:`common.workbench`);
- ``causal-lm``: a causal language model, no head, evaluated by perplexity
  (:mod:`common.causal_lm_bench`);
- ``image-cls``: an image backbone, pooling and a linear head
  (:mod:`common.vision_bench`).

Each has a workbench with the same surface (:class:`RunBench`): the coordinator builds
the initial adapter, evaluates every round and exports through it, whatever the task.
Saved models carry a small ``fedgraft_task.json`` that says which task wrote them.
"""

from __future__ import annotations

import json
from collections.abc import Collection, Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol

if TYPE_CHECKING:
    from common.codec import AdapterState
    from common.config import RunConfig
    from common.data import Example
    from common.evaluation import EvalResult
    from common.outputs import RunOutputs
    from common.reporting import RoundRecorder

TEXT_CLASSIFICATION = "text-cls"
CAUSAL_LM = "causal-lm"
IMAGE_CLASSIFICATION = "image-cls"
#: Beside a saved adapter or merged model: which task wrote it.
TASK_FILE = "fedgraft_task.json"


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

    def finish_run(
        self,
        kind: str,
        outputs: RunOutputs,
        recorder: RoundRecorder,
        state: AdapterState,
        started: float,
        extra: Mapping[str, Any] | None = None,
    ) -> None:
        """Export ``state``, write ``summary.json`` and print the per-round table."""
        ...


def open_bench(
    config: RunConfig, labels: tuple[str, ...], test_examples: list[Example]
) -> RunBench:
    """The workbench of ``config``'s task, loaded with the seeded initial adapter and
    the evaluation rows."""
    task = config.model.task
    if task == CAUSAL_LM:
        from common.causal_lm_bench import CausalLMWorkbench

        return CausalLMWorkbench.open(config, labels, test_examples)
    if task == IMAGE_CLASSIFICATION:
        from common.vision_bench import VisionWorkbench

        return VisionWorkbench.open(config, labels, test_examples)
    from common.workbench import Workbench

    return Workbench.open(config, labels, test_examples)


def write_task_file(directory: Path, task: str) -> None:
    """Say beside a saved model which task wrote it."""
    (directory / TASK_FILE).write_text(json.dumps({"task": task}, indent=2))


def read_task(directory: Path) -> str:
    """The task a saved model was written for; ``text-cls`` for folders written
    before tasks existed (they have no task file)."""
    path = directory / TASK_FILE
    if not path.exists():
        return TEXT_CLASSIFICATION
    return str(json.loads(path.read_text())["task"])
