"""Atomic checkpoints of everything a resumed run needs.

One file, ``checkpoint.safetensors`` in the output folder, rewritten after every round
(written to a temporary name, synced, renamed, and the folder synced, so a crash
leaves either the old or the new checkpoint). It holds the global adapter as tensors
and, in its metadata, the last complete round, the flat run config, the metrics rows
so far and a SHA-256 digest of the tensors, so that a truncated or corrupted file is
refused rather than resumed from. Client sampling and the secure-aggregation graph
are pure functions of the seed (or, under client-level DP with
``train.fraction < 1``, of the secret key in ``private/``) and the round, so no
generator state needs saving. A stateful aggregation rule (a server optimiser)
adds its moments as tensors named ``rule-state/...``.
"""

from __future__ import annotations

import hashlib
import json
import os
import tempfile
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from safetensors import SafetensorError
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
    #: The run's identity (hex), sent to the sites, which key their state by it;
    #: empty in a checkpoint written before it existed.
    run_identity: str = ""


def save_checkpoint(directory: Path, checkpoint: Checkpoint) -> Path:
    """Write ``checkpoint`` atomically into ``directory``."""
    target = directory / CHECKPOINT_FILE
    handle, staging = tempfile.mkstemp(
        prefix=".checkpoint-", suffix=".tmp", dir=directory
    )
    os.close(handle)
    tensors = dict(checkpoint.state) | {
        RULE_STATE_PREFIX + k: v for k, v in checkpoint.rule_state.items()
    }
    metadata = {
        "server_round": str(checkpoint.server_round),
        "config": json.dumps(checkpoint.config),
        "rows": json.dumps(checkpoint.rows),
        "sha256": tensor_digest(tensors),
        "run_identity": checkpoint.run_identity,
    }
    save_file(tensors, staging, metadata=metadata)
    with open(staging, "rb") as stream:
        os.fsync(stream.fileno())
    os.replace(staging, target)
    # The rename itself lives in the folder: sync it, or a power cut may undo it.
    folder = os.open(directory, os.O_RDONLY)
    try:
        os.fsync(folder)
    finally:
        os.close(folder)
    return target


def tensor_digest(tensors: Mapping[str, np.ndarray]) -> str:
    """SHA-256 over each tensor's name, dtype, shape and bytes, in name order, each
    field length-framed (so no two different sets of tensors share a digest)."""
    digest = hashlib.sha256()
    for name in sorted(tensors):
        value = np.ascontiguousarray(tensors[name])
        for field_bytes in (
            name.encode(),
            value.dtype.str.encode(),
            json.dumps(value.shape).encode(),
            value.tobytes(),
        ):
            digest.update(len(field_bytes).to_bytes(8, "big") + field_bytes)
    return digest.hexdigest()


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
        metadata = _header_metadata(path)
    except (OSError, ValueError, TypeError) as error:
        raise CheckpointError(
            f"{path}: truncated or corrupt checkpoint, even its header is unreadable "
            f"({error}); no round can be resumed from it: restore the file from a "
            "copy, or start afresh with resume = false"
        ) from None
    try:
        server_round = int(metadata["server_round"])
    except (KeyError, ValueError):
        raise CheckpointError(
            f"{path}: not a fedgraft checkpoint (its header names no round); "
            "start afresh with resume = false"
        ) from None
    try:
        tensors = load_file(str(path))
        # A checkpoint written before digests were added has none to check.
        if metadata.get("sha256", tensor_digest(tensors)) != tensor_digest(tensors):
            raise ValueError("its tensors do not match the digest it was saved with")
        checkpoint = Checkpoint(
            server_round=server_round,
            state={
                k: v for k, v in tensors.items() if not k.startswith(RULE_STATE_PREFIX)
            },
            config=json.loads(metadata["config"]),
            rows=json.loads(metadata["rows"]),
            run_identity=str(metadata.get("run_identity", "")),
            rule_state={
                k.removeprefix(RULE_STATE_PREFIX): v
                for k, v in tensors.items()
                if k.startswith(RULE_STATE_PREFIX)
            },
        )
    except (SafetensorError, KeyError, ValueError, OSError) as error:
        raise CheckpointError(
            f"{path}: truncated or corrupt checkpoint of round {server_round} "
            f"({error}); round {server_round} cannot be resumed from it: restore the "
            "file from a copy, or start afresh with resume = false"
        ) from None
    return checkpoint


def _header_metadata(path: Path) -> dict[str, str]:
    """The metadata of a safetensors file, read from its header alone (an 8-byte
    little-endian length, then that much JSON), so that a file whose tensors were cut
    off still tells which round it held."""
    with path.open("rb") as stream:
        length = int.from_bytes(stream.read(8), "little")
        if not 2 <= length <= 100_000_000:
            raise ValueError(f"header length {length} is not plausible")
        header = json.loads(stream.read(length))
    if not isinstance(header, dict):
        raise TypeError("the header is not a JSON object")
    return dict(header.get("__metadata__") or {})
