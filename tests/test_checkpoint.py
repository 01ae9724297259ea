"""Checkpoints: atomic round trips, and resuming after the coordinator is killed."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
from safetensors.numpy import load_file

from common.config import ConfigError, RunConfig
from server.checkpoint import (
    Checkpoint,
    CheckpointError,
    load_checkpoint,
    save_checkpoint,
)
from tests.conftest import REPO_ROOT

# The coordinator with two in-process clients. When FEDGRAFT_TEST_STALL names a file,
# the fifth training reply (the first of round 3, after round 2's checkpoint) writes
# that file and stalls: the test kills the process once the file exists.
DRIVER = """
import json, os, sys, time
from client.client_app import app
from common.config import RunConfig
from server.server_app import coordinate
from simulations.inprocess_grid import InProcessGrid

flat = json.loads(sys.argv[1])
replies = []
def stall(node, reply):
    if reply.metadata.message_type == "train":
        replies.append(node)
    marker = os.environ.get("FEDGRAFT_TEST_STALL")
    if marker and len(replies) == 5:
        open(marker, "w").close()
        time.sleep(600)
    return reply
nodes = {
    101: {"partition-id": 0, "num-partitions": 2},
    202: {"partition-id": 1, "num-partitions": 2},
}
coordinate(InProcessGrid(app, nodes, tamper=stall), RunConfig.from_flat(flat))
"""


def run_config(
    backbone: Path, data: Path, output: Path, **overrides: object
) -> dict[str, object]:
    return {
        "model.name": str(backbone),
        "data.path": str(data),
        "data.partition": "column:domain",
        "sim.num-clients": 2,
        "num-server-rounds": 4,
        "train.batch-size": 4,
        "train.lr": 0.01,
        "data.holdout-fraction": 0.25,
        "output.dir": str(output),
        **overrides,
    }


def drive(
    flat: dict[str, object], tmp_path: Path, stall: Path | None = None
) -> subprocess.Popen[bytes]:
    env = {
        **os.environ,
        "PYTHONPATH": str(REPO_ROOT),
        "FEDGRAFT_CACHE_DIR": str(tmp_path / "cache"),
    }
    if stall is not None:
        env["FEDGRAFT_TEST_STALL"] = str(stall)
    return subprocess.Popen(
        [sys.executable, "-c", DRIVER, json.dumps(flat)],
        env=env,
        cwd=REPO_ROOT,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )


def adapter_files(output: Path) -> dict[str, np.ndarray]:
    state = load_file(str(output / "adapter" / "adapter_model.safetensors"))
    state.update(
        {
            f"head.{k}": v
            for k, v in load_file(str(output / "adapter" / "head.safetensors")).items()
        }
    )
    return state


def test_a_checkpoint_round_trips(tmp_path: Path) -> None:
    state = {"a": np.arange(6, dtype=np.float32).reshape(2, 3)}
    save_checkpoint(tmp_path, Checkpoint(3, state, {"seed": 1}, [{"round": 3}]))
    loaded = load_checkpoint(tmp_path)
    assert (
        loaded.server_round == 3
        and loaded.config == {"seed": 1}
        and loaded.rows == [{"round": 3}]
    )
    np.testing.assert_array_equal(loaded.state["a"], state["a"])


def test_resuming_without_a_checkpoint_names_the_file(tmp_path: Path) -> None:
    with pytest.raises(CheckpointError, match="checkpoint.safetensors: no checkpoint"):
        load_checkpoint(tmp_path)


def test_the_folder_is_synced_after_the_rename(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Prepare: record renames and syncs, and what each sync was of
    events: list[str] = []
    real_replace, real_fsync = os.replace, os.fsync

    def replace(source: str, target: str) -> None:
        events.append("rename")
        real_replace(source, target)

    def fsync(descriptor: int) -> None:
        kind = "folder" if os.path.isdir(f"/proc/self/fd/{descriptor}") else "file"
        events.append(f"sync {kind}")
        real_fsync(descriptor)

    monkeypatch.setattr(os, "replace", replace)
    monkeypatch.setattr(os, "fsync", fsync)

    # Execute
    save_checkpoint(tmp_path, Checkpoint(1, {"a": np.zeros(2, np.float32)}, {}, []))

    # Assert
    assert events == ["sync file", "rename", "sync folder"]


def truncate(path: Path) -> None:
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])


def flip_last_byte(path: Path) -> None:
    data = bytearray(path.read_bytes())
    data[-1] ^= 1
    path.write_bytes(bytes(data))


def overwrite(path: Path) -> None:
    path.write_bytes(b"not a checkpoint")


@pytest.mark.parametrize(
    ("damage", "message"),
    [
        (truncate, "truncated or corrupt checkpoint of round 3"),
        (flip_last_byte, "do not match the digest"),
        (overwrite, "even its header is unreadable"),
    ],
)
def test_a_damaged_checkpoint_is_refused_naming_the_file_and_its_round(
    damage: object, message: str, tmp_path: Path
) -> None:
    # Prepare
    state = {"head.bias": np.arange(64, dtype=np.float32)}
    path = save_checkpoint(tmp_path, Checkpoint(3, state, {"seed": 1}, [{"round": 3}]))
    damage(path)  # type: ignore[operator]

    # Execute / Assert
    with pytest.raises(CheckpointError, match=message) as refused:
        load_checkpoint(tmp_path)
    assert str(path) in str(refused.value)


def test_resuming_with_other_settings_is_refused_naming_them() -> None:
    config = RunConfig.from_flat({"train.lr": 0.1, "num-server-rounds": 9})
    with pytest.raises(ConfigError, match=r"train.lr \(0.002 -> 0.1\)"):
        config.check_resumable_from(dict(RunConfig.from_flat({}).flat))


@pytest.mark.slow
def test_a_run_killed_mid_round_resumes_to_the_same_adapter_bit_for_bit(
    tiny_backbone: Path, small_jsonl: Path, tmp_path: Path
) -> None:
    # Prepare: an uninterrupted reference run
    reference = tmp_path / "reference"
    assert (
        drive(run_config(tiny_backbone, small_jsonl, reference), tmp_path).wait(
            timeout=300
        )
        == 0
    )

    # Execute: SIGKILL while round 3 trains (the driver says so through a file),
    # then resume from the checkpoint
    interrupted, stalled = tmp_path / "interrupted", tmp_path / "round-3-stalled"
    process = drive(
        run_config(tiny_backbone, small_jsonl, interrupted), tmp_path, stall=stalled
    )
    deadline = time.monotonic() + 300
    while not stalled.exists():
        if process.poll() is not None or time.monotonic() > deadline:
            pytest.fail("the driver never reached round 3's first training reply")
        time.sleep(0.1)
    assert load_checkpoint(interrupted).server_round == 2
    os.kill(process.pid, signal.SIGKILL)
    process.wait()
    assert not (interrupted / "summary.json").exists()
    resumed = drive(
        run_config(tiny_backbone, small_jsonl, interrupted, resume=True), tmp_path
    )
    assert resumed.wait(timeout=300) == 0

    # Assert
    expected, actual = adapter_files(reference), adapter_files(interrupted)
    assert expected.keys() == actual.keys()
    for name in expected:
        assert np.array_equal(expected[name], actual[name]), name
    rows = [
        json.loads(line)
        for line in (interrupted / "metrics.jsonl").read_text().splitlines()
    ]
    assert [row["round"] for row in rows] == [0, 1, 2, 3, 4]
