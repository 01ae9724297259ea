"""A client process's caches are bounded objects that a test can drop (issue 16)."""

from __future__ import annotations

import pytest

from client.caches import BoundedCache
from client.runtime import TextCaches
from client.sites import SiteRuntime
from common.tasks import TASKS


def test_a_full_cache_drops_its_oldest_entry_first() -> None:
    # Prepare
    cache: BoundedCache[str, int] = BoundedCache(2)
    made: list[str] = []

    def make(key: str) -> int:
        made.append(key)
        return len(made)

    # Execute
    for key in ("a", "b", "a", "c", "a"):
        cache.get(key, lambda key=key: make(key))

    # Assert: "a" served once from memory, then evicted by "c" and made again
    assert made == ["a", "b", "c", "a"]
    assert "a" in cache and "c" in cache and "b" not in cache and len(cache) == 2


def test_a_cache_of_one_keeps_only_the_latest_and_frees_it_before_making_the_next() -> (
    None
):
    # Prepare
    cache: BoundedCache[str, str] = BoundedCache(1)
    cache.get("old", lambda: "old model")
    seen: list[int] = []

    # Execute
    cache.get("new", lambda: seen.append(len(cache)) or "new model")

    # Assert
    assert seen == [0] and "old" not in cache and "new" in cache


def test_a_cache_refuses_no_room() -> None:
    with pytest.raises(ValueError, match="at least one entry"):
        BoundedCache(0)


def test_each_runtime_keeps_its_own_caches_and_clear_drops_them() -> None:
    # Prepare
    first, second = SiteRuntime(), SiteRuntime()
    task = TASKS["text-cls"]

    # Execute
    kept = first.caches_of(task, TextCaches)
    other = second.caches_of(task, TextCaches)
    again = first.caches_of(task, TextCaches)
    first.clear()

    # Assert
    assert kept is not other and again is kept
    assert first.caches_of(task, TextCaches) is not kept
    assert second.caches_of(task, TextCaches) is other
