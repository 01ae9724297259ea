"""``fedgraft inspect DIR``: what a finished (or running) run's output folder says.

Reads ``metrics.jsonl`` and, when present, ``summary.json``; prints the run's kind,
backbone, the settings that differ from the defaults, a per-round table and the
totals. A run still in progress has no ``summary.json`` yet: its totals are summed
from the metrics lines instead.
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from rich.console import Console, RenderableType
from rich.table import Table
from rich.text import Text

from common.config import DEFAULTS
from common.outputs import METRICS_FILE, SUMMARY_FILE
from common.reporting import best_round, summary_table, totals
from simulations.cross_site import cross_site_table

#: Characters of the backbone's sha256 fingerprint shown (as elsewhere in logs).
SHORT_FINGERPRINT = 12

_POINT_AT_RUN = "point at a run's output.dir (the folder holding metrics.jsonl)"


def read_run_metrics(directory: Path) -> list[dict[str, Any]]:
    """The rows of a run's ``metrics.jsonl``, checked line by line.

    A malformed row is named by file and line, because this reads folders a user
    points at.

    Parameters
    ----------
    directory : Path
        A run's output folder.

    Returns
    -------
    list[dict[str, Any]]
        One row per round, in file order; empty while a run has written nothing.

    Raises
    ------
    FileNotFoundError
        When ``directory`` or its ``metrics.jsonl`` does not exist.
    ValueError
        When a line is not a JSON object with a ``round`` key.
    """
    if not directory.is_dir():
        raise FileNotFoundError(f"{directory} is not a folder: {_POINT_AT_RUN}")
    path = directory / METRICS_FILE
    if not path.is_file():
        raise FileNotFoundError(f"{path} does not exist: {_POINT_AT_RUN}")
    rows: list[dict[str, Any]] = []
    for number, line in enumerate(path.read_text().splitlines(), start=1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError as error:
            raise ValueError(
                f"{path}:{number}: not valid JSON ({error.msg}); every line of "
                f"{METRICS_FILE} must be one round's JSON object"
            ) from error
        if not isinstance(row, dict) or "round" not in row:
            raise ValueError(
                f"{path}:{number}: expected a JSON object with a 'round' key, "
                f"got {line.strip()[:60]!r}"
            )
        rows.append(row)
    return rows


def read_summary(directory: Path) -> dict[str, Any] | None:
    """A run's ``summary.json``, or ``None`` while the run has not finished.

    Raises
    ------
    ValueError
        When the file exists but is not a JSON object.
    """
    path = directory / SUMMARY_FILE
    if not path.is_file():
        return None
    try:
        summary = json.loads(path.read_text())
    except json.JSONDecodeError as error:
        raise ValueError(
            f"{path}:{error.lineno}: not valid JSON ({error.msg})"
        ) from error
    if not isinstance(summary, dict):
        raise ValueError(f"{path}: expected a JSON object")
    return summary


def changed_settings(config: Mapping[str, Any]) -> dict[str, Any]:
    """The settings of ``config`` that differ from :data:`common.config.DEFAULTS`.

    Keys the run's config lacks (older runs) are skipped; keys this version does not
    know are kept, since they differ from every default.

    Parameters
    ----------
    config : Mapping[str, Any]
        The flat ``config`` of a ``summary.json``.

    Returns
    -------
    dict[str, Any]
        Sorted by key.
    """
    return {
        key: value
        for key, value in sorted(config.items())
        if key not in DEFAULTS or DEFAULTS[key] != value
    }


def _megabytes(value: Any) -> str:
    return f"{(value or 0) / 1e6:.2f} MB"


def _header(directory: Path, summary: Mapping[str, Any] | None) -> Text:
    # Text, not markup: a path or a setting may contain brackets. The path gets a line
    # of its own so that a long one does not wrap the facts after it.
    if summary is None:
        return Text.assemble(
            (str(directory), "bold"),
            f"\nno {SUMMARY_FILE} yet (the run is still going, or stopped early)",
        )
    backbone = summary.get("backbone") or {}
    fingerprint = str(backbone.get("fingerprint") or "?")[:SHORT_FINGERPRINT]
    pooling = backbone.get("pooling")
    return Text.assemble(
        (str(directory), "bold"),
        f"\n{summary.get('kind', '?')} run, backbone {backbone.get('name', '?')} "
        f"({fingerprint}" + (f", {pooling} pooling" if pooling else "") + ")",
    )


def _settings_lines(summary: Mapping[str, Any] | None) -> Text:
    if summary is None or not isinstance(summary.get("config"), Mapping):
        return Text("settings: unknown (no summary)")
    changed = changed_settings(summary["config"])
    if not changed:
        return Text("settings: all defaults")
    lines = [f"  {key} = {value!r}" for key, value in changed.items()]
    return Text("settings that differ from the defaults:\n" + "\n".join(lines))


def _totals_table(
    rows: Sequence[Mapping[str, Any]], summary: Mapping[str, Any] | None
) -> Table:
    summed = (summary or {}).get("totals") or totals(rows)
    final = rows[-1] if rows else (summary or {}).get("final") or {}
    wall = (summary or {}).get("wall_seconds")
    accuracy = final.get("eval_accuracy")
    table = Table(title="totals", show_header=False)
    table.add_column("quantity")
    table.add_column("value", justify="right")
    table.add_row("rounds", str(max((row["round"] for row in rows), default=0)))
    table.add_row("bytes up", _megabytes(summed.get("bytes_up")))
    table.add_row("bytes down", _megabytes(summed.get("bytes_down")))
    table.add_row("bytes backbone", _megabytes(summed.get("bytes_backbone")))
    table.add_row("train samples", str(summed.get("train_samples", 0)))
    table.add_row(
        "wall time",
        f"{wall:.1f} s" if wall is not None else f"{summed.get('seconds', 0):.1f} s*",
    )
    table.add_row("rejected updates", str(summed.get("rejected", 0)))
    table.add_row("failed replies", str(summed.get("failed", 0)))
    table.add_row("final eval accuracy", "-" if accuracy is None else f"{accuracy:.4f}")
    if final.get("eval_perplexity") is not None:  # a causal language model
        table.add_row("final eval perplexity", f"{final['eval_perplexity']:.4f}")
    best = best_round(rows)
    if best is not None:
        table.add_row(
            f"best {best['metric']}", f"{best['value']:.4f} (round {best['round']})"
        )
    baseline = (summary or {}).get("local_baseline")
    for key in ("best_accuracy", "best_perplexity"):
        if isinstance(baseline, Mapping) and baseline.get(key) is not None:
            metric = key.removeprefix("best_")
            table.add_row(
                f"best client trained alone ({metric})", f"{baseline[key]:.4f}"
            )
    if wall is None:
        table.caption = "* summed over rounds (no summary)"
    return table


def describe_run(directory: Path) -> list[RenderableType]:
    """What ``fedgraft inspect`` prints, as rich renderables in order.

    Parameters
    ----------
    directory : Path
        A run's output folder (its ``output.dir``).

    Returns
    -------
    list[RenderableType]
        Header line, changed settings, per-round table, totals table and, when
        the sites evaluated in plain mode, the per-site table
        (:func:`simulations.cross_site.cross_site_table`).

    Raises
    ------
    FileNotFoundError
        When ``directory`` or its ``metrics.jsonl`` does not exist.
    ValueError
        When ``metrics.jsonl`` or ``summary.json`` is malformed (names file:line).
    """
    rows = read_run_metrics(directory)
    summary = read_summary(directory)
    sites = cross_site_table(rows)
    return [
        _header(directory, summary),
        _settings_lines(summary),
        summary_table("rounds", rows),
        _totals_table(rows, summary),
        *([sites] if sites is not None else []),
    ]


def inspect_run(directory: Path, console: Console | None = None) -> None:
    """Print a run's kind, backbone, changed settings, rounds and totals.

    Parameters
    ----------
    directory : Path
        A run's output folder (its ``output.dir``).
    console : Console, optional
        Where to print; a 120-column console on stdout by default.

    Raises
    ------
    FileNotFoundError
        When ``directory`` or its ``metrics.jsonl`` does not exist.
    ValueError
        When ``metrics.jsonl`` or ``summary.json`` is malformed (names file:line).
    """
    console = console or Console(width=120)
    for part in describe_run(directory):
        console.print(part)
