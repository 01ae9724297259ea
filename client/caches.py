"""What a client process keeps between messages, as objects its owner can drop.

A site's loaded model and its encoded rows outlive one message (virtual clients of a
simulation share a worker process), so they are cached; each cache is bounded, and
each belongs to a :class:`client.sites.SiteRuntime` (the ClientApp's, or a test's)
instead of a module, so a test builds a fresh one or calls ``clear``.
"""

from __future__ import annotations

from collections.abc import Callable, Hashable
from typing import Generic, TypeVar

K = TypeVar("K", bound=Hashable)
V = TypeVar("V")


class BoundedCache(Generic[K, V]):
    """Up to ``capacity`` values by key; when full, the oldest entry goes first.

    Parameters
    ----------
    capacity : int
        Entries kept; 1 keeps only the latest (a loaded model, to bound memory).
    """

    def __init__(self, capacity: int) -> None:
        if capacity < 1:
            raise ValueError(f"a cache holds at least one entry, not {capacity}")
        self.capacity = capacity
        self._entries: dict[K, V] = {}

    def get(self, key: K, make: Callable[[], V]) -> V:
        """The value under ``key``, or ``make()`` stored under it (after the oldest
        entries make room, so that a large model is not held twice)."""
        if key in self._entries:
            return self._entries[key]
        while len(self._entries) >= self.capacity:
            self._entries.pop(next(iter(self._entries)))
        value = make()
        self._entries[key] = value
        return value

    def clear(self) -> None:
        """Drop every entry."""
        self._entries.clear()

    def __contains__(self, key: object) -> bool:
        return key in self._entries

    def __len__(self) -> int:
        return len(self._entries)
