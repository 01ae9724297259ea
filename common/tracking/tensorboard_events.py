"""TensorBoard event files of a fedgraft run: every metrics line's numbers as scalars
at step ``round``, the config and the summary as text.

The events are written with ``torch.utils.tensorboard`` (torch is already a
dependency; it needs the ``tensorboard`` package), one folder per run so that several
runs sit side by side in one ``tensorboard --logdir``.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from common.tracking.base import STEP_KEY, numeric_items
from common.tracking.packages import import_tracking_package

#: The summary's entries already shown elsewhere (config text, last round's scalars).
_SUMMARY_SKIP = ("config", "final")


def _markdown_table(params: Mapping[str, Any]) -> str:
    rows = "\n".join(f"| {key} | {value} |" for key, value in sorted(params.items()))
    return f"| key | value |\n| --- | --- |\n{rows}"


class TensorBoardTracker:
    """Event files under ``log_dir``.

    Parameters
    ----------
    log_dir : Path
        ``<tracking.tensorboard-dir>/<run name>``; created when missing.
    """

    def __init__(self, log_dir: Path) -> None:
        import_tracking_package("tensorboard", "tracking.tensorboard-dir")
        from torch.utils.tensorboard import SummaryWriter

        self.log_dir = log_dir
        self.writer = SummaryWriter(log_dir=str(log_dir))
        self._last_step = 0

    def log_params(self, params: Mapping[str, Any]) -> None:
        """The flat config as a markdown table under the text tag ``config``."""
        self.writer.add_text("config", _markdown_table(params), global_step=0)
        self.writer.flush()

    def log_round(self, row: Mapping[str, Any]) -> None:
        """Every number of ``row`` as a scalar at step ``row["round"]``."""
        self._last_step = int(row[STEP_KEY])
        for name, value in numeric_items(row, skip=(STEP_KEY,)):
            self.writer.add_scalar(name, value, global_step=self._last_step)
        self.writer.flush()

    def log_summary(self, summary: Mapping[str, Any]) -> None:
        """The summary's numbers as ``summary/...`` scalars at the last round, and
        the whole document as text."""
        for name, value in numeric_items(summary, "summary/", _SUMMARY_SKIP):
            self.writer.add_scalar(name, value, global_step=self._last_step)
        document = json.dumps(summary, indent=2, sort_keys=True, default=str)
        self.writer.add_text("summary", f"```\n{document}\n```", self._last_step)
        self.writer.flush()

    def log_folder(self, folder: Path) -> None:
        """Event files hold no files: record where the folder is instead."""
        self.writer.add_text(folder.name, str(folder.resolve()), self._last_step)
        self.writer.flush()

    def close(self, failed: bool) -> None:
        """Flush and close the event file."""
        self.writer.close()
