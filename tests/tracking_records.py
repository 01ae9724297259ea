"""Reading a run's tracking records back: MLflow through ``MlflowClient``,
TensorBoard through its event reader."""

from __future__ import annotations

import math
from collections.abc import Iterable
from pathlib import Path
from typing import Any

from common.tracking.base import numeric_items


def mlflow_run(uri: str, experiment: str) -> tuple[Any, Any]:
    """The client and the only run of ``experiment`` in the store at ``uri``."""
    from mlflow.tracking import MlflowClient

    client = MlflowClient(tracking_uri=uri)
    found = client.get_experiment_by_name(experiment)
    assert found is not None
    runs = client.search_runs([found.experiment_id])
    assert len(runs) == 1
    return client, runs[0]


def mlflow_history(client: Any, run_id: str, name: str) -> dict[int, float]:
    """``{step: value}`` of one metric."""
    return {m.step: m.value for m in client.get_metric_history(run_id, name)}


def mlflow_series(
    client: Any, run_id: str, names: Iterable[str]
) -> dict[str, dict[int, float]]:
    """``{name: {step: value}}`` of the named metrics of one MLflow run."""
    return {name: mlflow_history(client, run_id, name) for name in names}


def tensorboard_events(log_dir: Path) -> Any:
    """The event files of one run folder, loaded."""
    from tensorboard.backend.event_processing.event_accumulator import (
        EventAccumulator,
    )

    accumulator = EventAccumulator(str(log_dir))
    accumulator.Reload()
    return accumulator


def tensorboard_series(events: Any) -> dict[str, dict[int, float]]:
    """``{tag: {step: value}}`` of every scalar in loaded event files."""
    return {
        tag: {event.step: event.value for event in events.Scalars(tag)}
        for tag in events.Tags()["scalars"]
    }


def expected_series(rows: list[dict[str, Any]]) -> dict[str, dict[int, float]]:
    """Every number of every metrics line, as ``{name: {round: value}}``."""
    series: dict[str, dict[int, float]] = {}
    for row in rows:
        for name, value in numeric_items(row, skip=("round",)):
            series.setdefault(name, {})[row["round"]] = value
    return series


def mismatches(
    expected: dict[str, dict[int, float]],
    logged: dict[str, dict[int, float]],
    rel_tol: float = 1e-6,
) -> list[str]:
    """The names whose logged steps or values differ from ``expected`` (NaN equals
    NaN; TensorBoard keeps float32, hence the tolerance)."""

    def same(left: float, right: float) -> bool:
        both_nan = math.isnan(left) and math.isnan(right)
        return both_nan or math.isclose(left, right, rel_tol=rel_tol, abs_tol=1e-6)

    return [
        name
        for name, by_step in expected.items()
        if set(logged.get(name, {})) != set(by_step)
        or not all(same(logged[name][step], v) for step, v in by_step.items())
    ]
