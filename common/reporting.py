"""Per-round progress lines and the end-of-run summary table."""

from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence
from typing import Any

from rich.console import Console
from rich.progress import (
    BarColumn,
    MofNCompleteColumn,
    Progress,
    TextColumn,
    TimeElapsedColumn,
    TimeRemainingColumn,
)
from rich.table import Table

from common.outputs import RunOutputs

log = logging.getLogger(__name__)


def _megabytes(value: Any) -> str:
    return f"{(value or 0) / 1e6:.2f}"


def _number(value: Any, digits: int = 4) -> str:
    return "-" if value is None else f"{value:.{digits}f}"


class RoundRecorder:
    """Writes each round's metrics line, logs it, and drives a live progress bar.

    Parameters
    ----------
    outputs : RunOutputs
        Where ``metrics.jsonl`` goes.
    total_rounds : int
        For the ``round i/n`` display.
    rows : Sequence[Mapping], optional
        Rounds already done (a resumed run).
    console : Console, optional
        Where the live display goes; it is shown only when this is a terminal, so
        logs and CI output stay free of it.
    """

    def __init__(
        self,
        outputs: RunOutputs,
        total_rounds: int,
        rows: Sequence[Mapping[str, Any]] = (),
        console: Console | None = None,
    ) -> None:
        self.outputs = outputs
        self.total_rounds = total_rounds
        self.rows: list[dict[str, Any]] = [dict(row) for row in rows]
        console = console or Console()
        self._progress: Progress | None = None
        if console.is_terminal:
            self._progress = Progress(
                TextColumn("{task.description}"),
                BarColumn(),
                MofNCompleteColumn(),
                TimeElapsedColumn(),
                TextColumn("ETA"),
                TimeRemainingColumn(),
                console=console,
            )
            done = self.rows[-1]["round"] if self.rows else 0
            self._task = self._progress.add_task(
                "waiting for round 1", total=total_rounds, completed=done
            )
            self._progress.start()

    def close(self) -> None:
        """Stop the live display (idempotent)."""
        if self._progress is not None:
            self._progress.stop()
            self._progress = None

    def record(self, metrics: Mapping[str, Any]) -> None:
        """Append ``metrics`` to ``metrics.jsonl``, log it, update the display."""
        row = dict(metrics)
        self.rows.append(row)
        self.outputs.append_metrics(row)
        if self._progress is not None:
            self._progress.update(
                self._task,
                completed=row["round"],
                description=(
                    f"round {row['round']}/{self.total_rounds} "
                    f"clients {row.get('clients', 0)}/{row.get('sampled', 0)} "
                    f"eval_accuracy {row['eval_accuracy']:.4f}"
                ),
            )
        clients = (
            f"clients {row['clients']}/{row['sampled']}" if row.get("sampled") else ""
        )
        log.info(
            "round %d/%d %s train_loss %s eval_loss %.4f eval_accuracy %.4f "
            "up %s MB %.1fs",
            row["round"],
            self.total_rounds,
            clients,
            _number(row.get("train_loss")),
            row["eval_loss"],
            row["eval_accuracy"],
            _megabytes(row.get("bytes_up")),
            row["seconds"],
        )


def totals(rows: Sequence[Mapping[str, Any]]) -> dict[str, Any]:
    """Sums over rounds of the byte, sample and time columns."""
    names = (
        "bytes_up",
        "bytes_down",
        "bytes_backbone",
        "train_samples",
        "seconds",
        "rejected",
        "failed",
    )
    return {name: sum(row.get(name) or 0 for row in rows) for name in names}


def summary_table(title: str, rows: Sequence[Mapping[str, Any]]) -> Table:
    """A rich table of every round."""
    table = Table(title=title)
    for column in (
        "round",
        "clients",
        "train loss",
        "eval loss",
        "eval acc",
        "MB up",
        "MB down",
        "s",
    ):
        table.add_column(column, justify="right")
    for row in rows:
        table.add_row(
            str(row["round"]),
            str(row.get("clients", "-")),
            _number(row.get("train_loss")),
            _number(row.get("eval_loss")),
            _number(row.get("eval_accuracy")),
            _megabytes(row.get("bytes_up")),
            _megabytes(row.get("bytes_down")),
            f"{row.get('seconds', 0):.1f}",
        )
    return table


def print_table(table: Table) -> None:
    """Print a table to stdout (wide enough not to wrap in CI logs)."""
    Console(width=120).print(table)
