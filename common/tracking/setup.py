"""Building a run's trackers from ``tracking.*`` and closing them with the run."""

from __future__ import annotations

from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING, Any

from common.tracking.base import Tracker, Trackers

if TYPE_CHECKING:
    from common.config import TrackingConfig


def build_trackers(settings: TrackingConfig, run_dir: Path, kind: str) -> Trackers:
    """The trackers ``settings`` asks for (none when every ``tracking.*`` key is
    empty), each opened on a run named after ``run_dir``.

    Parameters
    ----------
    settings : TrackingConfig
        ``tracking.mlflow-uri``, ``tracking.experiment``, ``tracking.tensorboard-dir``.
    run_dir : Path
        The run's output folder; its name names the run.
    kind : str
        ``federated`` or ``centralized``, set as a tag.

    Raises
    ------
    ModuleNotFoundError
        When a key's package is missing (naming the key and the extra).
    ValueError
        When the MLflow store refuses the URI, naming ``tracking.mlflow-uri``.
    """
    trackers: list[Tracker] = []
    if settings.mlflow_uri:
        trackers.append(_mlflow_tracker(settings, run_dir, kind))
    if settings.tensorboard_dir:
        from common.tracking.tensorboard_events import TensorBoardTracker

        trackers.append(
            TensorBoardTracker(Path(settings.tensorboard_dir) / run_dir.name)
        )
    return Trackers(trackers)


def _mlflow_tracker(settings: TrackingConfig, run_dir: Path, kind: str) -> Tracker:
    from common.tracking.mlflow_run import MlflowTracker
    from common.tracking.packages import import_tracking_package

    exceptions = import_tracking_package("mlflow.exceptions", "tracking.mlflow-uri")
    tags = {"fedgraft.kind": kind, "fedgraft.output-dir": str(run_dir.resolve())}
    try:
        return MlflowTracker(
            settings.mlflow_uri, settings.experiment, run_dir.name, tags
        )
    except exceptions.MlflowException as error:
        raise ValueError(
            f"tracking.mlflow-uri = {settings.mlflow_uri!r}: MLflow refused it "
            f"({error.message}); give sqlite:///path/mlflow.db, a tracking server's "
            "http://host:port, or leave it empty"
        ) from None


@contextmanager
def open_tracker(
    settings: TrackingConfig,
    run_dir: Path,
    kind: str,
    params: Mapping[str, Any],
) -> Iterator[Trackers]:
    """Trackers for one run: ``params`` logged at once, closed when the block ends
    (marked failed when it raises).

    Parameters
    ----------
    settings, run_dir, kind
        As for :func:`build_trackers`.
    params : Mapping[str, Any]
        The run's flat config.
    """
    trackers = build_trackers(settings, run_dir, kind)
    trackers.log_params(params)
    failed = True
    try:
        yield trackers
        failed = False
    finally:
        trackers.close(failed)
