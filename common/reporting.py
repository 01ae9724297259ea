"""Per-round progress lines and the end-of-run summary table."""

from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence
from typing import Any

from rich import get_console
from rich.console import Console
from rich.progress import Progress
from rich.table import Table

from common.console import progress_bar
from common.outputs import RunOutputs

log = logging.getLogger(__name__)


def _cohort(row: Mapping[str, Any]) -> str:
    """``clients k/m`` for the console; empty when the sample is not public (a
    secret-sampled DP run leaves both out) or none was drawn."""
    if not row.get("sampled"):
        return ""
    return f"clients {row['clients']}/{row['sampled']}"


def _megabytes(value: Any) -> str:
    return f"{(value or 0) / 1e6:.2f}"


def _number(value: Any, digits: int = 4) -> str:
    return "-" if value is None else f"{value:.{digits}f}"


#: Metrics where lower is better.
LOWER_IS_BETTER = frozenset({"eval_perplexity", "eval_loss"})


def main_metric(row: Mapping[str, Any]) -> tuple[str, float | None]:
    """A round's headline metric: ``eval_perplexity`` for a causal language model
    (lower is better), ``eval_accuracy`` for a classifier."""
    if row.get("eval_perplexity") is not None:
        return "eval_perplexity", float(row["eval_perplexity"])
    value = row.get("eval_accuracy")
    return "eval_accuracy", None if value is None else float(value)


def best_round(rows: Sequence[Mapping[str, Any]]) -> dict[str, Any] | None:
    """The round with the best headline metric (lowest perplexity, highest
    accuracy): ``{"metric", "round", "value"}``, or ``None`` without any."""
    scored = [(row["round"], *main_metric(row)) for row in rows]
    scored = [entry for entry in scored if entry[2] is not None]
    if not scored:
        return None
    sign = 1.0 if scored[-1][1] in LOWER_IS_BETTER else -1.0
    server_round, name, value = min(scored, key=lambda entry: sign * entry[2])
    return {"metric": name, "round": server_round, "value": value}


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
        Where the live display goes (default: rich's console on stdout, which the
        steps within a round draw on too); it is shown only when this is a
        terminal, so logs and CI output stay free of it.
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
        console = console or get_console()
        self._progress: Progress | None = None
        if console.is_terminal:
            self._progress = progress_bar(console)
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
            name, value = main_metric(row)
            self._progress.update(
                self._task,
                completed=row["round"],
                description=(
                    f"round {row['round']}/{self.total_rounds} "
                    f"{_cohort(row)} {name} {_number(value)}"
                ),
            )
        clients = _cohort(row)
        log.info(
            "round %d/%d %s train_loss %s eval_loss %s eval_accuracy %s up %s MB %.1fs",
            row["round"],
            self.total_rounds,
            clients,
            _number(row.get("train_loss")),
            _number(row.get("eval_loss")),
            _number(row.get("eval_accuracy")),
            _megabytes(row.get("bytes_up")),
            row["seconds"],
        )
        if row.get("eval_perplexity") is not None:
            log.info(
                "round %d eval_perplexity %.4f", row["round"], row["eval_perplexity"]
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
    # A causal language model's rows also carry perplexity (its headline metric).
    perplexity = any(row.get("eval_perplexity") is not None for row in rows)
    for column in (
        "round",
        "clients",
        "train loss",
        "eval loss",
        *(["eval ppl"] if perplexity else []),
        "eval acc",
        "MB up",
        "MB down",
        "s",
    ):
        table.add_column(column, justify="right")
    for row in rows:
        table.add_row(
            str(row["round"]),
            "-" if row.get("clients") is None else str(row["clients"]),
            _number(row.get("train_loss")),
            _number(row.get("eval_loss")),
            *([_number(row.get("eval_perplexity"), 2)] if perplexity else []),
            _number(row.get("eval_accuracy")),
            _megabytes(row.get("bytes_up")),
            _megabytes(row.get("bytes_down")),
            f"{row.get('seconds', 0):.1f}",
        )
    return table


def print_table(table: Table) -> None:
    """Print a table to stdout (wide enough not to wrap in CI logs)."""
    Console(width=120).print(table)
