"""Experiment tracking: a run's records read back with MLflow's client and
TensorBoard's event reader, and the trackers' own behaviour (fan-out, a tracker that
fails mid-run, missing packages).

The MLflow store here is MLflow's file store in a temporary folder; the runs are the
real coordinator and ClientApp over the in-process grid. The run through ``fedgraft
simulate`` (Ray), into a SQLite store, is in test_simulation.py.
"""

from __future__ import annotations

import json
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

import pytest

from common.config import ConfigError, RunConfig, TrackingConfig
from common.outputs import RunOutputs
from common.tracking.base import Trackers, numeric_items
from common.tracking.mlflow_run import metric_name
from common.tracking.setup import open_tracker
from tests.conftest import hide_package, write_jsonl
from tests.task_runs import federate, read_metrics
from tests.test_federation import make_config
from tests.tracking_records import (
    expected_series,
    mismatches,
    mlflow_history,
    mlflow_run,
    mlflow_series,
    tensorboard_events,
    tensorboard_series,
)

pytest.importorskip("mlflow")
pytest.importorskip("tensorboard")


@pytest.fixture(scope="module", autouse=True)
def allow_file_store() -> Iterator[None]:
    """MLflow 3 keeps its file store behind an opt-in; these tests use it because a
    new SQLite store takes seconds of migrations (SQLite: see test_simulation.py)."""
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("MLFLOW_ALLOW_FILE_STORE", "true")
        yield


@pytest.fixture(scope="module")
def tracked_run(
    tiny_backbone: Path, tmp_path_factory: pytest.TempPathFactory
) -> tuple[RunConfig, list[dict[str, Any]]]:
    """One two-round run with client-level DP, tracked by MLflow and TensorBoard,
    shared by the read-back tests; its config and metrics lines."""
    folder = tmp_path_factory.mktemp("tracked")
    rows = [
        {"text": f"please {label} number {index}", "label": label, "domain": domain}
        for domain, labels in (("bank", ("send", "balance")), ("travel", ("fly",)))
        for label in labels
        for index in range(4)
    ]
    data = write_jsonl(folder / "rows.jsonl", rows)
    config = make_config(
        tiny_backbone,
        data,
        folder / "out",
        **{
            "tracking.mlflow-uri": (folder / "mlruns").as_uri(),
            "tracking.experiment": "tracking-test",
            "tracking.tensorboard-dir": str(folder / "tb"),
            "dp.enabled": True,
        },
    )
    _, lines = federate(config, folder / "cache")
    return config, lines


def test_mlflow_holds_every_metrics_line_value_at_its_round(
    tracked_run: tuple[RunConfig, list[dict[str, Any]]],
) -> None:
    # Prepare
    config, rows = tracked_run
    client, run = mlflow_run(config.tracking.mlflow_uri, "tracking-test")
    expected = expected_series(rows)

    # Execute
    logged = mlflow_series(client, run.info.run_id, expected)

    # Assert
    assert {"eval_accuracy", "bytes_up", "bytes_down", "epsilon"} <= set(expected)
    assert mismatches(expected, logged) == []


def test_mlflow_run_holds_the_config_summary_and_final_adapter(
    tracked_run: tuple[RunConfig, list[dict[str, Any]]],
) -> None:
    # Prepare
    config, rows = tracked_run
    client, run = mlflow_run(config.tracking.mlflow_uri, "tracking-test")
    output = Path(config.output_dir)

    # Execute
    artifacts = {a.path for a in client.list_artifacts(run.info.run_id, "adapter")}
    summary = json.loads((output / "summary.json").read_text())

    # Assert
    assert run.info.status == "FINISHED"
    assert run.info.run_name == output.name
    assert run.data.params == {k: str(v) for k, v in config.as_dict().items()}
    assert "adapter/adapter_config.json" in artifacts
    assert run.data.metrics["summary/totals/bytes_up"] == summary["totals"]["bytes_up"]
    assert sum(row["bytes_up"] for row in rows) == summary["totals"]["bytes_up"]


