"""Coordinate-wise median of the deltas: robust to a minority of wild updates."""

from __future__ import annotations

import numpy as np

from common.codec import AdapterState
from common.config import AGGREGATION_RULES
from server.summation import RoundSum


class CoordinateMedian:
    """The unweighted coordinate-wise median of the clients' deltas.

    It needs every client's update, so it cannot run behind secure aggregation.
    """

    traits = AGGREGATION_RULES["median"]

    def aggregate(self, summed: RoundSum) -> AdapterState:
        """Median over clients, per coordinate."""
        changes = [c.change for c in summed.contributions]
        return {
            k: np.median(np.stack([c[k] for c in changes]), axis=0).astype(np.float32)
            for k in changes[0]
        }
