"""Federated evaluation: the sites score the global model on their own rows.

One evaluation, as data::

    sample ``eval.fraction`` of the nodes -> (secure aggregation: key stages) ->
    send the global adapter as an evaluate message -> each site's totals (examples,
    correct, loss sum, tokens) -> plain: add them, keep each site's row; secure:
    unmask their sum only -> the sites' accuracy, loss (and perplexity)

The coordinator divides sums only, so the sites' figures are those of the union of
their rows: with ``column:<name>`` in simulation, exactly the coordinator's test set.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
from flwr.app import ConfigRecord, Message
from flwr.serverapp import Grid

from common import keys
from common.config import RunConfig
from common.evaluation import EvalResult, EvalTotals
from server.secagg import SecureSum
from server.summation import RoundStats
from server.validation import log_rejection, reply_metrics

log = logging.getLogger(__name__)

#: A plain reply's totals, in :class:`EvalTotals`' order.
TOTAL_KEYS = (
    keys.EVAL_EXAMPLES,
    keys.EVAL_CORRECT,
    keys.EVAL_LOSS_SUM,
    keys.EVAL_TOKENS,
)


@dataclass(frozen=True)
class SitesEvaluation:
    """The sites' evaluation of one global model.

    Attributes
    ----------
    totals : EvalTotals
        Summed over the sites.
    sites : int
        Sites in the sum.
    rows : list[dict[str, Any]]
        Plain mode: one row per site (``site``, ``examples``, ``accuracy``,
        ``loss``, and where measured ``perplexity`` and the personalised model's
        ``personal_accuracy`` or ``personal_perplexity``); empty behind secure
        aggregation, where the coordinator learns the totals only.
    """

    totals: EvalTotals
    sites: int
    rows: list[dict[str, Any]] = field(default_factory=list)

    def result(self) -> EvalResult | None:
        """The sites' figures as one evaluation (``None`` without rows)."""
        return self.totals.result()

    def metrics(self) -> dict[str, Any]:
        """The ``sites_eval_*`` columns of a metrics line."""
        result = self.result()
        columns: dict[str, Any] = {
            "sites_eval_examples": self.totals.examples,
            "sites_evaluated": self.sites,
            "sites_eval_loss": result.loss if result else None,
            "sites_eval_accuracy": result.accuracy if result else None,
        }
        if result is not None and result.perplexity is not None:
            columns["sites_eval_perplexity"] = result.perplexity
        scored = [row for row in self.rows if row["examples"]]
        if scored and "perplexity" in scored[0]:
            columns["sites_eval_worst_perplexity"] = max(
                row["perplexity"] for row in scored
            )
        elif scored:
            columns["sites_eval_worst_accuracy"] = min(
                row["accuracy"] for row in scored
            )
        if self.rows:
            columns["sites_eval_rows"] = self.rows
        return columns


def empty_sites_metrics() -> dict[str, Any]:
    """The ``sites_eval_*`` columns of a round the sites did not evaluate."""
    return {
        "sites_eval_examples": None,
        "sites_evaluated": 0,
        "sites_eval_loss": None,
        "sites_eval_accuracy": None,
    }


def site_row(node: int, metrics: dict[str, float]) -> dict[str, Any]:
    """One site's row from its plain reply."""
    totals = EvalTotals.from_vector(np.array([metrics[k] for k in TOTAL_KEYS]))
    result = totals.result()  # None for a site without evaluation rows
    row: dict[str, Any] = {
        "site": str(node),
        "examples": totals.examples,
        "accuracy": result.accuracy if result else None,
        "loss": result.loss if result else None,
    }
    if result is not None and result.perplexity is not None:
        row["perplexity"] = result.perplexity
    for key, column in (
        (keys.PERSONAL_ACCURACY, "personal_accuracy"),
        (keys.PERSONAL_PERPLEXITY, "personal_perplexity"),
    ):
        if key in metrics:
            row[column] = metrics[key]
    return row


