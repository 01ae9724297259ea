"""The cross-site report: how the final global model (and each site's personalised
model) scores at every evaluating site.

In plain mode each site's evaluation row (``sites_eval_rows`` of ``metrics.jsonl``)
is kept; the last evaluated round's rows are the report: after the final round every
evaluating site scored the final global model and, with personalised state (FedSA),
its own model. Behind secure aggregation there are no per-site rows (the coordinator
learns the totals only), and no report.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
from rich.table import Table

#: The sites' report plot in ``DIR/report/``.
SITES_PNG = "sites.png"


def final_site_rows(
    rows: Sequence[Mapping[str, Any]],
) -> tuple[int, list[dict[str, Any]]] | None:
    """The last round with per-site evaluation rows, and those rows; ``None`` when
    the run kept none (the coordinator evaluated alone, or secure aggregation)."""
    for row in reversed(rows):
        if row.get("sites_eval_rows"):
            return int(row["round"]), [dict(site) for site in row["sites_eval_rows"]]
    return None


def _score(site: Mapping[str, Any]) -> tuple[str, float | None]:
    """A site's headline: perplexity for a causal LM (lower is better), else
    accuracy."""
    if site.get("perplexity") is not None:
        return "perplexity", float(site["perplexity"])
    value = site.get("accuracy")
    return "accuracy", None if value is None else float(value)


def worst_site(sites: Sequence[Mapping[str, Any]]) -> Mapping[str, Any] | None:
    """The site whose global-model score is worst (lowest accuracy, highest
    perplexity); ``None`` when no site had rows to score."""
    scored = [(site, *_score(site)) for site in sites]
    scored = [entry for entry in scored if entry[2] is not None]
    if not scored:
        return None
    sign = 1.0 if scored[0][1] == "perplexity" else -1.0
    return max(scored, key=lambda entry: sign * entry[2])[0]


def _number(value: Any) -> str:
    return "-" if value is None else f"{value:.4f}"


def cross_site_table(rows: Sequence[Mapping[str, Any]]) -> Table | None:
    """A rich table of each site's final scores, the worst site in its caption."""
    final = final_site_rows(rows)
    if final is None:
        return None
    server_round, sites = final
    metric = _score(sites[0])[0]
    personal = f"personal_{metric}"
    table = Table(title=f"sites (global model after round {server_round})")
    for column in (
        "#",
        "site",
        "examples",
        f"global {metric}",
        f"personalised {metric}",
    ):
        table.add_column(column, justify="right")
    for index, site in enumerate(sites):
        table.add_row(
            str(index),
            str(site["site"]),
            str(site["examples"]),
            _number(_score(site)[1]),
            _number(site.get(personal)),
        )
    worst = worst_site(sites)
    if worst is not None:
        table.caption = (
            f"worst site: {worst['site']} ({metric} {_number(_score(worst)[1])})"
        )
    return table


def plot_cross_site(
    rows: Sequence[Mapping[str, Any]], path: Path, title: str
) -> Path | None:
    """Bars of each site's global-model score (and personalised score, where
    measured), the worst site named; ``None`` without per-site rows."""
    final = final_site_rows(rows)
    if final is None:
        return None
    server_round, sites = final
    metric = _score(sites[0])[0]
    figure = Figure(figsize=(max(5.0, 1.0 + 0.5 * len(sites)), 4), layout="constrained")
    axes = figure.subplots()
    positions = np.arange(len(sites))
    series = [("global", [_score(site)[1] for site in sites])]
    if any(site.get(f"personal_{metric}") is not None for site in sites):
        series.append(
            ("personalised", [site.get(f"personal_{metric}") for site in sites])
        )
    width = 0.8 / len(series)
    for index, (label, values) in enumerate(series):
        offset = (index - (len(series) - 1) / 2) * width
        heights = [np.nan if value is None else value for value in values]
        axes.bar(positions + offset, heights, width=width, label=label)
    axes.set_xticks(positions, [str(index) for index in range(len(sites))])
    axes.set_xlabel("site (# in the table of fedgraft inspect and report)")
    axes.set_ylabel(metric)
    axes.grid(axis="y", alpha=0.3)
    axes.legend()
    worst = worst_site(sites)
    named = "" if worst is None else f"; worst site {worst['site']}"
    axes.set_title(f"{title}\nafter round {server_round}{named}")
    FigureCanvasAgg(figure)
    figure.savefig(path, dpi=100)
    return path
