"""Tasks (``model.task``): what each supplies (:mod:`common.tasks.base`), one package
per task, and the registry that maps names to tasks (:mod:`common.tasks.registry`)."""

from common.tasks.base import (
    TASK_FILE,
    Classifier,
    ConfigRule,
    RunBench,
    Task,
    write_task_file,
)
from common.tasks.registry import TASKS, read_task, task_named

__all__ = [
    "TASKS",
    "TASK_FILE",
    "Classifier",
    "ConfigRule",
    "RunBench",
    "Task",
    "read_task",
    "task_named",
    "write_task_file",
]
