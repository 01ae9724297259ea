"""FedAvg over adapter deltas: the example-weighted mean of the clients' deltas."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from common.model import AdapterState
from server.contribution import Contribution
from server.summation import PlainSum, Summer


class FedAvg:
    """Example-weighted mean of the deltas, over a replaceable sum.

    Parameters
    ----------
    summer : Summer, optional
        How the weighted deltas are added; :class:`server.summation.PlainSum` by
        default. Only sums are needed, so a secure summer fits.
    """

    name = "fedavg"
    needs_individual_updates = False

    def __init__(self, summer: Summer | None = None) -> None:
        self.summer = summer or PlainSum()

    def aggregate(self, contributions: Sequence[Contribution]) -> AdapterState:
        """The mean delta: sum(w_i * delta_i) / sum(w_i)."""
        total, weight = self.summer.weighted_sum(contributions)
        if weight <= 0:
            raise ValueError("total example weight of the round is zero")
        return {k: (v / np.float32(weight)).astype(np.float32) for k, v in total.items()}
