"""What reaches the console: fedgraft's own lines, without the libraries' noise.

By default the console shows what a user acts on: fedgraft's INFO lines (the data,
the backbone, one line per round, the summary) and every library's warnings and
errors, except the few listed in :data:`QUIET_LOGGERS` and :data:`QUIET_WARNINGS`,
each of which fires on every run and asks nothing of the user. ``--verbose`` (the
``FEDGRAFT_VERBOSE`` environment variable, which the Ray workers inherit) lets all of
them through and adds Flower's DEBUG lines.

Nothing here is a blanket filter: each entry names one logger or one warning message,
with the reason it is quiet.
"""

from __future__ import annotations

import logging
import os
import warnings
from collections.abc import Callable, Iterator
from contextlib import contextmanager

from rich.console import Console
from rich.progress import (
    BarColumn,
    MofNCompleteColumn,
    Progress,
    TextColumn,
    TimeElapsedColumn,
    TimeRemainingColumn,
)

#: Set to "1" by ``--verbose``; read again in every process that runs the apps.
VERBOSE_ENV = "FEDGRAFT_VERBOSE"

#: logger -> why its WARNING lines are kept off the console (ERROR still shows).
QUIET_LOGGERS: dict[str, str] = {
    # peft imports bitsandbytes whenever it is installed; on a CPU bitsandbytes then
    # tries to fetch an optimised kernel from the Hugging Face hub, fails (offline, or
    # an untrusted publisher) and falls back to its own kernel, which is what runs
    # anyway. Nothing to act on, in every process of every run.
    "bitsandbytes.backends.cpu.ops": "hub kernel fallback on a CPU",
    # MLflow announces (at INFO, through its own handler) that it creates and
    # migrates the tables of a new SQLite store (tracking.mlflow-uri).
    "mlflow.store.db.utils": "SQLite store set-up notices",
}

#: (category, message prefix) -> why the warning is kept off the console.
QUIET_WARNINGS: dict[tuple[type[Warning], str], str] = {
    # bitsandbytes' import compiles with torch.compile, which imports torch's own
    # torch.utils.mkldnn: torch warns about its own deprecated decorator.
    (DeprecationWarning, "`torch.jit.script_method` is deprecated"): "torch internal",
    # Ray's notice of a future default. fedgraft relies on today's: a virtual client
    # given no GPU (sim.gpus-per-client = 0) sees none, so opting in would change
    # where clients train.
    (FutureWarning, "Tip: In future versions of Ray"): "Ray's future default",
    # peft reads transformers' old attribute name when it wraps a model.
    (FutureWarning, "`is_gradient_checkpointing` is deprecated"): "peft internal",
    # MLflow's SQL store maps its tables with a loader option SQLAlchemy deprecates.
    (DeprecationWarning, "The ``noload`` loader strategy is deprecated"): (
        "MLflow internal"
    ),
}

#: Flower's records kept off the console -> why.
QUIET_FLOWER_NOTICES: dict[str, str] = {
    # fedgraft calls run_simulation on purpose (it runs app objects built from the
    # validated config; `flwr run .` is documented too): nothing for the user to do.
    "The `run_simulation` function is deprecated": "fedgraft's choice",
    # Each Ray worker says so when Flower stops it at the end of every run.
    "Manually terminating ClientAppActor": "normal shutdown",
}


def is_verbose() -> bool:
    """Whether ``--verbose`` was given to this process or to the one that started
    it."""
    return os.environ.get(VERBOSE_ENV) == "1"


def quiet_library_noise(verbose: bool | None = None) -> None:
    """Keep :data:`QUIET_LOGGERS` and :data:`QUIET_WARNINGS` off the console, or
    let them through again when verbose.

    Called where a process imports fedgraft's apps, before they import peft (which
    imports bitsandbytes), and again by :func:`configure_console`.

    Parameters
    ----------
    verbose : bool, optional
        Default: :func:`is_verbose`.
    """
    verbose = is_verbose() if verbose is None else verbose
    for name in QUIET_LOGGERS:
        logging.getLogger(name).setLevel(logging.NOTSET if verbose else logging.ERROR)
    for category, prefix in QUIET_WARNINGS:
        action = "default" if verbose else "ignore"
        warnings.filterwarnings(action, message=prefix, category=category)
    flower = logging.getLogger("flwr")
    for old in [f for f in flower.filters if isinstance(f, _DropFlowerNotices)]:
        flower.removeFilter(old)  # a second call (tests, a library user) starts clean
    if not verbose:
        flower.addFilter(_DropFlowerNotices())


class _DropFlowerNotices(logging.Filter):
    """Drops the Flower records named in :data:`QUIET_FLOWER_NOTICES` alone."""

    def filter(self, record: logging.LogRecord) -> bool:
        message = record.getMessage()
        return not any(notice in message for notice in QUIET_FLOWER_NOTICES)


def configure_console(verbose: bool) -> None:
    """Set up the console of a ``fedgraft`` command.

    fedgraft's loggers print INFO (DEBUG with ``verbose``), other libraries WARNING
    and above. Flower's logger keeps its own handler and no longer propagates, so
    its records are printed once, without its DEBUG lines; the hub's progress bars
    (weights loading, shards writing) are off, fedgraft shows its own progress.

    Parameters
    ----------
    verbose : bool
        Let everything through: Flower's DEBUG lines, the hub's progress bars and
        the quiet loggers and warnings.
    """
    os.environ[VERBOSE_ENV] = "1" if verbose else "0"
    if not verbose:
        # Read when huggingface_hub is imported, here and in the Ray workers.
        os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
    logging.basicConfig(
        level=logging.WARNING, format="%(asctime)s %(levelname)s %(name)s: %(message)s"
    )
    ours = logging.DEBUG if verbose else logging.INFO
    for name in ("fedgraft", "common", "client", "server", "simulations"):
        logging.getLogger(name).setLevel(ours)
    logging.getLogger("flwr").propagate = False  # Flower prints via its own handler
    if verbose:
        os.environ.setdefault("FLWR_LOG_LEVEL", "DEBUG")  # read when flwr loads
    quiet_library_noise(verbose)


def progress_bar(console: Console, transient: bool = False) -> Progress:
    """fedgraft's live bar: description, bar, done/total, elapsed time, ETA."""
    return Progress(
        TextColumn("{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        TimeElapsedColumn(),
        TextColumn("ETA"),
        TimeRemainingColumn(),
        console=console,
        transient=transient,
    )


@contextmanager
def step_progress(
    description: str, total: int, console: Console | None = None
) -> Iterator[Callable[[], None]]:
    """A live bar for a long step, shown only when ``console`` is a terminal.

    Yields a function to call once per finished item. Piped or in CI nothing is
    drawn: the step's log lines are the record.

    Parameters
    ----------
    description : str
        What the step does (``"clients trained alone"``).
    total : int
        Items in the step.
    console : Console, optional
        Default: stdout.
    """
    console = console or Console()
    if not console.is_terminal:
        yield lambda: None
        return
    progress = progress_bar(console, transient=True)
    with progress:
        task = progress.add_task(description, total=total)
        yield lambda: progress.advance(task)
