"""Small seeded federated runs whose results pin fedgraft's behaviour bit for bit.

Each run is the real coordinator driving the real ClientApp over the in-process grid,
on tiny backbones built from configs. A run's record is the SHA-256 of its final
adapter (every tensor, in sorted name order, with its name, dtype and shape) and its
``metrics.jsonl`` lines without the wall-clock fields. ``tests/golden/runs.json``
holds the records; ``tests/test_golden_runs.py`` recomputes and compares them.

Randomness that is secret by design (DP noise seeds, stochastic rounding, mask
seeds) is drawn through :mod:`secrets`; while a golden run executes, that module's
draws come from a seeded generator instead, so that the runs repeat exactly.

Re-record only when a change alters results on purpose, and say why in the commit::

    .venv/bin/python -m tests.golden_runs --record

The records are bit for bit, so they hold on one machine and one set of installed
packages: a CPU with other vector units (AVX-512 against AVX2) or another build of
torch moves the last bits of a float. On a new machine, record at the last commit
whose records held (a ``git worktree`` of it, with this environment), then compare
the newer commits against that; never re-record over an unexplained difference.
"""

from __future__ import annotations

import argparse
import contextlib
import hashlib
import io
import json
import random
import secrets
import sys
import tempfile
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors.numpy import load_file

GOLDEN_FILE = Path(__file__).resolve().parent / "golden" / "runs.json"

#: metrics.jsonl fields that measure time, not results.
WALL_CLOCK_FIELDS = frozenset({"seconds", "train_seconds", "eval_seconds", "time"})

#: Text rows: four domains, two intents each, six phrasings per intent.
_INTENTS = {
    "bank": ("send", "balance"),
    "travel": ("flight", "hotel"),
    "kitchen": ("recipe", "calories"),
    "home": ("lights", "thermostat"),
}


class Interrupted(BaseException):
    """Stops a run mid-round, as a kill would (not an ``Exception``, so no handler
    in the round loop treats it as a client failure)."""


@dataclass(frozen=True)
class GoldenRun:
    """One pinned run: its task, its settings beyond the task's base, and whether it
    is killed in its last round and resumed."""

    name: str
    task: str
    overrides: dict[str, object] = field(default_factory=dict)
    killed_and_resumed: bool = False


GOLDEN_RUNS = (
    GoldenRun("plain", "text"),
    GoldenRun("secure", "text", {"secagg.enabled": True, "secagg.max-weight": 20.0}),
    GoldenRun(
        "central-dp",
        "text",
        {"dp.enabled": True, "dp.clip-norm": 0.5, "dp.noise-multiplier": 0.3},
    ),
    GoldenRun(
        "distributed-dp",
        "text",
        {
            "secagg.enabled": True,
            "secagg.max-weight": 20.0,
            "dp.enabled": True,
            "dp.mode": "distributed",
            "dp.clip-norm": 0.5,
            "dp.noise-multiplier": 0.3,
        },
    ),
    GoldenRun("causal-lm", "causal-lm"),
    GoldenRun("image-cls", "image-cls"),
    GoldenRun("killed-and-resumed", "text", killed_and_resumed=True),
)


def text_rows() -> list[dict[str, str]]:
    """48 labelled rows in four domains."""
    return [
        {"text": f"please {intent} {word} my account", "label": intent, "domain": d}
        for d, intents in _INTENTS.items()
        for intent in intents
        for word in ("now", "today", "thanks", "good", "great", "very")
    ]


def _write_jsonl(path: Path, rows: list[dict[str, Any]]) -> Path:
    path.write_text("".join(json.dumps(row) + "\n" for row in rows))
    return path


def _task_settings(task: str, folder: Path) -> tuple[dict[str, object], int]:
    """The base settings of ``task`` on fixtures built under ``folder``, and its
    number of clients."""
    from simulations.task_demo import (
        build_causal_lm,
        build_vision_backbone,
        domain_sentences,
        write_image_folder,
    )
    from tests.conftest import build_tiny_backbone

    if task == "text":
        backbone = build_tiny_backbone(folder / "bert")
        data = _write_jsonl(folder / "text.jsonl", text_rows())
        settings: dict[str, object] = {"data.partition": "column:domain"}
        return {**settings, "model.name": str(backbone), "data.path": str(data)}, 4
    if task == "causal-lm":
        sentences = domain_sentences(0, 8)
        data = _write_jsonl(folder / "lm.jsonl", sentences)
        texts = [row["text"] for row in sentences]
        backbone = build_causal_lm(folder / "llama", texts, "llama")
        return {
            "model.task": "causal-lm",
            "model.name": str(backbone),
            "model.max-length": 32,
            "data.path": str(data),
            "data.partition": "column:domain",
        }, 4
    backbone = build_vision_backbone(folder / "vit", "vit")
    images = write_image_folder(folder / "images", 6)
    return {
        "model.task": "image-cls",
        "model.name": str(backbone),
        "head.init": "random",
        "data.path": str(images),
        "data.partition": "iid",
    }, 3