def test_tensorboard_events_hold_every_metrics_line_value_at_its_round(
    tracked_run: tuple[RunConfig, list[dict[str, Any]]],
) -> None:
    # Prepare
    config, rows = tracked_run
    log_dir = Path(config.tracking.tensorboard_dir) / Path(config.output_dir).name

    # Execute
    events = tensorboard_events(log_dir)

    # Assert
    assert mismatches(expected_series(rows), tensorboard_series(events)) == []
    texts = {"config/text_summary", "summary/text_summary", "adapter/text_summary"}
    assert texts <= set(events.Tags()["tensors"])


def test_epsilon_of_a_private_run_is_logged_every_round(
    tracked_run: tuple[RunConfig, list[dict[str, Any]]],
) -> None:
    # Prepare
    config, rows = tracked_run
    client, run = mlflow_run(config.tracking.mlflow_uri, "tracking-test")

    # Execute
    epsilon = mlflow_history(client, run.info.run_id, "epsilon")

    # Assert
    expected = {row["round"]: row["epsilon"] for row in rows if "epsilon" in row}
    assert set(expected) >= {1, 2} and expected[2] > expected[1] > 0
    assert epsilon == pytest.approx(expected)
    summary = json.loads((Path(config.output_dir) / "summary.json").read_text())
    assert run.data.metrics["summary/privacy/epsilon"] == pytest.approx(
        summary["privacy"]["epsilon"]
    )


def test_a_run_that_raises_is_marked_failed(tmp_path: Path) -> None:
    # Prepare
    uri = (tmp_path / "mlruns").as_uri()
    settings = TrackingConfig(mlflow_uri=uri, experiment="failing")

    # Execute
    with (
        pytest.raises(RuntimeError, match="boom"),
        open_tracker(settings, tmp_path / "run", "federated", {"seed": 3}),
    ):
        raise RuntimeError("boom")

    # Assert
    _, run = mlflow_run(uri, "failing")
    assert run.info.status == "FAILED"
    assert run.data.params == {"seed": "3"}


def test_a_resumed_run_logs_the_completed_rounds_again(tmp_path: Path) -> None:
    # Prepare
    received = Recorder()
    completed = [{"round": 0, "eval_loss": 1.5}, {"round": 1, "eval_loss": 1.25}]

    # Execute
    outputs = RunOutputs(tmp_path, completed, received)
    outputs.append_metrics({"round": 2, "eval_loss": 1.0})

    # Assert
    assert [row["round"] for row in received.rounds] == [0, 1, 2]


def test_only_the_adapter_folder_is_handed_to_the_tracker(tmp_path: Path) -> None:
    # Prepare
    received = Recorder()
    outputs = RunOutputs(tmp_path, tracker=received)

    # Execute
    for name in ("adapter", "merged"):
        outputs.write_folder(name, lambda folder: (folder / "x.json").write_text("{}"))

    # Assert
    assert [folder.name for folder in received.folders] == ["adapter"]


class Recorder:
    """A tracker that keeps what it is given (and can be told to fail)."""

    def __init__(self, fail_on: str = "") -> None:
        self.fail_on = fail_on
        self.rounds: list[Mapping[str, Any]] = []
        self.folders: list[Path] = []
        self.closed: list[bool] = []

    def _maybe_fail(self, call: str) -> None:
        if call == self.fail_on:
            raise ConnectionError("tracking server went away")

    def log_params(self, params: Mapping[str, Any]) -> None:
        self._maybe_fail("params")

    def log_round(self, row: Mapping[str, Any]) -> None:
        self._maybe_fail("round")
        self.rounds.append(row)

    def log_summary(self, summary: Mapping[str, Any]) -> None:
        self._maybe_fail("summary")

    def log_folder(self, folder: Path) -> None:
        self._maybe_fail("folder")
        self.folders.append(folder)

    def close(self, failed: bool) -> None:
        self.closed.append(failed)


