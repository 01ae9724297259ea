"""FedAvg with the head's rows averaged over the clients that hold each label.

Under label skew (for example one client per domain) plain FedAvg gives each label's
head row a share of its owners' update proportional to their share of *all* examples,
while every other client pushes that row away from its own features. Here row ``k``
of the head (weight and bias) is the mean of the clients' row-``k`` deltas weighted by
their counts of label ``k``; a label nobody holds this round leaves its row unchanged.
Every other tensor is the example-weighted mean, as in FedAvg.
"""

from __future__ import annotations

import logging

import numpy as np

from common.codec import AdapterState
from common.config import AGGREGATION_RULES
from common.model import HEAD_PREFIX
from server.aggregation.fedavg import FedAvg
from server.summation import RoundSum

log = logging.getLogger(__name__)


class FedAvgPerLabel:
    """Example-weighted mean, with per-label weights for the head's rows.

    Clients send their per-label row counts beside the delta, so the coordinator sees
    each client's label histogram: for now this rule runs without secure aggregation.
    """

    traits = AGGREGATION_RULES["fedavg-per-label"]

    def aggregate(self, summed: RoundSum) -> AdapterState:
        """The FedAvg mean, with the head rows replaced by their per-label means."""
        mean = FedAvg().aggregate(summed)
        # A reply without counts still moves the LoRA factors, but no head row.
        counted = [c for c in summed.contributions if c.label_counts is not None]
        if len(counted) < len(summed.contributions):
            log.warning(
                "%d client(s) sent no label counts; their head deltas are left out",
                len(summed.contributions) - len(counted),
            )
        if not counted:
            return {k: v for k, v in mean.items() if not k.startswith(HEAD_PREFIX)} | {
                k: np.zeros_like(v)
                for k, v in mean.items()
                if k.startswith(HEAD_PREFIX)
            }
        counts = np.stack([c.label_counts for c in counted])  # (clients, labels)
        totals = counts.sum(axis=0)  # (labels,)
        held = totals > 0
        for name in (f"{HEAD_PREFIX}weight", f"{HEAD_PREFIX}bias"):
            deltas = np.stack([c.change[name] for c in counted]).astype(np.float64)
            # Row k: sum over clients of count(client, k) * delta(client)[k].
            weighted = np.einsum("cl,cl...->l...", counts, deltas)  # (labels, ...)
            rows = np.zeros_like(weighted)
            shape = (-1,) + (1,) * (weighted.ndim - 1)
            rows[held] = weighted[held] / totals[held].reshape(shape)
            mean[name] = rows.astype(np.float32)
        return mean
