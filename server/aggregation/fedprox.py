"""FedProx (Li et al., MLSys 2020): FedAvg on the coordinator; each client adds the
proximal term ``mu / 2 * ||theta - theta_global||^2`` over the parameters it trains
(``fedprox.mu``), which keeps label-skewed clients from drifting far from the global
adapter within a round. The client side is ``client.finetune``'s ``proximal_mu``."""

from __future__ import annotations

from common.codec import AdapterState
from common.config import AGGREGATION_RULES
from server.aggregation.fedavg import FedAvg
from server.summation import RoundSum


class FedProx:
    """The example-weighted mean of the deltas (the proximal term acts on clients)."""

    traits = AGGREGATION_RULES["fedprox"]

    def aggregate(self, summed: RoundSum) -> AdapterState:
        """The FedAvg mean."""
        return FedAvg().aggregate(summed)
