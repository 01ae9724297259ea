"""Atomic checkpoints of everything a resumed run needs.

One file, ``checkpoint.safetensors`` in the output folder, rewritten after every round
(written to a temporary name, synced, then renamed, so a crash leaves either the old
or the new checkpoint). It holds the global adapter as tensors and, in its metadata,
the last complete round, the flat run config and the metrics rows so far. Client
sampling and the secure-aggregation graph are pure functions of the seed and the round,
so no generator state needs saving. A stateful aggregation rule (a server optimiser)
adds its moments as tensors named ``rule-state/...``.
"""

from __future__ import annotations

import json
import os
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from safetensors import safe_open
from safetensors.numpy import load_file, save_file

from common.codec import AdapterState

CHECKPOINT_FILE = "checkpoint.safetensors"
RULE_STATE_PREFIX = "rule-state/"


class CheckpointError(ValueError):
    """A checkpoint is missing or unreadable; the message names the file."""


@dataclass(frozen=True)
class Checkpoint:
    """The state after ``server_round`` complete rounds."""

    server_round: int
    state: AdapterState
    config: dict[str, Any]
    rows: list[dict[str, Any]]
    rule_state: AdapterState = field(default_factory=dict)


def save_checkpoint(directory: Path, checkpoint: Checkpoint) -> Path:
    """Write ``checkpoint`` atomically into ``directory``."""
    target = directory / CHECKPOINT_FILE
    handle, staging = tempfile.mkstemp(
        prefix=".checkpoint-", suffix=".tmp", dir=directory
    )
    os.close(handle)
    metadata = {
        "server_round": str(checkpoint.server_round),
        "config": json.dumps(checkpoint.config),
        "rows": json.dumps(checkpoint.rows),
    }
    tensors = dict(checkpoint.state) | {
        RULE_STATE_PREFIX + k: v for k, v in checkpoint.rule_state.items()
    }
    save_file(tensors, staging, metadata=metadata)
    with open(staging, "rb") as stream:
        os.fsync(stream.fileno())
    os.replace(staging, target)
    return target


def load_checkpoint(directory: Path) -> Checkpoint:
    """Read the checkpoint of a run's output folder.

    Raises
    ------
    CheckpointError
        When ``directory`` holds no readable checkpoint.
    """
    path = directory / CHECKPOINT_FILE
    if not path.exists():
        raise CheckpointError(
            f"{path}: no checkpoint to resume from "
            "(was the run started with this output.dir?)"
        )
    try:
        with safe_open(str(path), framework="numpy") as reader:
            metadata = reader.metadata() or {}
        tensors = load_file(str(path))
        return Checkpoint(
            server_round=int(metadata["server_round"]),
            state={
                k: v for k, v in tensors.items() if not k.startswith(RULE_STATE_PREFIX)
            },
            config=json.loads(metadata["config"]),
            rows=json.loads(metadata["rows"]),
            rule_state={
                k.removeprefix(RULE_STATE_PREFIX): v
                for k, v in tensors.items()
                if k.startswith(RULE_STATE_PREFIX)
            },
        )
    except (KeyError, ValueError, OSError) as error:
        raise CheckpointError(f"{path}: unreadable checkpoint ({error})") from None
