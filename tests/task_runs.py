"""Settings and in-process runs of the causal-LM and image-classification tasks on
the tiny backbones of ``conftest.py``: the real coordinator and ClientApp over an
in-process grid, without Ray."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from client.client_app import app as client_app
from common.config import RunConfig
from server.server_app import coordinate
from simulations.inprocess_grid import InProcessGrid

#: A causal-LM run's clients: one per domain of ``domain_sentences``.
DOMAINS = 4
#: An image-classification run's clients.
IMAGE_CLIENTS = 3


def lm_settings(
    backbone: Path, data: Path, output: Path, **overrides: object
) -> dict[str, object]:
    """Three rounds of a causal-LM run, a client per domain; ``overrides`` win."""
    return {
        "model.task": "causal-lm",
        "model.name": str(backbone),
        "model.max-length": 32,
        "data.path": str(data),
        "data.partition": "column:domain",
        "sim.num-clients": DOMAINS,
        "num-server-rounds": 3,
        "train.batch-size": 8,
        "train.lr": 0.02,
        "output.dir": str(output),
        **overrides,
    }


def image_settings(
    backbone: Path, data: Path, output: Path, **overrides: object
) -> dict[str, object]:
    """Three rounds of an image-classification run over an IID split;
    ``overrides`` win."""
    return {
        "model.task": "image-cls",
        "model.name": str(backbone),
        "head.init": "random",
        "data.path": str(data),
        "data.partition": "iid",
        "sim.num-clients": IMAGE_CLIENTS,
        "num-server-rounds": 3,
        "train.batch-size": 8,
        "train.lr": 0.01,
        "output.dir": str(output),
        **overrides,
    }


def lm_config(
    backbone: Path, data: Path, output: Path, **overrides: object
) -> RunConfig:
    """:func:`lm_settings`, validated."""
    return RunConfig.from_flat(lm_settings(backbone, data, output, **overrides))


def image_config(
    backbone: Path, data: Path, output: Path, **overrides: object
) -> RunConfig:
    """:func:`image_settings`, validated."""
    return RunConfig.from_flat(image_settings(backbone, data, output, **overrides))


def simulation_nodes(clients: int, cache: Path) -> dict[int, dict[str, object]]:
    """Node configs of ``clients`` simulated sites, each with its own cache folder."""
    return {
        100 + index: {
            "partition-id": index,
            "num-partitions": clients,
            "cache-dir": str(cache / str(index)),
        }
        for index in range(clients)
    }


def read_metrics(output: Path) -> list[dict[str, Any]]:
    """The lines of a run's ``metrics.jsonl``."""
    return [json.loads(line) for line in (output / "metrics.jsonl").open()]


def federate(
    config: RunConfig, cache: Path
) -> tuple[InProcessGrid, list[dict[str, object]]]:
    """Run the coordinator over ``config.sim.num_clients`` in-process sites; the grid
    (what was sent and received) and the metrics lines."""
    grid = InProcessGrid(client_app, simulation_nodes(config.sim.num_clients, cache))
    output = coordinate(grid, config)  # type: ignore[arg-type]
    return grid, read_metrics(output)


def run(config: RunConfig, cache: Path) -> list[dict[str, object]]:
    """:func:`federate`'s metrics lines."""
    return federate(config, cache)[1]
