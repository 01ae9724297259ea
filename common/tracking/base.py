"""The tracker protocol and a fan-out to several trackers.

A tracker receives exactly what a run writes to its output folder: the flat config
once, every ``metrics.jsonl`` line, ``summary.json`` and the final adapter folder.
It logs whatever numeric keys a line holds, never a fixed list, so new metrics reach
every tool without touching the trackers.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any, Protocol

log = logging.getLogger(__name__)

#: The metrics line's step column (the round), logged as the step, not as a value.
STEP_KEY = "round"


class Tracker(Protocol):
    """Where a run's records go besides its output folder."""

    def log_params(self, params: Mapping[str, Any]) -> None:
        """Log the run's flat configuration once, at the start."""

    def log_round(self, row: Mapping[str, Any]) -> None:
        """Log one ``metrics.jsonl`` line at step ``row["round"]``."""

    def log_summary(self, summary: Mapping[str, Any]) -> None:
        """Log the end-of-run ``summary.json``."""

    def log_folder(self, folder: Path) -> None:
        """Keep a copy of an output folder (the final adapter)."""

    def close(self, failed: bool) -> None:
        """End the run, marked failed when the run raised."""


def numeric_items(
    record: Mapping[str, Any], prefix: str = "", skip: Sequence[str] = ()
) -> Iterator[tuple[str, float]]:
    """Every number in ``record`` as ``(name, value)``; nested mappings give
    ``outer/inner`` names. Booleans count as 0/1; text, lists and ``None`` are left
    out (they are not a time series).

    Parameters
    ----------
    record : Mapping
        A metrics line or a summary.
    prefix : str
        Put before every name (``"summary/"``).
    skip : Sequence[str]
        Top-level keys to leave out.
    """
    for key, value in record.items():
        if key in skip:
            continue
        name = f"{prefix}{key}"
        if isinstance(value, Mapping):
            yield from numeric_items(value, f"{name}/")
        elif isinstance(value, bool | int | float):
            yield name, float(value)


class Trackers:
    """Several trackers fed as one, in order; what a run's output writer holds.

    A tracker that fails mid-run (a tracking server gone away) is logged and
    dropped: ``metrics.jsonl`` is already written, and the federation goes on.
    With no trackers every call does nothing.

    Parameters
    ----------
    trackers : Sequence[Tracker]
        Each receives every call.
    """

    def __init__(self, trackers: Sequence[Tracker] = ()) -> None:
        self.trackers = list(trackers)

    def _each(self, what: str, call: Callable[[Tracker], None]) -> None:
        for tracker in list(self.trackers):
            try:
                call(tracker)
            except Exception as error:  # noqa: BLE001 (any store error: go on)
                log.warning(
                    "%s could not %s (%s: %s); it tracks nothing more of this run",
                    type(tracker).__name__,
                    what,
                    type(error).__name__,
                    error,
                )
                self.trackers.remove(tracker)

    def log_params(self, params: Mapping[str, Any]) -> None:
        """Log ``params`` with every tracker."""
        self._each("log the config", lambda tracker: tracker.log_params(params))

    def log_round(self, row: Mapping[str, Any]) -> None:
        """Log ``row`` with every tracker."""
        self._each("log a round", lambda tracker: tracker.log_round(row))

    def log_summary(self, summary: Mapping[str, Any]) -> None:
        """Log ``summary`` with every tracker."""
        self._each("log the summary", lambda tracker: tracker.log_summary(summary))

    def log_folder(self, folder: Path) -> None:
        """Log ``folder`` with every tracker."""
        self._each(f"log {folder.name}/", lambda tracker: tracker.log_folder(folder))

    def close(self, failed: bool) -> None:
        """Close every tracker (each once: a closed one is dropped)."""
        self._each("close", lambda tracker: tracker.close(failed))
        self.trackers.clear()
