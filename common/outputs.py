"""A run's output folder: ``metrics.jsonl``, ``summary.json``, ``adapter/``,
``merged/``.

Every file is written so that a crash never leaves a half-written one behind: metrics
lines are flushed and synced one by one, and everything else is written to a temporary
name and renamed into place. What is written also goes to the run's trackers
(:mod:`common.tracking`: MLflow, TensorBoard), after it is safe on disk.
"""

from __future__ import annotations

import copy
import json
import os
import shutil
import tempfile
from collections.abc import Callable, Mapping, Sequence
from datetime import UTC, datetime
from pathlib import Path
from typing import TYPE_CHECKING, Any

from common.backbone import write_pooling_mode
from common.tracking.base import Tracker, Trackers

if TYPE_CHECKING:  # torch and transformers load only when a model is written
    from transformers import PreTrainedTokenizerBase

    from common.model import TextClassifier

METRICS_FILE = "metrics.jsonl"
SUMMARY_FILE = "summary.json"
ADAPTER_DIR = "adapter"
MERGED_DIR = "merged"
#: Folders a tracker keeps a copy of (``merged/`` holds a whole backbone).
TRACKED_FOLDERS = (ADAPTER_DIR,)
# sentence-transformers files that make ``merged/`` loadable by that library too.
_SENTENCE_TRANSFORMERS_FILES = (
    "config_sentence_transformers.json",
    "sentence_bert_config.json",
)


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


def write_sentence_modules(backbone_dir: Path, staging: Path) -> None:
    """The backbone's sentence-transformers modules up to its pooling, with their
    folders: the features the head was trained on.

    Later modules (all-MiniLM-L6-v2's ``2_Normalize``) are left out: the head reads
    the pooled features unnormalised, so a sentence-transformers user of ``merged/``
    gets those same features.
    """
    modules = json.loads((backbone_dir / "modules.json").read_text())
    kept = []
    for module in modules:
        kept.append(module)
        if module.get("path") and (backbone_dir / module["path"]).is_dir():
            shutil.copytree(backbone_dir / module["path"], staging / module["path"])
        if module.get("type", "").endswith("Pooling"):
            break
    (staging / "modules.json").write_text(json.dumps(kept, indent=2) + "\n")


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

    def save_adapter(self, model: TextClassifier, labels: tuple[str, ...]) -> Path:
        """PEFT-format adapter (``PeftModel.from_pretrained(backbone, dir)`` loads it)
        with the head, pooling mode and label map beside it."""
        from common.model import save_head

        staging = Path(tempfile.mkdtemp(prefix=".adapter-", dir=self.directory))
        model.encoder.save_pretrained(str(staging))
        save_head(model, staging, labels)
        return self._publish(staging, ADAPTER_DIR)

    def save_merged(
        self,
        model: TextClassifier,
        tokenizer: PreTrainedTokenizerBase,
        labels: tuple[str, ...],
        backbone_dir: Path,
    ) -> Path:
        """The backbone with the adapter merged in (``AutoModel`` loads it), the head,
        the pooling config, the tokenizer and the label map."""
        from common.model import save_head

        staging = Path(tempfile.mkdtemp(prefix=".merged-", dir=self.directory))
        merged = copy.deepcopy(model.encoder).merge_and_unload()
        merged.save_pretrained(str(staging))
        tokenizer.save_pretrained(str(staging))
        save_head(model, staging, labels)
        for name in _SENTENCE_TRANSFORMERS_FILES:
            if (backbone_dir / name).exists():
                shutil.copy2(backbone_dir / name, staging / name)
        if (backbone_dir / "modules.json").exists():
            write_sentence_modules(backbone_dir, staging)
        write_pooling_mode(staging, model.pooling)
        return self._publish(staging, MERGED_DIR)
