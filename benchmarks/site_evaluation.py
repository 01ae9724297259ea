"""What the sites' evaluation costs a round, next to the coordinator's.

One in-process run (``benchmarks.harness.run_federation``: the real coordinator and
ClientApp, no engine) with ``eval.where = both``, so that in every evaluated round the
coordinator scores the global model on its test rows and the sites score it on
theirs, side by side on the same model. Timed per evaluated round:

``coordinator_seconds``
    The coordinator's own evaluation (the workbench's ``evaluate``).
``sites_seconds``
    ``FederatedLoRA.evaluate_at_sites``: sampling, the secure sum's key stages when
    on, the evaluate messages (the sites' scoring included: every site runs in this
    process, one after another) and the sum or unmasking.
``sites_bytes``
    The array and metric records of every message of that step, both ways (the
    global adapter down, the totals or masked limbs up): ``count_bytes``, as the
    metrics' ``bytes_*`` count them (the secure stages' key and share records are
    not counted).

The demo corpus (``--quick``) or CLINC150 (a subset of its test rows), the packaged
MiniLM, one site per domain. Output: one JSON object per mode (``plain``,
``secure``) on stdout. Run from the repository root::

    python benchmarks/site_evaluation.py --quick
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))

from harness import data_settings, run_federation  # noqa: E402  (this folder)


@dataclass
class Probe:
    """Seconds and bytes of each evaluated round's two evaluations."""

    coordinator: list[float] = field(default_factory=list)
    sites: list[float] = field(default_factory=list)
    sites_bytes: list[int] = field(default_factory=list)


def _message_bytes(message: Any) -> int:
    content = message.content
    # Arrays and metrics only: the secure stages' config records hold lists, which
    # Flower's count_bytes refuses (their keys and shares are left out).
    records = [*content.array_records.values(), *content.metric_records.values()]
    return int(sum(record.count_bytes() for record in records))


def _timed(
    owner: Any, name: str, record: Callable[[float, tuple[Any, ...]], None]
) -> Callable[..., Any]:
    """Wrap ``owner.name`` so each call's seconds go to ``record``; the original."""
    original = getattr(owner, name)

    def wrapper(*args: Any, **kwargs: Any) -> Any:
        started = time.perf_counter()
        result = original(*args, **kwargs)
        record(time.perf_counter() - started, args)
        return result

    setattr(owner, name, wrapper)
    return original


def measure(mode: str, flat: dict[str, Any], scratch: Path) -> dict[str, Any]:
    """One run with ``eval.where = both``; the per-round costs of each side."""
    from common.tasks.text_classification.bench import Workbench
    from server.strategy import FederatedLoRA

    probe = Probe()
    grids: list[Any] = []

    def sites_done(seconds: float, args: tuple[Any, ...]) -> None:
        grid = args[2]
        sent, received = grids[-1] if grids else (0, 0)
        new = [*grid.sent[sent:], *grid.received[received:]]
        probe.sites.append(seconds)
        probe.sites_bytes.append(sum(_message_bytes(m) for m in new))

    original_sites = FederatedLoRA.evaluate_at_sites

    def evaluate_at_sites(self: Any, sites: Any, grid: Any, *rest: Any) -> Any:
        grids.append((len(grid.sent), len(grid.received)))
        started = time.perf_counter()
        result = original_sites(self, sites, grid, *rest)
        sites_done(time.perf_counter() - started, (self, sites, grid))
        return result

    FederatedLoRA.evaluate_at_sites = evaluate_at_sites  # type: ignore[method-assign]
    original_eval = _timed(
        Workbench,
        "evaluate",
        lambda seconds, args: probe.coordinator.append(seconds),
    )
    try:
        run = run_federation(
            {**flat, "secagg.enabled": mode == "secure", "eval.where": "both"},
            scratch / mode,
        )
    finally:
        FederatedLoRA.evaluate_at_sites = original_sites  # type: ignore[method-assign]
        Workbench.evaluate = original_eval  # type: ignore[method-assign]
    rows = run.rows
    agree = all(
        row["sites_eval_accuracy"] == row["eval_accuracy"]
        for row in rows
        if row.get("sites_evaluated")
    )
    return {
        "mode": mode,
        "clients": run.clients,
        "evaluated_rounds": len(probe.sites),
        "eval_rows": rows[0]["sites_eval_examples"],
        "coordinator_seconds": [round(s, 3) for s in probe.coordinator],
        "sites_seconds": [round(s, 3) for s in probe.sites],
        "sites_bytes": probe.sites_bytes,
        # The metrics' array bytes of each round, the sites' evaluation included.
        "round_bytes_up_down": [row["bytes_up"] + row["bytes_down"] for row in rows],
        "round_seconds": [row["seconds"] for row in rows],
        "sites_equal_coordinator": agree,
        "wall_seconds": run.wall_seconds,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="the demo corpus")
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--test-per-label", type=int, default=5)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="site-eval-") as folder:
        scratch = Path(folder)
        flat = {
            **data_settings(args.quick, args.test_per_label, scratch),
            "num-server-rounds": args.rounds,
            "train.max-steps": 2,
            "train.batch-size": 16,
            "sim.local-baseline": False,
        }
        for mode in ("plain", "secure"):
            print(json.dumps(measure(mode, flat, scratch)), flush=True)


if __name__ == "__main__":
    main()
