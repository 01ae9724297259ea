"""The ``tracking.*`` keys: where a run's records also go (:mod:`common.tracking`)."""

from __future__ import annotations

from dataclasses import dataclass

from common.config.keys import Check, satisfies, setting
from common.tracking.packages import missing_package


def _installed(module: str, key: str) -> Check:
    """Refuse a non-empty value while ``module``'s package is not installed."""
    return lambda value: missing_package(module, key) if value else None


@dataclass(frozen=True)
class TrackingConfig:
    """Where a run's records also go (``tracking.*``): an MLflow run, TensorBoard
    event files. A key set without its package is refused before anything starts,
    naming the extra to install."""

    mlflow_uri: str = setting(
        "tracking.mlflow-uri",
        "",
        "also log the run to MLflow: `sqlite:///runs/mlflow.db`, a tracking "
        "server's `http://host:5000`, or a file store `file:///abs/mlruns` (MLflow 3 "
        "wants `MLFLOW_ALLOW_FILE_STORE=true` for it); empty = off; needs "
        "`pip install 'fedgraft[tracking]'`",
        check=_installed("mlflow", "tracking.mlflow-uri"),
        resumable=True,
    )
    experiment: str = setting(
        "tracking.experiment",
        "fedgraft",
        "the MLflow experiment (created when missing)",
        check=satisfies(lambda name: bool(name.strip()), "must name an experiment"),
        resumable=True,
    )
    tensorboard_dir: str = setting(
        "tracking.tensorboard-dir",
        "",
        "also write TensorBoard event files to `<dir>/<run folder name>`; empty = "
        "off; needs `pip install 'fedgraft[tracking]'`",
        check=_installed("tensorboard", "tracking.tensorboard-dir"),
        resumable=True,
    )
