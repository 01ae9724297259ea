"""Every task by name: the only place that lists them.

Adding a task means one package under :mod:`common.tasks` and one line in
:data:`_DECLARED`; its site side goes into :mod:`client.sites`.
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from types import MappingProxyType

from common.tasks.base import Task, recorded_task
from common.tasks.causal_lm import CAUSAL_LM
from common.tasks.image_classification import IMAGE_CLASSIFICATION
from common.tasks.text_classification import TEXT_CLASSIFICATION

_DECLARED: tuple[Task, ...] = (TEXT_CLASSIFICATION, CAUSAL_LM, IMAGE_CLASSIFICATION)

#: Every task by its ``model.task`` name, in the order the key reference lists them.
TASKS: Mapping[str, Task] = MappingProxyType({task.name: task for task in _DECLARED})

#: The task of a saved model without a task file (written before tasks existed).
_UNRECORDED = TEXT_CLASSIFICATION


def task_named(name: str) -> Task:
    """The task called ``name`` (``model.task``).

    Raises
    ------
    ValueError
        When no task has that name, listing those that exist.
    """
    try:
        return TASKS[name]
    except KeyError:
        raise ValueError(
            f"model.task = {name!r} is not a task; expected one of {', '.join(TASKS)}"
        ) from None


def read_task(directory: Path) -> str:
    """The name of the task a saved model was written for; ``text-cls`` for folders
    written before tasks existed (they have no task file)."""
    recorded = recorded_task(directory)
    return _UNRECORDED.name if recorded is None else recorded
