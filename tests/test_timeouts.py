"""``train.timeout`` and ``secagg.timeout`` reach the transport, and a run that waits
for nodes that never come gives up after ``train.timeout`` and goes on."""

from __future__ import annotations

import json
from collections.abc import Iterable
from pathlib import Path

from flwr.app import Message

from client.client_app import app as client_app
from common.config import RunConfig
from server.server_app import coordinate
from tests.conftest import InProcessGrid, write_jsonl


class TimeoutRecordingGrid(InProcessGrid):
    """An in-process grid that notes the timeout of every message it delivers."""

    def __init__(self, *args: object, **kwargs: object) -> None:
        super().__init__(*args, **kwargs)  # type: ignore[arg-type]
        self.timeouts: dict[str, set[float | None]] = {}

    def send_and_receive(
        self, messages: Iterable[Message], *, timeout: float | None = None
    ) -> list[Message]:
        messages = list(messages)
        for message in messages:
            kind = message.metadata.message_type
            self.timeouts.setdefault(kind, set()).add(timeout)
        return super().send_and_receive(messages, timeout=timeout)


def settings(
    data: Path, backbone: Path, output: Path, **overrides: object
) -> RunConfig:
    return RunConfig.from_flat(
        {
            "model.name": str(backbone),
            "data.path": str(data),
            "data.partition": "column:domain",
            "sim.num-clients": 3,
            "num-server-rounds": 1,
            "train.batch-size": 4,
            "sim.local-baseline": False,
            "output.dir": str(output),
            **overrides,
        }
    )


def three_domains(folder: Path) -> Path:
    rows = [
        {"text": f"please {label} {word}", "label": label, "domain": domain}
        for domain, label in (
            ("bank", "send"),
            ("travel", "flight"),
            ("home", "lights"),
        )
        for word in ("now", "today", "thanks", "good")
    ]
    return write_jsonl(folder / "rows.jsonl", rows)


def test_each_stage_waits_for_replies_for_its_own_configured_timeout(
    tiny_backbone: Path, tmp_path: Path
) -> None:
    # Prepare
    nodes = {
        10 + i: {"partition-id": i, "num-partitions": 3, "cache-dir": str(tmp_path)}
        for i in range(3)
    }
    grid = TimeoutRecordingGrid(client_app, nodes)
    config = settings(
        three_domains(tmp_path),
        tiny_backbone,
        tmp_path / "out",
        **{"secagg.enabled": True, "train.timeout": 321.0, "secagg.timeout": 45.0},
    )

    # Execute
    coordinate(grid, config)  # type: ignore[arg-type]

    # Assert
    secure_stages = {k: v for k, v in grid.timeouts.items() if "secagg" in k}
    others = {k: v for k, v in grid.timeouts.items() if "secagg" not in k}
    assert {"train", "query.backbone"} <= set(others)  # training, backbone hand-off
    assert all(seen == {321.0} for seen in others.values()), others
    assert len(secure_stages) == 3  # advertise, share, unmask
    assert all(seen == {45.0} for seen in secure_stages.values()), secure_stages


def test_a_round_without_enough_nodes_gives_up_after_train_timeout_and_the_run_ends(
    tiny_backbone: Path, tmp_path: Path
) -> None:
    # Prepare: one node, but every round needs two
    grid = InProcessGrid(
        client_app,
        {10: {"partition-id": 0, "num-partitions": 3, "cache-dir": str(tmp_path)}},
    )
    output = tmp_path / "out"
    config = settings(
        three_domains(tmp_path),
        tiny_backbone,
        output,
        **{"train.min-clients": 2, "train.timeout": 0.2},
    )

    # Execute
    coordinate(grid, config)  # type: ignore[arg-type]

    # Assert: the round was skipped (no useful reply counted), the run finished
    rows = [
        json.loads(line) for line in (output / "metrics.jsonl").read_text().splitlines()
    ]
    assert [row["round"] for row in rows] == [0, 1]
    assert (output / "summary.json").exists()
