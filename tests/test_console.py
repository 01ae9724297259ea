"""The console shows what a user acts on: library noise is kept off by name, Flower's
records are printed once, and ``--verbose`` lets everything through."""

from __future__ import annotations

import io
import logging
import os
import subprocess
import sys
import warnings
from collections.abc import Iterator

import pytest
from rich.console import Console

from common.console import (
    QUIET_LOGGERS,
    VERBOSE_ENV,
    CurrentStderrHandler,
    configure_console,
    quiet_library_noise,
    step_progress,
)

DEPRECATION = "DEPRECATED FEATURE: The `run_simulation` function is deprecated and"
TERMINATING = "Manually terminating ClientAppActor"


@pytest.fixture()
def console_state(monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    """Undo what :func:`configure_console` changes in this process."""
    flower = logging.getLogger("flwr")
    propagate, filters = flower.propagate, list(flower.filters)
    levels = {name: logging.getLogger(name).level for name in QUIET_LOGGERS}
    for name in (VERBOSE_ENV, "FLWR_LOG_LEVEL", "HF_HUB_DISABLE_PROGRESS_BARS"):
        monkeypatch.delenv(name, raising=False)
    with warnings.catch_warnings():
        yield
    flower.propagate, flower.filters = propagate, filters
    for name, level in levels.items():
        logging.getLogger(name).setLevel(level)


def _flower_records(verbose: bool) -> list[str]:
    """Messages Flower's logger hands to its handlers after set-up."""
    configure_console(verbose)
    flower, seen = logging.getLogger("flwr"), []

    class Keep(logging.Handler):
        def emit(self, record: logging.LogRecord) -> None:
            seen.append(record.getMessage())

    keep = Keep(level=logging.DEBUG)
    flower.addHandler(keep)
    try:
        flower.warning(DEPRECATION)
        flower.warning(TERMINATING)
        flower.warning("a warning the user acts on")
    finally:
        flower.removeHandler(keep)
    return seen


@pytest.mark.usefixtures("console_state")
@pytest.mark.parametrize(
    ("verbose", "expected"),
    [
        (False, ["a warning the user acts on"]),
        (True, [DEPRECATION, TERMINATING, "a warning the user acts on"]),
    ],
)
def test_flower_notices_without_action_show_only_when_verbose(
    verbose: bool, expected: list[str]
) -> None:
    assert _flower_records(verbose) == expected


@pytest.mark.usefixtures("console_state")
def test_flower_records_do_not_also_reach_the_root_handler() -> None:
    # Execute
    configure_console(False)

    # Assert: Flower's own handler prints them; the root one would print them again
    assert logging.getLogger("flwr").propagate is False


@pytest.mark.usefixtures("console_state")
@pytest.mark.parametrize(("verbose", "shown"), [(False, False), (True, True)])
def test_named_library_noise_is_quiet_unless_verbose(
    verbose: bool, shown: bool
) -> None:
    # Prepare
    quiet_library_noise(verbose)
    kernel_logger = logging.getLogger("bitsandbytes.backends.cpu.ops")

    # Execute
    with warnings.catch_warnings(record=True) as caught:
        warnings.warn("`torch.jit.script_method` is deprecated.", DeprecationWarning)
        warnings.warn("another deprecation", DeprecationWarning)

    # Assert: the named warning follows verbose, any other one is untouched
    messages = [str(w.message) for w in caught]
    assert ("`torch.jit.script_method` is deprecated." in messages) is shown
    assert kernel_logger.isEnabledFor(logging.WARNING) is shown
    assert kernel_logger.isEnabledFor(logging.ERROR)


@pytest.mark.parametrize(("terminal", "drawn"), [(False, False), (True, True)])
def test_step_progress_draws_only_on_a_terminal(terminal: bool, drawn: bool) -> None:
    # Prepare
    out = io.StringIO()
    console = Console(file=out, force_terminal=terminal, width=80)

    # Execute
    with step_progress("clients trained alone", 2, console) as advance:
        advance()
        advance()

    # Assert
    assert ("clients trained alone" in out.getvalue()) is drawn


def test_torch_threads_applies_inside_the_block_and_restores_after() -> None:
    # Prepare
    import torch

    from simulations.baselines import torch_threads

    before = torch.get_num_threads()

    # Execute
    with torch_threads(1):
        inside = torch.get_num_threads()

    # Assert
    assert inside == 1 and torch.get_num_threads() == before


def test_log_lines_go_to_the_stderr_in_effect_when_they_are_written(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    # Prepare: the handler is made first, then a live bar swaps sys.stderr
    handler = CurrentStderrHandler()
    handler.setFormatter(logging.Formatter("%(message)s"))
    swapped = io.StringIO()
    monkeypatch.setattr("sys.stderr", swapped)

    # Execute
    handler.emit(logging.makeLogRecord({"msg": "round 1/3", "levelno": logging.INFO}))

    # Assert: printed above the bars, not into the line they are drawn on
    assert swapped.getvalue() == "round 1/3\n"


def test_the_command_console_logs_through_the_current_stderr() -> None:
    # Execute: a fresh process, as a `fedgraft` command starts
    code = (
        "import logging; from common.console import configure_console; "
        "configure_console(False); "
        "print(type(logging.getLogger().handlers[0]).__name__)"
    )
    shown = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, check=True
    )

    # Assert
    assert shown.stdout.strip() == "CurrentStderrHandler"


@pytest.mark.parametrize(("verbose", "bars"), [(False, "off"), (True, "on")])
def test_the_hubs_progress_bars_are_off_unless_verbose(
    verbose: bool, bars: str
) -> None:
    # Prepare: a fresh process that imported transformers (bars on) before
    # fedgraft's apps quiet the libraries, as a Ray worker may
    code = (
        "from transformers.utils import logging as hf; "
        "from common.console import quiet_library_noise; "
        f"quiet_library_noise({verbose}); "
        "print('on' if hf.is_progress_bar_enabled() else 'off')"
    )
    env = {k: v for k, v in os.environ.items() if k != "HF_HUB_DISABLE_PROGRESS_BARS"}

    # Execute
    shown = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, env=env
    )

    # Assert: weights loading and shard writing print no tqdm bar unless verbose
    assert shown.stdout.strip() == bars, shown.stderr[-2000:]


@pytest.mark.parametrize(("verbose", "shown"), [(False, False), (True, True)])
def test_flowers_debug_lines_reach_the_console_only_when_verbose(
    verbose: bool, shown: bool
) -> None:
    # Prepare: a fresh process set up as a `fedgraft` command, then Flower loaded
    code = (
        "import logging; from common.console import configure_console; "
        f"configure_console({verbose}); import flwr.app; "
        "logging.getLogger('flwr').debug('a flower debug line')"
    )
    env = {k: v for k, v in os.environ.items() if k != "FLWR_LOG_LEVEL"}

    # Execute
    done = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, env=env
    )

    # Assert
    assert done.returncode == 0, done.stderr[-2000:]
    assert ("a flower debug line" in done.stdout + done.stderr) is shown
