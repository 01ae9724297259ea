"""``fedgraft report DIR``: PNG plots of a run's ``metrics.jsonl``.

Writes into ``DIR/report/``:

- ``accuracy_loss.png``: eval accuracy (top) and eval/train loss (bottom) per round;
- ``bytes.png``: megabytes sent up and down (and backbone bytes, if any) per round;
- ``participation.png``: which node took part in which round, or, for runs that did
  not record ``participants``, the number of useful replies per round;
- ``sites.png`` (runs whose sites evaluated in plain mode): each site's score of the
  final global model and of its personalised model, the worst site named
  (:mod:`simulations.cross_site`).

Figures are built with :class:`matplotlib.figure.Figure` and the Agg canvas directly,
never through ``pyplot``: no global backend switch, no display needed, and no figure
left registered in pyplot's state to close.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure

from simulations.cross_site import SITES_PNG, plot_cross_site
from simulations.inspection import read_run_metrics, read_summary

REPORT_DIR = "report"
ACCURACY_LOSS_PNG = "accuracy_loss.png"
BYTES_PNG = "bytes.png"
PARTICIPATION_PNG = "participation.png"
#: Above this many nodes the participation grid drops its per-node tick labels.
_MAX_NODE_LABELS = 40
_DPI = 100


def _series(
    rows: Sequence[Mapping[str, Any]], key: str
) -> tuple[list[int], list[float]]:
    """Rounds and values of ``key`` where the value is present (not null)."""
    pairs = [(row["round"], row[key]) for row in rows if row.get(key) is not None]
    return [r for r, _ in pairs], [float(v) for _, v in pairs]


def _save(figure: Figure, path: Path) -> Path:
    FigureCanvasAgg(figure)
    figure.savefig(path, dpi=_DPI)
    return path


def _title(directory: Path, summary: Mapping[str, Any] | None, what: str) -> str:
    kind = (summary or {}).get("kind")
    return f"{directory.name}" + (f" ({kind})" if kind else "") + f"\n{what}"


def plot_accuracy_loss(
    rows: Sequence[Mapping[str, Any]], path: Path, title: str
) -> Path:
    """Eval accuracy (a causal language model: eval perplexity), eval loss and
    (where present) train loss per round."""
    figure = Figure(figsize=(7, 6), layout="constrained")
    accuracy_axes, loss_axes = figure.subplots(2, 1, sharex=True)
    rounds, perplexity = _series(rows, "eval_perplexity")
    if perplexity:
        accuracy_axes.plot(rounds, perplexity, marker="o", color="tab:green")
        accuracy_axes.set_ylabel("eval perplexity (lower is better)")
    else:
        rounds, accuracy = _series(rows, "eval_accuracy")
        accuracy_axes.plot(rounds, accuracy, marker="o", color="tab:green")
        accuracy_axes.set_ylabel("eval accuracy")
        accuracy_axes.set_ylim(0, 1.02)
    accuracy_axes.grid(alpha=0.3)
    for key, colour in (("eval_loss", "tab:red"), ("train_loss", "tab:blue")):
        rounds, values = _series(rows, key)
        if values:
            loss_axes.plot(rounds, values, marker="o", color=colour, label=key)
    loss_axes.set_ylabel("loss")
    loss_axes.set_xlabel("round")
    loss_axes.grid(alpha=0.3)
    if loss_axes.get_lines():  # no line to name when no round has a loss
        loss_axes.legend()
    loss_axes.xaxis.get_major_locator().set_params(integer=True)
    figure.suptitle(title)
    return _save(figure, path)


def plot_bytes(rows: Sequence[Mapping[str, Any]], path: Path, title: str) -> Path:
    """Megabytes sent up and down per round, side by side (and backbone bytes)."""
    figure = Figure(figsize=(7, 4), layout="constrained")
    axes = figure.subplots()
    rounds = np.array([row["round"] for row in rows])
    columns = [("bytes_up", "up"), ("bytes_down", "down")]
    if any(row.get("bytes_backbone") for row in rows):
        columns.append(("bytes_backbone", "backbone"))
    width = 0.8 / len(columns)
    for index, (key, label) in enumerate(columns):
        megabytes = [(row.get(key) or 0) / 1e6 for row in rows]
        offset = (index - (len(columns) - 1) / 2) * width
        axes.bar(rounds + offset, megabytes, width=width, label=label)
    axes.set_xlabel("round")
    axes.set_ylabel("MB")
    axes.set_xticks(rounds)
    axes.grid(axis="y", alpha=0.3)
    axes.legend()
    axes.set_title(title)
    return _save(figure, path)


def _node_order(nodes: set[str]) -> list[str]:
    # Flower node ids are integers written as strings: sort them as numbers.
    return sorted(
        nodes, key=lambda node: (0, len(node), node) if node.isdigit() else (1, 0, node)
    )


def participation_figure(rows: Sequence[Mapping[str, Any]], title: str) -> Figure:
    """A site × round grid of who took part, or replies per round without ids.

    Sites are drawn as short indices in the order of their node ids; Flower's node
    ids (up to 20 digits) go into a key below the grid, up to
    :data:`_MAX_NODE_LABELS` of them.
    """
    nodes = _node_order(
        {str(node) for row in rows for node in row.get("participants") or ()}
    )
    rounds = [row["round"] for row in rows]
    width = max(7.0, 1 + 0.4 * len(rows))  # wide enough for the two-line title
    if not nodes:
        figure = Figure(figsize=(width, 4), layout="constrained")
        axes = figure.subplots()
        axes.bar(rounds, [row.get("clients") or 0 for row in rows], color="tab:gray")
        axes.set_xlabel("round")
        axes.set_ylabel("clients (useful replies)")
        axes.yaxis.get_major_locator().set_params(integer=True)
        axes.set_xticks(rounds)
        axes.set_title(f"{title}: no participant ids recorded, clients per round")
        return figure
    index = {node: position for position, node in enumerate(nodes)}
    grid = np.zeros((len(nodes), len(rows)), dtype=np.uint8)  # (sites, rounds)
    for column, row in enumerate(rows):
        for node in row.get("participants") or ():
            grid[index[str(node)], column] = 1
    labelled = len(nodes) <= _MAX_NODE_LABELS
    height = min(2.5 + 0.25 * len(nodes) * (2 if labelled else 1), 16)
    figure = Figure(figsize=(width, height), layout="constrained")
    axes = figure.subplots()
    axes.imshow(grid, aspect="auto", cmap="Blues", vmin=0, vmax=1, interpolation="none")
    axes.set_xticks(range(len(rows)), [str(r) for r in rounds])
    axes.set_xlabel("round")
    axes.set_ylabel(f"site ({len(nodes)})")
    axes.set_title(f"{title}: filled = the site took part")
    if labelled:
        axes.set_yticks(range(len(nodes)), [str(i) for i in range(len(nodes))])
        key = [f"{i}: node {node}" for i, node in enumerate(nodes)]
        columns = max(1, int(width // 2.6))
        lines = [
            "    ".join(key[start : start + columns])
            for start in range(0, len(key), columns)
        ]
        axes.set_xlabel("round\n\n" + "\n".join(lines), fontsize="small")
    return figure


def plot_participation(
    rows: Sequence[Mapping[str, Any]], path: Path, title: str
) -> Path:
    """Write :func:`participation_figure` to ``path``."""
    return _save(participation_figure(rows, title), path)


def write_report(directory: Path) -> list[Path]:
    """Write the run's plots as PNG files into ``directory/report/``.

    Parameters
    ----------
    directory : Path
        A run's output folder (its ``output.dir``).

    Returns
    -------
    list[Path]
        ``accuracy_loss.png``, ``bytes.png``, ``participation.png`` and, with
        per-site evaluation rows, ``sites.png``, in that order.

    Raises
    ------
    FileNotFoundError
        When ``directory`` or its ``metrics.jsonl`` does not exist.
    ValueError
        When ``metrics.jsonl`` is malformed (names file:line) or has no rounds yet.
    """
    rows = read_run_metrics(directory)
    if not rows:
        raise ValueError(
            f"{directory} has no rounds in its metrics yet: wait for the run's "
            "first evaluation, then report again"
        )
    summary = read_summary(directory)
    output = directory / REPORT_DIR
    output.mkdir(exist_ok=True)
    return [
        plot_accuracy_loss(
            rows,
            output / ACCURACY_LOSS_PNG,
            _title(directory, summary, "accuracy and loss"),
        ),
        plot_bytes(rows, output / BYTES_PNG, _title(directory, summary, "traffic")),
        plot_participation(
            rows,
            output / PARTICIPATION_PNG,
            _title(directory, summary, "participation"),
        ),
    ] + _cross_site(rows, output / SITES_PNG, _title(directory, summary, "sites"))


def _cross_site(
    rows: Sequence[Mapping[str, Any]], path: Path, title: str
) -> list[Path]:
    plotted = plot_cross_site(rows, path, title)
    return [] if plotted is None else [plotted]
