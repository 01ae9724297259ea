"""FFA-LoRA (Sun et al., ICLR 2024): every ``lora_A`` stays frozen at its seeded
initialisation, identical on every party, and only ``lora_B`` and the head train and
travel (see :mod:`common.sharing`).

With A fixed the update of a layer is ``B·A``, linear in B, so the mean of the B
deltas gives exactly the mean of the clients' updates: ``mean(B_i)·A = mean(B_i·A)``,
which averaging both factors does not. The upload is the B half of the factors.
"""

from __future__ import annotations

from common.codec import AdapterState
from common.config import AGGREGATION_RULES
from server.aggregation.fedavg import FedAvg
from server.summation import RoundSum


class FederatedFrozenA:
    """The example-weighted mean of the B (and head) deltas; A never changes."""

    traits = AGGREGATION_RULES["ffa"]

    def aggregate(self, summed: RoundSum) -> AdapterState:
        """The FedAvg mean of what was shared (no ``lora_A`` is among it)."""
        return FedAvg().aggregate(summed)
