"""FlexLoRA (Bai et al., NeurIPS 2024): clients of different LoRA ranks.

Each site may train its own rank (node config ``lora.r``, at most the run's
``lora.r``). A client refactorises the global adapter at its rank, trains, and sends
its trained factors (the head as a delta). The coordinator averages the per-module
products ``ΔW_k = (alpha / r_k)·B_k·A_k`` weighted by examples, and keeps the rank-``R``
truncated SVD of the mean as the global factors (``R`` = the run's ``lora.r``). Since
truncations are nested, a client's refactorisation at its rank is the truncated SVD of
the mean product at that rank. It reads each client's factors, so it cannot run behind
secure aggregation.
"""

from __future__ import annotations

import numpy as np

from common.codec import AdapterState
from common.config import AGGREGATION_RULES
from common.low_rank import factor_pairs, factorise, product
from common.sharing import is_head
from server.summation import RoundSum


class FlexLoRA:
    """Mean of the clients' low-rank products, truncated back to rank ``rank``.

    Parameters
    ----------
    rank : int
        The global adapter's rank (the run's ``lora.r``).
    alpha : float
        LoRA's ``alpha`` (the same for every client).
    """

    traits = AGGREGATION_RULES["flexlora"]

    def __init__(self, rank: int, alpha: float) -> None:
        self.rank = rank
        self.alpha = alpha

    def aggregate(self, summed: RoundSum) -> AdapterState:
        """The change from the global factors to the truncated mean product, and the
        example-weighted mean of the head deltas."""
        contributions = summed.contributions
        weights = np.array([c.weight for c in contributions], np.float64)
        weights /= weights.sum()
        step: AdapterState = {}
        for name in summed.reference:
            if is_head(name):
                step[name] = sum(
                    w * c.change[name].astype(np.float64)
                    for w, c in zip(weights, contributions, strict=True)
                ).astype(np.float32)
        for a_name, b_name in factor_pairs(summed.reference).values():
            mean = sum(
                w * product(c.change[a_name], c.change[b_name], self.alpha)
                for w, c in zip(weights, contributions, strict=True)
            )  # (out, in)
            a, b = factorise(mean, self.rank, self.alpha)
            step[a_name] = a - summed.reference[a_name]
            step[b_name] = b - summed.reference[b_name]
        return step
