"""A client's validated contribution to a round."""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from common.codec import AdapterState


@dataclass(frozen=True)
class Contribution:
    """One accepted client reply.

    Attributes
    ----------
    node_id : int
        The SuperNode that sent it.
    change : AdapterState
        The decoded float32 adapter delta.
    weight : float
        The client's example count (its weight in the mean).
    metrics : dict[str, float]
        Training metrics the client reported.
    label_counts : np.ndarray or None
        ``(num_labels,) float32`` rows per label, when the rule asked for them.
    """

    node_id: int
    change: AdapterState
    weight: float
    metrics: dict[str, float] = field(default_factory=dict)
    label_counts: np.ndarray | None = None