class SiteEvaluator:
    """Samples the sites that evaluate and adds their replies.

    Parameters
    ----------
    config : RunConfig
        ``eval.fraction``, ``eval.min-clients`` and the seed.
    secure : SecureSum, optional
        The secure sum the totals go through (``secagg.enabled``): its own
        instance, apart from the training updates' one.
    """

    def __init__(self, config: RunConfig, secure: SecureSum | None = None) -> None:
        self.config = config
        self.secure = secure

    def sample(self, nodes: Sequence[int], server_round: int) -> list[int]:
        """``eval.fraction`` of ``nodes`` (at least ``eval.min-clients``), a pure
        function of the seed, the round and the node ids."""
        ordered = sorted(nodes)
        wanted = max(
            self.config.eval_min_clients,
            math.ceil(self.config.eval_fraction * len(ordered)),
        )
        count = min(len(ordered), wanted)
        # A stream apart from training's sample of the same round.
        rng = np.random.default_rng([self.config.seed, server_round, 1])
        chosen = rng.choice(len(ordered), size=count, replace=False)
        return [ordered[int(position)] for position in sorted(chosen)]

    def prepare(
        self, grid: Grid, nodes: Sequence[int], server_round: int, stats: RoundStats
    ) -> dict[int, ConfigRecord | None]:
        """The sites that go on, each with what its evaluate message must carry
        (the secure sum's key stages run here)."""
        if self.secure is None:
            return {node: None for node in nodes}
        return self.secure.prepare(grid, nodes, server_round, stats)

    def collect(
        self, grid: Grid, replies: Sequence[Message], stats: RoundStats
    ) -> SitesEvaluation | None:
        """The sites' evaluation, or ``None`` when fewer than ``eval.min-clients``
        sites are in it."""
        evaluation = (
            _collect_secure(self.secure, grid, replies, stats)
            if self.secure is not None
            else _collect_plain(replies, stats)
        )
        if evaluation is None or evaluation.sites < self.config.eval_min_clients:
            log.warning(
                "the sites' evaluation is left out: %d site(s) answered usefully, "
                "eval.min-clients = %d",
                0 if evaluation is None else evaluation.sites,
                self.config.eval_min_clients,
            )
            return None
        return evaluation


def _collect_secure(
    secure: SecureSum, grid: Grid, replies: Sequence[Message], stats: RoundStats
) -> SitesEvaluation | None:
    summed = secure.collect_totals(grid, replies, EvalTotals.WIDTH, stats)
    if summed is None:
        return None
    vector, survivors = summed
    return SitesEvaluation(EvalTotals.from_vector(vector), len(survivors))


def _collect_plain(
    replies: Sequence[Message], stats: RoundStats
) -> SitesEvaluation | None:
    totals, rows = EvalTotals(), []
    for reply in replies:
        node = reply.metadata.src_node_id
        try:
            metrics = reply_metrics(reply)
            vector = _checked_totals(metrics)
        except ValueError as reason:  # RejectedUpdate too
            log_rejection(node, reason)
            stats.rejected += 1
            continue
        totals += EvalTotals.from_vector(vector)
        rows.append(site_row(node, metrics))
    return SitesEvaluation(totals, len(rows), rows) if rows else None


def _checked_totals(metrics: dict[str, float]) -> np.ndarray:
    """A plain reply's totals ``(4,) float64``, after checking they are whole,
    finite and consistent (a reply that is not is left out, never allowed to skew
    the sum)."""
    missing = [k for k in TOTAL_KEYS if k not in metrics]
    if missing:
        raise ValueError(f"evaluation reply lacks {', '.join(missing)}")
    values = np.array([metrics[k] for k in TOTAL_KEYS])  # (4,) float64
    examples, correct, _, tokens = values
    if not np.all(np.isfinite(values)) or np.any(values < 0):
        raise ValueError("evaluation totals must be finite and non-negative")
    if correct > (tokens or examples) or any(v != round(v) for v in values[[0, 1, 3]]):
        raise ValueError("evaluation counts are not whole or exceed the rows scored")
    return values
