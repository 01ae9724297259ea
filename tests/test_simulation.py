"""Flower's Simulation Engine (Ray) driven two ways: ``fedgraft simulate`` and
``flwr run .``."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest

from tests.conftest import REPO_ROOT, flower_env, write_jsonl
from tests.tracking_records import (
    expected_series,
    mismatches,
    mlflow_run,
    mlflow_series,
    tensorboard_events,
    tensorboard_series,
)

pytestmark = [pytest.mark.integration, pytest.mark.slow]

BIN = Path(sys.executable).parent


def local_flower_env(tmp_path: Path) -> dict[str, str]:
    """A private FLWR_HOME and local SuperLink port for one test."""
    env = flower_env(
        tmp_path / "flwr-home",
        '[superlink]\ndefault = "local"\n\n[superlink.local]\naddress = ":local:"\n',
    )
    env["FLWR_LOCAL_SUPERLINK_HTTP_API_PORT"] = str(39500 + os.getpid() % 400)
    return env


def flower_processes(home: str) -> dict[int, str]:
    """pid -> command line of the live Flower processes started with ``home`` as
    FLWR_HOME (the SuperLink ``flwr run`` starts and the processes it starts)."""
    found = {}
    for proc in Path("/proc").iterdir():
        if not proc.name.isdigit():
            continue
        try:
            environ = (proc / "environ").read_bytes()
            command = (proc / "cmdline").read_bytes().replace(b"\0", b" ").decode()
            state = (proc / "stat").read_text().rsplit(")", 1)[1].split()[0]
        except (OSError, IndexError):
            continue
        if state != "Z" and f"FLWR_HOME={home}".encode() in environ.split(b"\0"):
            if "flower-" in command or "flwr-" in command:
                found[int(proc.name)] = command
    return found


def stop_local_superlinks(home: str) -> None:
    """SIGTERM the detached simulation SuperLinks that ``flwr run`` started for
    ``home`` (README's ``pkill`` line, limited to this test's processes)."""
    for pid, command in flower_processes(home).items():
        if "flower-superlink --insecure --simulation" in command:
            os.kill(pid, signal.SIGTERM)


def wait_until_gone(home: str, seconds: float = 20.0) -> dict[int, str]:
    """The Flower processes of ``home`` still alive after up to ``seconds``."""
    deadline = time.monotonic() + seconds
    while (alive := flower_processes(home)) and time.monotonic() < deadline:
        time.sleep(0.5)
    return alive


def test_fedgraft_simulate_runs_secure_rounds_and_compares_with_clients_alone(
    tiny_backbone: Path, tmp_path: Path
) -> None:
    # Prepare: three domains, one site each (sites refuse secure rounds of fewer
    # than three clients by default, node config secagg-min-cohort, and simulated
    # sites have no node config to lower it). Secure aggregation keeps the client's
    # stage state in Flower's context.state across Ray actors (a plain run on the
    # engine is the flwr-run test below; plain and secure sums are compared in
    # process in test_secagg_federation)
    three_domains = write_jsonl(
        tmp_path / "three.jsonl",
        [
            {
                "text": f"please {label} number {i} my account",
                "label": label,
                "domain": domain,
            }
            for domain, labels in (
                ("bank", ("send", "balance")),
                ("travel", ("flight", "hotel")),
                ("home", ("lights", "heating")),
            )
            for label in labels
            for i in range(4)
        ],
    )
    output = tmp_path / "out"
    command = [
        str(BIN / "fedgraft"),
        "simulate",
        "--set",
        f"model.name={tiny_backbone}",
        "--set",
        f"data.path={three_domains}",
        "--set",
        "num-server-rounds=2",
        "--set",
        "train.batch-size=4",
        "--set",
        f"output.dir={output}",
        "--set",
        "data.holdout-fraction=0.25",
        "--set",
        "secagg.enabled=true",
        "--set",
        "secagg.max-weight=10",
        # the run is also tracked (a SQLite MLflow store and TensorBoard events)
        "--set",
        f"tracking.mlflow-uri=sqlite:///{tmp_path / 'mlflow.db'}",
        "--set",
        f"tracking.tensorboard-dir={tmp_path / 'tb'}",
    ]

    # Execute
    finished = subprocess.run(
        command,
        env=local_flower_env(tmp_path),
        capture_output=True,
        text=True,
        timeout=400,
        cwd=tmp_path,
    )

    # Assert
    assert finished.returncode == 0, finished.stdout[-3000:] + finished.stderr[-3000:]
    rows = [
        json.loads(line) for line in (output / "metrics.jsonl").read_text().splitlines()
    ]
    assert [row["round"] for row in rows] == [0, 1, 2]
    assert all(row["clients"] == 3 for row in rows[1:])
    summary = json.loads((output / "summary.json").read_text())
    assert len(summary["local_baseline"]["clients"]) == 3
    assert "federated eval_accuracy" in finished.stdout
    assert_tracked(rows, f"sqlite:///{tmp_path / 'mlflow.db'}", tmp_path / "tb" / "out")


def assert_tracked(rows: list[dict[str, Any]], uri: str, log_dir: Path) -> None:
    """The MLflow run and the TensorBoard events hold every number of ``rows`` at
    its round, and MLflow the final adapter."""
    pytest.importorskip("mlflow")
    pytest.importorskip("tensorboard")
    expected = expected_series(rows)
    client, run = mlflow_run(uri, "fedgraft")
    assert run.info.status == "FINISHED"
    assert mismatches(expected, mlflow_series(client, run.info.run_id, expected)) == []
    assert client.list_artifacts(run.info.run_id, "adapter")
    # a SQLite store keeps its artifacts beside the database, not in the cwd
    assert (Path(uri.removeprefix("sqlite:///")).parent / "mlartifacts").is_dir()
    events = tensorboard_series(tensorboard_events(log_dir))
    assert mismatches(expected, events) == []


def test_flwr_run_dot_runs_the_app_on_the_local_simulation_engine(
    tiny_backbone: Path, tmp_path: Path
) -> None:
    # Prepare: the demo corpus's four domains dealt to two SuperNodes
    env = local_flower_env(tmp_path)
    output = tmp_path / "out"
    overrides = (
        f'num-server-rounds=1 model.name="{tiny_backbone}" output.dir="{output}" '
        "train.max-steps=3"
    )
    try:
        # Execute
        finished = subprocess.run(
            [
                str(BIN / "flwr"),
                "run",
                ".",
                "--stream",
                "-c",
                overrides,
                "--federation-config",
                "num-supernodes=2 client-resources-num-cpus=1",
            ],
            env=env,
            capture_output=True,
            text=True,
            timeout=400,
            cwd=REPO_ROOT,
        )
        listing = subprocess.run(
            [str(BIN / "flwr"), "ls", "--format", "json"],
            env=env,
            capture_output=True,
            text=True,
            timeout=60,
            cwd=REPO_ROOT,
        )
        left_running = flower_processes(env["FLWR_HOME"])
    finally:
        stop_local_superlinks(env["FLWR_HOME"])
    after_stop = wait_until_gone(env["FLWR_HOME"])

    # Assert: flwr exits 0 even for a failed run, so read the run's status
    assert finished.returncode == 0, finished.stdout[-3000:] + finished.stderr[-3000:]
    assert [run["status"] for run in json.loads(listing.stdout)["runs"]] == [
        "finished:completed"
    ]
    rows = [
        json.loads(line) for line in (output / "metrics.jsonl").read_text().splitlines()
    ]
    assert rows[-1]["round"] == 1 and rows[-1]["clients"] == 2
    # The apps keep the hub's progress bars off under flwr run too
    assert "Loading weights" not in finished.stdout + finished.stderr
    # What README says of the processes: a SuperLink and its SuperExec stay up,
    # the SuperExec installs nothing (the variable was set when the SuperLink
    # started), and stopping the SuperLink stops both
    commands = " | ".join(left_running.values())
    assert "flower-superlink --insecure --simulation" in commands
    assert "flower-superexec" in commands
    assert "--allow-runtime-dependency-installation" not in commands
    assert after_stop == {}
