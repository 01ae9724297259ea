"""FedSA-LoRA (Guo et al., ICLR 2025): share A, keep B at home.

The A factors learn what is common to every site and are averaged; each site keeps its
own B factors between rounds (in its Flower context state, mirrored on its disk by
client.site_state so that a resumed run has them), so its model is
personalised (see :mod:`common.sharing`). The head is shared. The global adapter's B
factors keep their initial values, so the coordinator's accuracy is that of the shared
part alone; each client reports the accuracy of its personalised model on its own
evaluation rows (a causal language model: its perplexity), and the metrics line
carries ``personal_accuracy_mean`` and ``_min`` (``personal_perplexity_mean`` and
``_max``). Which rows a site evaluates on: see ``client.client_app``.
"""

from __future__ import annotations

from common.codec import AdapterState
from common.config import AGGREGATION_RULES
from server.aggregation.fedavg import FedAvg
from server.summation import RoundSum


class FedSA:
    """The example-weighted mean of the shared A (and head) deltas."""

    traits = AGGREGATION_RULES["fedsa"]

    def aggregate(self, summed: RoundSum) -> AdapterState:
        """The FedAvg mean of what was shared (no ``lora_B`` is among it)."""
        return FedAvg().aggregate(summed)
