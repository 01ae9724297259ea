"""A run's output folder: ``metrics.jsonl``, ``summary.json``, ``adapter/``,
``merged/``.

Every file is written so that a crash never leaves a half-written one behind: metrics
lines are flushed and synced one by one, and everything else is written to a temporary
name and renamed into place. What is written also goes to the run's trackers
(:mod:`common.tracking`: MLflow, TensorBoard), after it is safe on disk.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from collections.abc import Callable, Mapping, Sequence
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from common.tracking.base import Tracker, Trackers

METRICS_FILE = "metrics.jsonl"
SUMMARY_FILE = "summary.json"
ADAPTER_DIR = "adapter"
MERGED_DIR = "merged"
#: Folders a tracker keeps a copy of (``merged/`` holds a whole backbone).
TRACKED_FOLDERS = (ADAPTER_DIR,)


def default_output_dir(kind: str) -> Path:
    """``runs/<kind>-<UTC timestamp>`` under the working directory."""
    return Path("runs") / f"{kind}-{datetime.now(UTC):%Y%m%d-%H%M%S}"


def _write_json_atomically(path: Path, document: Mapping[str, Any]) -> None:
    handle, staging = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
    with os.fdopen(handle, "w") as stream:
        json.dump(document, stream, indent=2, sort_keys=True, default=str)
        stream.flush()
        os.fsync(stream.fileno())
    os.replace(staging, path)


def _replace_dir(staging: Path, target: Path) -> None:
    if target.exists():
        shutil.rmtree(target)
    staging.rename(target)


class RunOutputs:
    """Writer of one run's output folder.

    Parameters
    ----------
    directory : Path
        Created if missing. An existing ``metrics.jsonl`` is replaced.
    rows : Sequence[Mapping], optional
        Metrics lines to start from (a resumed run's completed rounds); they are
        passed to ``tracker`` too, so its record of the run is whole.
    tracker : Tracker, optional
        Receives every metrics line, the summary and the final ``adapter/``.
    """

    def __init__(
        self,
        directory: Path,
        rows: Sequence[Mapping[str, Any]] = (),
        tracker: Tracker | None = None,
    ) -> None:
        self.directory = directory
        self.tracker: Tracker = tracker if tracker is not None else Trackers()
        directory.mkdir(parents=True, exist_ok=True)
        lines = "".join(json.dumps(dict(row), sort_keys=True) + "\n" for row in rows)
        handle, staging = tempfile.mkstemp(prefix=f".{METRICS_FILE}.", dir=directory)
        with os.fdopen(handle, "w") as stream:
            stream.write(lines)
        os.replace(staging, directory / METRICS_FILE)
        for row in rows:
            self.tracker.log_round(row)

    def append_metrics(self, row: Mapping[str, Any]) -> None:
        """Append one round's metrics as one JSON line, synced to disk."""
        with (self.directory / METRICS_FILE).open("a") as stream:
            stream.write(json.dumps(dict(row), sort_keys=True) + "\n")
            stream.flush()
            os.fsync(stream.fileno())
        self.tracker.log_round(row)

    def write_summary(self, summary: Mapping[str, Any]) -> None:
        """Write ``summary.json`` atomically."""
        _write_json_atomically(self.directory / SUMMARY_FILE, summary)
        self.tracker.log_summary(summary)

    def _publish(self, staging: Path, name: str) -> Path:
        """Rename the filled ``staging`` folder to ``name``; hand it to the tracker
        when it is one it keeps."""
        target = self.directory / name
        _replace_dir(staging, target)
        if name in TRACKED_FOLDERS:
            self.tracker.log_folder(target)
        return target

    def write_folder(self, name: str, write: Callable[[Path], None]) -> Path:
        """Have ``write`` fill a staging folder, then rename it to ``name`` (any
        task's ``adapter/`` or ``merged/``), replacing an older one."""
        staging = Path(tempfile.mkdtemp(prefix=f".{name}-", dir=self.directory))
        write(staging)
        return self._publish(staging, name)