@contextlib.contextmanager
def seeded_secrets(seed: int) -> Iterator[None]:
    """Draw :mod:`secrets`' values from a seeded generator while the block runs."""
    source = random.Random(seed)
    saved = (secrets.randbits, secrets.token_bytes, secrets.randbelow)
    secrets.randbits = source.getrandbits  # type: ignore[assignment]
    secrets.token_bytes = lambda n=32: source.randbytes(n)  # type: ignore[assignment]
    secrets.randbelow = lambda n: source.randrange(n)  # type: ignore[assignment]
    try:
        yield
    finally:
        secrets.randbits, secrets.token_bytes, secrets.randbelow = saved


def _stop_in_last_round(rounds: int) -> Callable[[Any], Any]:
    """A grid tamper that interrupts the run at the first reply of round
    ``rounds``; it reads the round from the message the grid sent last."""
    from common import keys

    def tamper_for(grid: Any) -> Any:
        def tamper(node: int, reply: Any) -> Any:
            records = grid.sent[-1].content.config_records.values()
            if any(record.get(keys.CFG_ROUND) == rounds for record in records):
                raise Interrupted
            return reply

        return tamper

    return tamper_for


def _coordinate(
    flat: dict[str, object], clients: int, cache: Path, tamper: Any = None
) -> None:
    from client.client_app import app as client_app
    from common.config import RunConfig
    from server.server_app import coordinate
    from simulations.inprocess_grid import InProcessGrid

    nodes = {
        100 + i: {
            "partition-id": i,
            "num-partitions": clients,
            "cache-dir": str(cache / str(i)),
        }
        for i in range(clients)
    }
    grid = InProcessGrid(client_app, nodes)
    grid.tamper = tamper(grid) if tamper is not None else None
    coordinate(grid, RunConfig.from_flat(flat))  # type: ignore[arg-type]


def execute(run: GoldenRun, folder: Path) -> Path:
    """Execute ``run`` with fixtures and outputs under ``folder``; return its output
    folder."""
    (folder / "fixtures").mkdir()
    settings, clients = _task_settings(run.task, folder / "fixtures")
    output, cache = folder / "output", folder / "site-caches"
    flat = {
        **settings,
        "sim.num-clients": clients,
        "num-server-rounds": 3,
        "train.batch-size": 4,
        "train.lr": 0.01,
        "seed": 7,
        "sim.local-baseline": False,
        "output.dir": str(output),
        **run.overrides,
    }
    torch.manual_seed(0)
    with seeded_secrets(11):
        if run.killed_and_resumed:
            with contextlib.suppress(Interrupted):
                _coordinate(flat, clients, cache, _stop_in_last_round(3))
            flat["resume"] = True
        _coordinate(flat, clients, cache)
    return output


def adapter_digest(output: Path) -> str:
    """SHA-256 over every tensor of the exported adapter, in sorted name order."""
    digest = hashlib.sha256()
    for path in sorted((output / "adapter").glob("*.safetensors")):
        tensors = load_file(str(path))
        for name in sorted(tensors):
            array = np.ascontiguousarray(tensors[name])
            header = f"{path.name}:{name}:{array.dtype}:{array.shape}"
            digest.update(header.encode() + b"\0" + array.tobytes())
    return digest.hexdigest()


def metric_lines(output: Path) -> list[dict[str, Any]]:
    """``metrics.jsonl`` without wall-clock fields."""
    text = (output / "metrics.jsonl").read_text()
    lines = [json.loads(line) for line in text.splitlines() if line]
    return [
        {key: value for key, value in line.items() if key not in WALL_CLOCK_FIELDS}
        for line in lines
    ]


def record_of(run: GoldenRun) -> dict[str, Any]:
    """Execute ``run`` in a fresh temporary folder and return its record."""
    with tempfile.TemporaryDirectory(prefix=f"golden-{run.name}-") as folder:
        with contextlib.redirect_stdout(io.StringIO()):  # the run's own tables
            output = execute(run, Path(folder))
        return {
            "adapter_sha256": adapter_digest(output),
            "metrics": metric_lines(output),
        }


def main() -> None:
    """Print every run's record, or write them to :data:`GOLDEN_FILE`."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--record", action="store_true", help="write the records")
    parser.add_argument("--only", default="", help="comma-separated run names")
    arguments = parser.parse_args()
    wanted = set(filter(None, arguments.only.split(",")))
    records = {
        run.name: record_of(run)
        for run in GOLDEN_RUNS
        if not wanted or run.name in wanted
    }
    text = json.dumps(records, indent=1, sort_keys=True) + "\n"
    if arguments.record:
        GOLDEN_FILE.parent.mkdir(exist_ok=True)
        GOLDEN_FILE.write_text(text)
    else:  # the runs' libraries may have rebound sys.stdout
        sys.__stdout__.write(text)


if __name__ == "__main__":
    main()
