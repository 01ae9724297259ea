"""Pooled features kept per process while they cannot change.

While only the head trains (feature extraction, the linear-probe rounds of lp-ft, or
the coordinator evaluating a new head on unchanged adapters) the pooled features of a
row cannot change, so each party computes them once and keys them by the rows and
:func:`common.sharing.encoder_digest`. Every task with a head uses it.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Callable

import torch

#: The live bar's name while pooled features are computed (rows done / rows).
FEATURE_PASS = "feature pass (rows)"


class FeatureCache:
    """A few feature matrices keyed by ``(rows key, encoder digest)``.

    Parameters
    ----------
    capacity : int
        Matrices kept; the least recently used goes first.
    """

    def __init__(self, capacity: int = 8) -> None:
        self.capacity = capacity
        self._entries: OrderedDict[tuple[str, str], torch.Tensor] = OrderedDict()

    def get(
        self, rows_key: str, digest: str, compute: Callable[[], torch.Tensor]
    ) -> torch.Tensor:
        """The cached features, or ``compute()`` stored under the key."""
        key = (rows_key, digest)
        if key in self._entries:
            self._entries.move_to_end(key)
            return self._entries[key]
        features = compute()
        self._entries[key] = features
        while len(self._entries) > self.capacity:
            self._entries.popitem(last=False)
        return features

    def __len__(self) -> int:
        return len(self._entries)