def test_a_tracker_that_fails_mid_run_is_dropped_and_the_others_go_on(
    caplog: pytest.LogCaptureFixture,
) -> None:
    # Prepare
    failing, working = Recorder(fail_on="round"), Recorder()
    trackers = Trackers([failing, working])

    # Execute
    trackers.log_round({"round": 1})
    trackers.log_round({"round": 2})
    trackers.close(failed=False)

    # Assert
    assert [row["round"] for row in working.rounds] == [1, 2]
    assert failing.closed == [] and working.closed == [False]
    assert "Recorder could not log a round (ConnectionError" in caplog.text


@pytest.mark.parametrize(
    ("record", "expected"),
    [
        ({"round": 1, "loss": 0.5}, [("loss", 0.5)]),
        ({"ok": True, "n": 3}, [("ok", 1.0), ("n", 3.0)]),
        ({"phase": "lp", "ids": [1, 2], "none": None}, []),
        ({"per": {"a": 1, "b": {"c": 2.5}}}, [("per/a", 1.0), ("per/b/c", 2.5)]),
    ],
)
def test_numeric_items_flatten_numbers_and_leave_out_the_rest(
    record: dict[str, Any], expected: list[tuple[str, float]]
) -> None:
    # Execute
    items = list(numeric_items(record, skip=("round",)))

    # Assert
    assert items == expected


@pytest.mark.parametrize(
    ("name", "expected"),
    [("eval_accuracy", "eval_accuracy"), ("per/bank:a?", "per/bank_a_")],
)
def test_metric_names_are_made_acceptable_to_mlflow(name: str, expected: str) -> None:
    assert metric_name(name) == expected


@pytest.mark.parametrize(
    ("key", "value", "package"),
    [
        ("tracking.mlflow-uri", "sqlite:///m.db", "mlflow"),
        ("tracking.tensorboard-dir", "tb", "tensorboard"),
    ],
)
def test_a_tracking_key_without_its_package_names_the_key_and_the_extra(
    key: str, value: str, package: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Prepare: the package looks absent
    hide_package(monkeypatch, package)

    # Execute
    with pytest.raises(ConfigError) as caught:
        RunConfig.from_flat({key: value})

    # Assert
    message = str(caught.value)
    assert f"'{key}'" in message and f"'{package}'" in message
    assert "pip install 'fedgraft[tracking]'" in message


def test_an_mlflow_uri_the_store_refuses_names_the_key(tmp_path: Path) -> None:
    # Prepare
    settings = TrackingConfig(mlflow_uri="nosuchscheme://x", experiment="e")

    # Execute / Assert
    with (
        pytest.raises(ValueError, match="tracking.mlflow-uri = 'nosuchscheme://x'"),
        open_tracker(settings, tmp_path, "federated", {}),
    ):
        pass


def test_untracked_runs_open_no_tracker(tmp_path: Path) -> None:
    # Execute
    with open_tracker(TrackingConfig(), tmp_path, "federated", {"seed": 1}) as t:
        trackers = list(t.trackers)

    # Assert
    assert trackers == []


def test_a_centralised_run_is_tracked_as_its_own_kind(
    tiny_backbone: Path, small_jsonl: Path, tmp_path: Path
) -> None:
    # Prepare
    from simulations.baselines import train_centralized

    uri = (tmp_path / "mlruns").as_uri()
    config = make_config(
        tiny_backbone,
        small_jsonl,
        tmp_path / "central",
        **{"num-server-rounds": 1, "tracking.mlflow-uri": uri},
    )

    # Execute
    output = train_centralized(config)

    # Assert
    rows = read_metrics(output)
    client, run = mlflow_run(uri, "fedgraft")
    assert run.data.tags["fedgraft.kind"] == "centralized"
    logged = mlflow_series(client, run.info.run_id, expected_series(rows))
    assert mismatches(expected_series(rows), logged) == []
