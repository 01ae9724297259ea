"""Coordinate-wise trimmed mean of the deltas (Yin et al. 2018)."""

from __future__ import annotations

import math

import numpy as np

from common.codec import AdapterState
from common.config import AGGREGATION_RULES
from server.summation import RoundSum


class TrimmedMean:
    """Per coordinate, drop the ``fraction`` largest and smallest values, average the
    rest.

    Parameters
    ----------
    fraction : float
        Share cut from each end, in [0, 0.5).
    """

    traits = AGGREGATION_RULES["trimmed-mean"]

    def __init__(self, fraction: float) -> None:
        self.fraction = fraction

    def aggregate(self, summed: RoundSum) -> AdapterState:
        """Trimmed mean over clients, per coordinate."""
        changes = [c.change for c in summed.contributions]
        cut = math.floor(self.fraction * len(changes))
        out = {}
        for name in changes[0]:
            ordered = np.sort(
                np.stack([c[name] for c in changes]), axis=0
            )  # (clients, *shape)
            out[name] = (
                ordered[cut : len(changes) - cut].mean(axis=0).astype(np.float32)
            )
        return out
