"""The sum step of aggregation, kept apart so that a secure summer can replace it."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Protocol

import numpy as np

from common.model import AdapterState
from server.contribution import Contribution


class Summer(Protocol):
    """Adds the weighted deltas of a round: returns (sum of w_i * delta_i, sum of w_i)."""

    def weighted_sum(self, contributions: Sequence[Contribution]) -> tuple[AdapterState, float]:
        """Sum of the weighted deltas and the total weight."""
        ...


class PlainSum:
    """Adds the clients' deltas in the clear (the coordinator sees each one)."""

    def weighted_sum(self, contributions: Sequence[Contribution]) -> tuple[AdapterState, float]:
        """Sum in float64, returned as float32."""
        if not contributions:
            raise ValueError("nothing to sum: no contributions")
        names = contributions[0].change.keys()
        total = {k: np.zeros(contributions[0].change[k].shape, np.float64) for k in names}
        for contribution in contributions:
            for k in names:
                total[k] += contribution.weight * contribution.change[k].astype(np.float64)
        weight = float(sum(c.weight for c in contributions))
        return {k: v.astype(np.float32) for k, v in total.items()}, weight
