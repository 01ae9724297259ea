"""What the in-process benchmarks share: the data they read and one federated run of
the real coordinator and ClientApp over ``simulations.inprocess_grid.InProcessGrid``
(every message handed to the ClientApp in this process: no Ray start-up per run)."""

from __future__ import annotations

import json
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
CLINC = ROOT.parent / "shared" / "data" / "clinc150"


def data_settings(
    quick: bool, test_per_label: int = 0, scratch: Path | None = None
) -> dict[str, str]:
    """The built-in demo corpus for ``--quick``, CLINC150 train/test otherwise.

    Parameters
    ----------
    test_per_label : int
        When positive, the coordinator evaluates on the first ``test_per_label`` test
        rows of each label (written to ``scratch``), so that per-round evaluation fits
        a small machine; 0 keeps all 4,500 CLINC150 test rows.
    scratch : Path, optional
        Folder for that subset (the benchmark's output folder).
    """
    if quick:
        return {"data.path": ""}
    test_path = CLINC / "test.jsonl"
    if test_per_label > 0:
        if scratch is None:
            raise ValueError("data_settings: test_per_label needs a scratch folder")
        test_path = test_subset(test_path, test_per_label, scratch)
    return {"data.path": str(CLINC / "train.jsonl"), "data.test-path": str(test_path)}


def test_subset(source: Path, per_label: int, scratch: Path) -> Path:
    """Write the first ``per_label`` rows of each label of JSONL ``source``."""
    kept: list[str] = []
    seen: dict[str, int] = {}
    with source.open() as rows:
        for line in rows:
            label = str(json.loads(line)["label"])
            if seen.get(label, 0) < per_label:
                seen[label] = seen.get(label, 0) + 1
                kept.append(line if line.endswith("\n") else line + "\n")
    scratch.mkdir(parents=True, exist_ok=True)
    target = scratch / f"test-{per_label}-per-label.jsonl"
    target.write_text("".join(kept))
    return target


@dataclass
class FederatedRun:
    """What one in-process run left: its metrics rows, summary, grid and wall time."""

    rows: list[dict[str, Any]]
    summary: dict[str, Any]
    grid: Any
    clients: int
    wall_seconds: float


def run_federation(
    flat: dict[str, Any],
    output: Path,
    site_settings: Callable[[int], dict[str, Any]] | None = None,
) -> FederatedRun:
    """Run ``flat`` (with ``output.dir = output``) through ``coordinate``.

    Parameters
    ----------
    site_settings : callable, optional
        Extra node config for the site of each partition (e.g. a FlexLoRA rank).
    """
    from client.client_app import app as client_app
    from common.config import RunConfig
    from common.splits import default_num_clients
    from server.server_app import coordinate
    from simulations.inprocess_grid import InProcessGrid

    config = RunConfig.from_flat({**flat, "output.dir": str(output)})
    clients = default_num_clients(config.data, config.seed, config.sim.num_clients)
    node_configs = {
        1000 + p: {
            "partition-id": p,
            "num-partitions": clients,
            "cache-dir": str(output.parent / "site-cache"),
        }
        | (site_settings(p) if site_settings else {})
        for p in range(clients)
    }
    config = config.with_overrides(**{"sim.num-clients": clients})
    grid = InProcessGrid(client_app, node_configs)
    started = time.perf_counter()
    coordinate(grid, config)
    wall = time.perf_counter() - started
    rows = [json.loads(line) for line in (output / "metrics.jsonl").open()]
    summary = json.loads((output / "summary.json").read_text())
    return FederatedRun(rows, summary, grid, clients, round(wall, 1))
