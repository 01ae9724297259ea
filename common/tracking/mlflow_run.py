"""An MLflow run of a fedgraft run: the config as params, every metrics line as
metrics at step ``round``, the summary's numbers and ``summary.json``, and the final
adapter folder as artifacts.

It talks to MLflow through ``MlflowClient`` only, never the fluent ``mlflow.*`` API,
whose active run is process-global state.
"""

from __future__ import annotations

import re
import time
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from common.tracking.base import STEP_KEY, numeric_items
from common.tracking.packages import import_tracking_package

#: MLflow's per-request limits (mlflow.utils.validation).
_PARAMS_PER_BATCH = 100
_METRICS_PER_BATCH = 1000
#: The summary's entries that are not results: the config (already the params) and
#: the last metrics line (already logged at its step).
_SUMMARY_SKIP = ("config", "final")
_BAD_NAME_CHARACTERS = re.compile(r"[^/\w.\- ]")


def metric_name(name: str) -> str:
    """``name`` with every character MLflow refuses in a metric name replaced by
    ``_`` (a per-label key may hold any character)."""
    return _BAD_NAME_CHARACTERS.sub("_", name)


def artifact_location(uri: str) -> str | None:
    """Where a new experiment keeps its artifacts: beside a SQLite database
    (``mlartifacts/``; MLflow's own default is ``./mlruns`` under whatever folder the
    run starts in), else the store's default (``None``)."""
    if not uri.startswith("sqlite:///"):
        return None
    database = Path(uri.removeprefix("sqlite:///")).expanduser()
    return (database.parent / "mlartifacts").resolve().as_uri()


def _chunks(items: Sequence[Any], size: int) -> list[Sequence[Any]]:
    return [items[start : start + size] for start in range(0, len(items), size)]


class MlflowTracker:
    """One MLflow run in experiment ``experiment`` of the store at ``uri``.

    Parameters
    ----------
    uri : str
        ``tracking.mlflow-uri``: ``sqlite:///runs/mlflow.db``, a tracking server's
        ``http://host:5000``, or a local file store (``file:///abs/mlruns``).
    experiment : str
        ``tracking.experiment``; created when missing.
    run_name : str
        The run's name in the MLflow UI (the output folder's name).
    tags : Mapping[str, str]
        Set on the run (the output folder, the kind of run).
    """

    def __init__(
        self, uri: str, experiment: str, run_name: str, tags: Mapping[str, str]
    ) -> None:
        tracking = import_tracking_package("mlflow.tracking", "tracking.mlflow-uri")
        self.client = tracking.MlflowClient(tracking_uri=uri)
        found = self.client.get_experiment_by_name(experiment)
        experiment_id = (
            found.experiment_id
            if found is not None
            else self.client.create_experiment(
                experiment, artifact_location=artifact_location(uri)
            )
        )
        run = self.client.create_run(experiment_id, run_name=run_name, tags=tags)
        self.run_id: str = run.info.run_id
        self._last_step = 0

    def log_params(self, params: Mapping[str, Any]) -> None:
        """Log every config key as a param (MLflow keeps params as text)."""
        from mlflow.entities import Param

        entries = [Param(key, str(value)) for key, value in sorted(params.items())]
        for chunk in _chunks(entries, _PARAMS_PER_BATCH):
            self.client.log_batch(self.run_id, params=list(chunk))

    def _log_numbers(
        self,
        record: Mapping[str, Any],
        step: int,
        prefix: str = "",
        skip: Sequence[str] = (),
    ) -> None:
        from mlflow.entities import Metric

        stamp = int(time.time() * 1000)
        metrics = [
            Metric(metric_name(name), value, stamp, step)
            for name, value in numeric_items(record, prefix, skip)
        ]
        for chunk in _chunks(metrics, _METRICS_PER_BATCH):
            self.client.log_batch(self.run_id, metrics=list(chunk))

    def log_round(self, row: Mapping[str, Any]) -> None:
        """Log every number of ``row`` at step ``row["round"]``."""
        self._last_step = int(row[STEP_KEY])
        self._log_numbers(row, self._last_step, skip=(STEP_KEY,))

    def log_summary(self, summary: Mapping[str, Any]) -> None:
        """Log the summary's numbers as ``summary/...`` metrics at the last round
        (totals, best round, privacy spent) and the document as ``summary.json``."""
        self._log_numbers(summary, self._last_step, "summary/", _SUMMARY_SKIP)
        self.client.log_dict(self.run_id, dict(summary), "summary.json")

    def log_folder(self, folder: Path) -> None:
        """Upload ``folder`` as the artifact folder of the same name."""
        self.client.log_artifacts(self.run_id, str(folder), artifact_path=folder.name)

    def close(self, failed: bool) -> None:
        """Mark the run ``FINISHED`` (or ``FAILED``)."""
        self.client.set_terminated(self.run_id, "FAILED" if failed else "FINISHED")
