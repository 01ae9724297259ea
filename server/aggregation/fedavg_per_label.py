"""FedAvg with the head's rows averaged over the clients that hold each label.

Under label skew (for example one client per domain) plain FedAvg gives each label's
head row a share of its owners' update proportional to their share of *all* examples,
while every other client pushes that row away from its own features. Here row ``k``
of the head (weight and bias) is the mean of the clients' row-``k`` deltas weighted by
their counts of label ``k``; a label nobody holds this round leaves its row unchanged.
Every other tensor is the example-weighted mean, as in FedAvg.

The rule needs two sums only: each label's total count and the count-weighted rows.
A plain round forms them from each client's counts; behind secure aggregation they
ride in the masked vector (:mod:`common.secagg.label_sums`) and arrive summed.
"""

from __future__ import annotations

import logging

import numpy as np

from common.codec import AdapterState
from common.config import AGGREGATION_RULES
from common.secagg.label_sums import HEAD_TENSORS, LabelSums
from common.sharing import HEAD_PREFIX
from server.aggregation.fedavg import FedAvg
from server.summation import RoundSum

log = logging.getLogger(__name__)


class FedAvgPerLabel:
    """Example-weighted mean, with per-label weights for the head's rows.

    In plain rounds clients send their per-label row counts beside the delta, so the
    coordinator sees each client's label histogram; behind secure aggregation it sees
    only each label's total count over the round's clients.
    """

    traits = AGGREGATION_RULES["fedavg-per-label"]

    def aggregate(self, summed: RoundSum) -> AdapterState:
        """The FedAvg mean, with the head rows replaced by their per-label means."""
        mean = FedAvg().aggregate(summed)
        if summed.label_sums is not None:
            return mean | _per_label_rows(summed.label_sums)
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
        weighted = {
            # Row k: sum over clients of count(client, k) * delta(client)[k].
            name: np.einsum(
                "cl,cl...->l...",
                counts,
                np.stack([c.change[name] for c in counted]).astype(np.float64),
            )  # (labels, ...)
            for name in HEAD_TENSORS
        }
        return mean | _per_label_rows(LabelSums(counts.sum(axis=0), weighted))


def _per_label_rows(sums: LabelSums) -> AdapterState:
    """Each head row divided by its label's total count; rows of labels nobody holds
    stay 0 (unchanged)."""
    held = sums.counts > 0
    out = {}
    for name, weighted in sums.rows.items():
        rows = np.zeros_like(weighted)
        shape = (-1,) + (1,) * (weighted.ndim - 1)
        rows[held] = weighted[held] / sums.counts[held].reshape(shape)
        out[name] = rows.astype(np.float32)
    return out
