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
import sys
import warnings
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Protocol, TextIO

from rich import get_console
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
    # Opacus asks for its secure_mode (torchcsprng, which no longer builds);
    # fedgraft's DP-SGD draws its noise from the OS's CSPRNG itself (common/dp.py).
    (UserWarning, "Secure RNG turned off"): "DP-SGD noise is CSPRNG already",
    # Opacus' hooks fire on a frozen embedding's output: the per-sample gradients of
    # the trainable layers are computed all the same (tests/test_dp.py checks them).
    (UserWarning, "Full backward hook is firing when gradients are computed"): (
        "Opacus hooks, frozen inputs"
    ),
    # Flower Datasets' shard partitioner sorts with a pyarrow option pyarrow 25
    # deprecates.
    (FutureWarning, "Specifying null_placement in SortOptions is deprecated"): (
        "Flower Datasets internal"
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
    imports bitsandbytes), and again by :func:`configure_console`. Unless verbose,
    the hub's progress bars (weights loading, shards writing) are off too, also in
    the processes ``flwr run`` starts: fedgraft draws its own progress.

    Parameters
    ----------
    verbose : bool, optional
        Default: :func:`is_verbose`.
    """
    verbose = is_verbose() if verbose is None else verbose
    if not verbose:
        _hub_progress_bars_off()
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


def _hub_progress_bars_off() -> None:
    """Turn off the tqdm bars of huggingface_hub and transformers.

    Both read ``HF_HUB_DISABLE_PROGRESS_BARS`` when imported (here before they
    are, and in every Ray worker, which inherits the variable); a library already
    imported is told directly. Neither is imported here for this.
    """
    os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
    if os.environ["HF_HUB_DISABLE_PROGRESS_BARS"] != "1":
        return  # the user asked for them
    if "huggingface_hub" in sys.modules:
        from huggingface_hub.utils import disable_progress_bars

        disable_progress_bars()
    if "transformers" in sys.modules:
        from transformers.utils import logging as transformers_logging

        transformers_logging.disable_progress_bar()


class _DropFlowerNotices(logging.Filter):
    """Drops the Flower records named in :data:`QUIET_FLOWER_NOTICES` alone."""

    def filter(self, record: logging.LogRecord) -> bool:
        message = record.getMessage()
        return not any(notice in message for notice in QUIET_FLOWER_NOTICES)


class CurrentStderrHandler(logging.StreamHandler):  # type: ignore[type-arg]
    """A log handler that writes to ``sys.stderr`` as it is when a record comes.

    While a live bar is drawn, rich puts a proxy in ``sys.stderr`` that prints each
    line above the bars; a handler holding the stream it was created with would
    write into the bars' line instead.
    """

    @property  # type: ignore[override]
    def stream(self) -> TextIO:
        return sys.stderr

    @stream.setter
    def stream(self, value: TextIO) -> None:
        del value  # always the current sys.stderr


def configure_console(verbose: bool) -> None:
    """Set up the console of a ``fedgraft`` command.

    fedgraft's loggers print INFO (DEBUG with ``verbose``), other libraries WARNING
    and above. Flower's logger keeps its own handler and no longer propagates, so
    its records are printed once, without its DEBUG lines; the hub's progress bars
    (weights loading, shards writing) are off, fedgraft shows its own progress, and
    log lines are printed above its live bars (:class:`CurrentStderrHandler`).

    Parameters
    ----------
    verbose : bool
        Let everything through: Flower's DEBUG lines, the hub's progress bars and
        the quiet loggers and warnings.
    """
    os.environ[VERBOSE_ENV] = "1" if verbose else "0"
    logging.basicConfig(
        level=logging.WARNING,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
        handlers=[CurrentStderrHandler()],
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


class Advance(Protocol):
    """Counts finished items of a step: ``advance()`` one, ``advance(n)`` n."""

    def __call__(self, done: int = 1) -> None: ...


def _nothing(done: int = 1) -> None:
    """The bar of a step not on a terminal: nothing to draw."""


@contextmanager
def step_progress(
    description: str, total: int, console: Console | None = None
) -> Iterator[Advance]:
    """A live bar for a long step, shown only when ``console`` is a terminal.

    Yields the function that counts finished items; each call redraws the bar, so
    every count is shown. Piped or in CI nothing is drawn: the step's log lines are
    the record. A step inside another live bar on the same console (the sites done
    within the rounds' bar) is drawn beneath it; a step's bar vanishes when the
    step is done.

    Parameters
    ----------
    description : str
        What the step does (``"clients trained alone"``).
    total : int
        Items in the step.
    console : Console, optional
        Default: rich's console on stdout, which the rounds' bar also uses.
    """
    console = console or get_console()
    if not console.is_terminal:
        yield _nothing
        return
    progress = progress_bar(console, transient=True)

    def advance(done: int = 1) -> None:
        progress.advance(task, done)
        progress.refresh()

    with progress:
        task = progress.add_task(description, total=total)
        yield advance
