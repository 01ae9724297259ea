"""FedAvg over adapter deltas: the example-weighted mean of the clients' deltas."""

from __future__ import annotations

import numpy as np

from common.codec import AdapterState
from common.config import AGGREGATION_RULES
from server.summation import RoundSum


class FedAvg:
    """Example-weighted mean of the deltas. It needs only their sum, so the sum may
    come from secure aggregation."""

    traits = AGGREGATION_RULES["fedavg"]

    def aggregate(self, summed: RoundSum) -> AdapterState:
        """The mean delta: sum(w_i * delta_i) / sum(w_i)."""
        if summed.weight <= 0:
            raise ValueError("total example weight of the round is zero")
        return {
            k: (v / np.float32(summed.weight)).astype(np.float32)
            for k, v in summed.total.items()
        }
