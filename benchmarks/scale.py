"""Scale: 1,000 virtual clients with 10 sampled per round, on Flower's Simulation
Engine (Ray), against 100 clients with the same 10 sampled, in one invocation.

Method: each cell (a client count) runs in its own Python process, which calls
``simulations.cli.simulate``, the function behind ``fedgraft simulate``: Flower's
``run_simulation`` with the real ServerApp (``server.server_app.build_server_app``)
and ClientApp (``client.client_app.app``), ``num_supernodes`` virtual SuperNodes and
``sim.cpus-per-client`` CPUs per Ray actor (1.0: two actors on two cores). Flower runs
the ServerApp in a thread of that same process (``flwr.simulation.run_simulation.
run_serverapp_th``), next to the in-memory LinkState and the Simulation Engine's
dispatch threads (``flwr.server.superlink.fleet.vce.vce_api``); the virtual clients run
in Ray actor processes. So that process is the coordinator, and each cell measures:

- ``peak_rss_mb``: the coordinator process's peak resident set,
  ``resource.getrusage(RUSAGE_SELF).ru_maxrss`` read at the end of the cell (the
  kernel's high-water mark over the whole run: configuration, data check, the
  coordinator's model, Ray's driver, every round). ``peak_rss_mb_sampled`` is the
  highest value a 0.5 s psutil sampler saw, ``rss_mb_after_round`` the value as each
  round ended (flat across rounds if nothing accumulates).
- ``ray_workers``: the same sampler over the coordinator's descendant processes:
  Ray worker processes (titles ``ray::...``: the ClientApp actors) and the rest of Ray
  (``raylet``, ``gcs_server``, log monitor) separately. RSS counts shared pages (torch's
  libraries) in each process, so the sum over workers overstates their joint use.
- Per round ``r`` (rounds ``1..R``; round 0 is the initial evaluation only):
  ``wall`` from the strategy's ``run_round`` entry to the round's checkpoint being
  written (sampling, dispatch through the Simulation Engine, the clients, validation,
  aggregation, the coordinator's evaluation, the metrics line and the checkpoint);
  ``eval`` the coordinator's evaluation (``Workbench.evaluate``) inside it; the
  clients' ``train-seconds`` (timed inside the ClientApp around the local training
  loop, reported in each reply's metrics); ``P`` the number of Ray actors (read from
  Flower's actor pool).

  ``client compute`` on the round's critical path is ``max(sum(t_i) / P, max(t_i))``:
  the shortest time ``P`` workers could take to run the sampled clients' training
  loops, a lower bound on any schedule's makespan (so it never flatters the overhead).
  Then::

      overhead_fraction           = 1 - compute / (wall - eval)
      overhead_fraction_with_eval = 1 - compute / wall

  i.e. everything that is not a client's training loop counts as overhead: the Ray
  round trips and Flower's message polling, the ClientApp's own preparation (decoding
  the run config, computing its partition, tokenising its rows, loading the global
  adapter, encoding its delta), load imbalance and idle workers, the coordinator's
  sampling, validation, aggregation and checkpoint, and (second form) its evaluation.
  Each round also reports Flower's own per-message ClientApp time
  (``clientapp_seconds``: ``backend.process_message``, the Ray call included) to split
  the overhead between the client side and the rest.

  A cell's ``overhead_fraction`` is the worst round after the first; round 1 carries
  the one-off start of the Ray actors (each loads the backbone) and is reported apart
  (``first_round_overhead_fraction``), as are the mean and every round's figures.
- The coordinator's CPU per round (``coordinator_cpu_seconds``, and
  ``coordinator_cpu_share``: that over ``wall x cpu_count``), and within it
  ``flower_poll_cpu_seconds``: the thread CPU time of the LinkState look-ups that the
  Simulation Engine's message extractor makes (``vce_api.add_messages_to_queue`` asks
  ``InMemoryLinkState.get_message_ins`` about every node, every 0.1 s). CPU the
  coordinator takes is CPU the clients' training loops do not get on two cores, which
  ``train-seconds`` (and so ``overhead_fraction``) absorbs rather than shows.

Workload (equal per client in every cell): CLINC150 train
(``../shared/data/clinc150/train.jsonl``, 15,000 rows) split IID over the clients
(1,000 clients: 15 rows each), ``train.fraction = 10 / num_clients`` and
``train.min-clients = 10``, the packaged MiniLM with LoRA r=8 on query and value,
batch 8, up to 5 local epochs capped at 10 optimiser steps (15 rows: 2 batches x 5
epochs; more rows: the first 10 batches), so every sampled client trains 10 steps;
the coordinator evaluates on the first ``test.jsonl`` row of each label (150 rows).

Output: one JSON object per cell on stdout (``num_clients``, ``peak_rss_mb``,
``overhead_fraction``, ``overhead_fraction_with_eval``, ``rounds``,
``sampled_per_round``, ``wall_seconds``, ``per_round`` and more), then one comparison
object (``peak_rss_ratio``: the largest cell's peak RSS over the smallest's, and the
two targets: RSS flat, i.e. that ratio at most 1.10, and overhead at most 0.15). The
runs' own output goes to stderr. Run from the repository root::

    python benchmarks/scale.py --quick
    python benchmarks/scale.py

``--quick`` runs 100 and 300 clients, 2 rounds, at most 5 local steps.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import resource
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable
from contextlib import redirect_stdout
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from harness import data_settings  # noqa: E402  (this folder)

log = logging.getLogger("benchmarks.scale")

RSS_FLAT_RATIO = 1.10
OVERHEAD_TARGET = 0.15


def cell_config(
    args: argparse.Namespace, num_clients: int, output: Path
) -> dict[str, Any]:
    """The flat run config of one cell: the same per-client work at any client count.

    Parameters
    ----------
    args : argparse.Namespace
        The parsed command line.
    num_clients : int
        Virtual clients (SuperNodes) of this cell.
    output : Path
        The run's ``output.dir``.

    Returns
    -------
    dict
        Flat ``[tool.flwr.app.config]`` keys.
    """
    if args.sampled > num_clients:
        raise ValueError(f"--sampled {args.sampled} exceeds {num_clients} clients")
    return {
        **data_settings(False, args.test_per_label, output.parent),
        "data.partition": "iid",
        "sim.num-clients": num_clients,
        "sim.local-baseline": False,
        "num-server-rounds": args.rounds,
        "train.fraction": args.sampled / num_clients,
        "train.min-clients": args.sampled,
        "train.local-epochs": args.local_epochs,
        "train.max-steps": args.max_steps,
        "train.batch-size": args.batch_size,
        "aggregation": "fedavg",
        "eval.every": args.eval_every,
        "output.dir": str(output),
    }


def critical_path(train_seconds: list[float], parallelism: int) -> float:
    """The client compute on a round's critical path: ``max(sum / P, max)``.

    A lower bound on the makespan of the clients' training loops on ``parallelism``
    workers, whatever the schedule.

    Parameters
    ----------
    train_seconds : list of float
        Each sampled client's ``train-seconds``.
    parallelism : int
        Clients that run at once (Ray actors).

    Returns
    -------
    float
        Seconds; 0 for a round without replies.
    """
    if not train_seconds:
        return 0.0
    return max(sum(train_seconds) / max(parallelism, 1), max(train_seconds))


# -- measuring inside the coordinator process --------------------------------------


@dataclass
class RoundTimes:
    """What the probes saw of one round, in ``time.perf_counter`` seconds."""

    begin: float = 0.0
    sampled_at: float = 0.0
    exchanged_at: float = 0.0
    trained_at: float = 0.0
    end: float = 0.0
    eval_seconds: float = 0.0
    train_seconds: list[float] = field(default_factory=list)
    clientapp_seconds: list[float] = field(default_factory=list)
    rss_mb: float = 0.0
    cpu_begin: float = 0.0
    cpu_end: float = 0.0
    poll_begin: tuple[float, int] = (0.0, 0)
    poll_end: tuple[float, int] = (0.0, 0)


def _rss_mb(process: Any) -> float:
    return float(process.memory_info().rss) / 2**20


def _cpu_seconds() -> float:
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


class ProcessSampler(threading.Thread):
    """Samples the RSS of this process and of its descendants every ``interval``.

    Descendants titled ``ray::...`` are Ray workers (the ClientApp actors); the other
    descendants are Ray's own services.
    """

    def __init__(self, interval: float) -> None:
        super().__init__(name="rss-sampler", daemon=True)
        import psutil

        self.interval = interval
        self.me = psutil.Process()
        self.stop = threading.Event()
        self.peak_self_mb = 0.0
        self.peak_worker_mb = 0.0
        self.peak_workers_sum_mb = 0.0
        self.peak_services_sum_mb = 0.0
        self.workers: set[int] = set()

    def sample(self) -> None:
        """Take one sample (processes that vanish meanwhile are skipped)."""
        import psutil

        self.peak_self_mb = max(self.peak_self_mb, _rss_mb(self.me))
        workers, services = 0.0, 0.0
        for child in self.me.children(recursive=True):
            try:
                title = " ".join(child.cmdline()[:1]) or child.name()
                rss = _rss_mb(child)
            except (psutil.NoSuchProcess, psutil.AccessDenied, psutil.ZombieProcess):
                continue
            if title.startswith("ray::"):
                self.workers.add(child.pid)
                workers += rss
                self.peak_worker_mb = max(self.peak_worker_mb, rss)
            else:
                services += rss
        self.peak_workers_sum_mb = max(self.peak_workers_sum_mb, workers)
        self.peak_services_sum_mb = max(self.peak_services_sum_mb, services)

    def run(self) -> None:
        while not self.stop.wait(self.interval):
            self.sample()


class CoordinatorProbes:
    """Timing wrappers around the coordinator's steps and Flower's dispatch.

    They are installed on classes and module attributes of this process only (the
    coordinator's); the ClientApp and production code are unchanged.
    """

    def __init__(self, sampler: ProcessSampler) -> None:
        self.sampler = sampler
        self.rounds: dict[int, RoundTimes] = {}
        self.current = 0
        self.parallelism = 0
        self.serverapp_pids: set[int] = set()
        self.clientapp_calls: list[tuple[float, float]] = []  # (finished at, seconds)
        # CPU seconds and calls of the LinkState look-ups of Flower's dispatch loop.
        self.poll_cpu = 0.0
        self.poll_calls = 0
        self._lock = threading.Lock()

    def install(self) -> None:
        """Wrap the strategy, the evaluation, the checkpoint and Flower's metrics."""
        from flwr.server.superlink.fleet.vce.backend.raybackend import RayBackend
        from flwr.server.superlink.fleet.vce.metrics import VceMetrics
        from flwr.server.superlink.linkstate.in_memory_linkstate import (
            InMemoryLinkState,
        )

        import server.server_app as server_app
        from common import keys
        from common.tasks.text_classification.bench import Workbench
        from server.strategy import FederatedLoRA

        probes = self

        def around(cls: Any, name: str, after: Callable[..., None]) -> None:
            original = getattr(cls, name)

            def wrapper(*a: Any, **k: Any) -> Any:
                started = time.perf_counter()
                result = original(*a, **k)
                after(started, a, result)
                return result

            setattr(cls, name, wrapper)

        original_run_round = FederatedLoRA.run_round

        def run_round(self: Any, grid: Any, server_round: int, *a: Any) -> Any:
            probes.current = server_round
            probes.rounds[server_round] = RoundTimes(
                begin=time.perf_counter(),
                cpu_begin=_cpu_seconds(),
                poll_begin=(probes.poll_cpu, probes.poll_calls),
            )
            probes.serverapp_pids.add(os.getpid())
            result = original_run_round(self, grid, server_round, *a)
            probes.rounds[server_round].trained_at = time.perf_counter()
            return result

        FederatedLoRA.run_round = run_round  # type: ignore[method-assign]

        def sampled(started: float, a: Any, result: Any) -> None:
            self.rounds[self.current].sampled_at = time.perf_counter()

        def exchanged(started: float, a: Any, replies: Any) -> None:
            times = self.rounds[self.current]
            times.exchanged_at = time.perf_counter()
            for reply in replies:
                if reply.has_error():
                    continue
                record = reply.content.metric_records.get(keys.METRICS_RECORD)
                if record is not None and keys.TRAIN_SECONDS in record:
                    times.train_seconds.append(float(record[keys.TRAIN_SECONDS]))

        def evaluated(started: float, a: Any, result: Any) -> None:
            times = self.rounds.get(self.current)
            # Only the evaluation between a round's aggregation and its checkpoint.
            if times is not None and times.trained_at and not times.end:
                times.eval_seconds = time.perf_counter() - started

        def checkpointed(started: float, a: Any, result: Any) -> None:
            if self.current in self.rounds:
                times = self.rounds[self.current]
                times.end = time.perf_counter()
                times.cpu_end = _cpu_seconds()
                times.poll_end = (self.poll_cpu, self.poll_calls)
                times.rss_mb = _rss_mb(self.sampler.me)

        def built(started: float, a: Any, result: Any) -> None:
            pool = a[0].pool
            self.parallelism = int(pool.num_actors) if pool is not None else 0

        around(FederatedLoRA, "configure_train", sampled)
        around(FederatedLoRA, "train", exchanged)
        around(Workbench, "evaluate", evaluated)
        around(server_app, "save_checkpoint", checkpointed)
        around(RayBackend, "build", built)

        original_add = VceMetrics.add_clientapp_runtime

        def add_clientapp_runtime(self: Any, runtime: float) -> None:
            with probes._lock:
                probes.clientapp_calls.append((time.perf_counter(), runtime))
            original_add(self, runtime)

        VceMetrics.add_clientapp_runtime = add_clientapp_runtime  # type: ignore[method-assign]

        # Called only by the Simulation Engine's one message-extractor thread
        # (vce_api.add_messages_to_queue): once per node every 0.1 s.
        original_get = InMemoryLinkState.get_message_ins

        def get_message_ins(self: Any, *a: Any, **k: Any) -> Any:
            started = time.thread_time()
            result = original_get(self, *a, **k)
            probes.poll_cpu += time.thread_time() - started
            probes.poll_calls += 1
            return result

        InMemoryLinkState.get_message_ins = get_message_ins  # type: ignore[method-assign]

    def round_report(
        self, server_round: int, metrics: dict[str, Any]
    ) -> dict[str, Any]:
        """The figures of one round (see the module docstring for the definitions)."""
        times = self.rounds[server_round]
        wall = times.end - times.begin
        compute = critical_path(times.train_seconds, self.parallelism)
        calls = [
            seconds
            for finished, seconds in self.clientapp_calls
            if times.begin <= finished <= times.trained_at
        ]
        without_eval = wall - times.eval_seconds
        return {
            "round": server_round,
            "sampled": metrics.get("sampled"),
            "replies": metrics.get("clients"),
            "failed": metrics.get("failed"),
            "wall_seconds": round(wall, 3),
            "metrics_seconds": metrics.get("seconds"),
            "sample_seconds": round(times.sampled_at - times.begin, 3),
            "exchange_seconds": round(times.exchanged_at - times.sampled_at, 3),
            "aggregate_seconds": round(times.trained_at - times.exchanged_at, 3),
            "eval_seconds": round(times.eval_seconds, 3),
            "record_seconds": round(
                times.end - times.trained_at - times.eval_seconds, 3
            ),
            "train_seconds": [round(t, 3) for t in times.train_seconds],
            "train_seconds_sum": round(sum(times.train_seconds), 3),
            "clientapp_seconds_sum": round(sum(calls), 3),
            "client_compute_critical_path": round(compute, 3),
            "overhead_fraction": round(1 - compute / without_eval, 4)
            if without_eval > 0
            else None,
            "overhead_fraction_with_eval": round(1 - compute / wall, 4)
            if wall > 0
            else None,
            "coordinator_cpu_seconds": round(times.cpu_end - times.cpu_begin, 3),
            "coordinator_cpu_share": round(
                (times.cpu_end - times.cpu_begin) / (wall * (os.cpu_count() or 1)), 4
            )
            if wall > 0
            else None,
            "flower_poll_cpu_seconds": round(
                times.poll_end[0] - times.poll_begin[0], 3
            ),
            "flower_poll_calls": times.poll_end[1] - times.poll_begin[1],
            "eval_accuracy": metrics.get("eval_accuracy"),
            "rss_mb_after_round": round(times.rss_mb, 1),
        }


def run_cell(args: argparse.Namespace, num_clients: int) -> dict[str, Any]:
    """Run one cell in this process (the coordinator) and measure it.

    Parameters
    ----------
    args : argparse.Namespace
        The parsed command line.
    num_clients : int
        Virtual clients of this cell.

    Returns
    -------
    dict
        The cell's JSON object (without ``command``).
    """
    from common.config import RunConfig
    from simulations.cli import simulate

    out = Path(args.out) / f"clients-{num_clients}"
    # Each cell's own Ray session and site caches: the other benchmarks' are left alone.
    ray_tmp = tempfile.mkdtemp(prefix="fgscale-", dir="/tmp")  # short: socket paths
    os.environ["RAY_TMPDIR"] = ray_tmp
    os.environ["FEDGRAFT_CACHE_DIR"] = str(out / "site-cache")
    os.environ.setdefault("FLWR_HOME", str(out / ".flwr"))
    config = RunConfig.from_flat(cell_config(args, num_clients, out / "run"))
    sampler = ProcessSampler(args.interval)
    probes = CoordinatorProbes(sampler)
    probes.install()
    sampler.start()
    started = time.perf_counter()
    try:
        with redirect_stdout(sys.stderr):  # the run's tables; stdout is JSON
            simulate(config)
    finally:
        shutil.rmtree(ray_tmp, ignore_errors=True)  # Ray has shut down by now
    wall = time.perf_counter() - started
    sampler.stop.set()
    sampler.sample()
    peak_rss_mb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    rows = [json.loads(line) for line in (out / "run" / "metrics.jsonl").open()]
    per_round = [
        probes.round_report(row["round"], row) for row in rows if row["round"] >= 1
    ]
    steady = [r for r in per_round if r["round"] >= 2] or per_round

    def worst(key: str) -> float | None:
        values = [r[key] for r in steady if r[key] is not None]
        return max(values) if values else None

    def mean(key: str) -> float | None:
        values = [r[key] for r in steady if r[key] is not None]
        return round(sum(values) / len(values), 4) if values else None

    first = per_round[0] if per_round else {}
    return {
        "benchmark": "scale",
        "num_clients": num_clients,
        "sampled_per_round": [r["sampled"] for r in per_round],
        "replies_per_round": [r["replies"] for r in per_round],
        "rounds": len(per_round),
        "parallelism": probes.parallelism,
        "peak_rss_mb": round(peak_rss_mb, 1),
        "peak_rss_mb_sampled": round(sampler.peak_self_mb, 1),
        "rss_mb_after_round": [r["rss_mb_after_round"] for r in per_round],
        "serverapp_in_measured_process": probes.serverapp_pids == {os.getpid()},
        "ray_workers": {
            "processes": len(sampler.workers),
            "peak_rss_mb_each": round(sampler.peak_worker_mb, 1),
            "peak_rss_mb_sum": round(sampler.peak_workers_sum_mb, 1),
            "ray_services_peak_rss_mb_sum": round(sampler.peak_services_sum_mb, 1),
        },
        "overhead_fraction": worst("overhead_fraction"),
        "overhead_fraction_mean": mean("overhead_fraction"),
        "overhead_fraction_with_eval": worst("overhead_fraction_with_eval"),
        "overhead_fraction_with_eval_mean": mean("overhead_fraction_with_eval"),
        "first_round_overhead_fraction": first.get("overhead_fraction"),
        "first_round_overhead_fraction_with_eval": first.get(
            "overhead_fraction_with_eval"
        ),
        "round_wall_seconds": [r["wall_seconds"] for r in per_round],
        "eval_seconds": [r["eval_seconds"] for r in per_round],
        "coordinator_cpu_seconds_per_round": [
            r["coordinator_cpu_seconds"] for r in per_round
        ],
        "coordinator_cpu_seconds": round(_cpu_seconds(), 1),
        "coordinator_cpu_share": mean("coordinator_cpu_share"),
        "flower_poll_cpu_seconds": mean("flower_poll_cpu_seconds"),
        "coordinator_cpu_share_per_round": [
            r["coordinator_cpu_share"] for r in per_round
        ],
        "flower_poll_cpu_seconds_per_round": [
            r["flower_poll_cpu_seconds"] for r in per_round
        ],
        "eval_accuracy": rows[-1]["eval_accuracy"],
        "wall_seconds": round(wall, 1),
        "per_round": per_round,
        "settings": {
            "data": "clinc150 train, iid",
            "test_rows_per_label": args.test_per_label,
            "eval_every": args.eval_every,
            "batch_size": args.batch_size,
            "local_epochs": args.local_epochs,
            "max_steps": args.max_steps,
            "cpus_per_client": config.sim.cpus_per_client,
            "model": config.model.name,
            "cpu_count": os.cpu_count(),
        },
    }


# -- the driver of the cells --------------------------------------------------------


def _cell_command(args: argparse.Namespace, num_clients: int) -> list[str]:
    return [
        sys.executable,
        str(Path(__file__).resolve()),
        "--cell",
        str(num_clients),
        "--out",
        str(args.out),
        "--rounds",
        str(args.rounds),
        "--sampled",
        str(args.sampled),
        "--batch-size",
        str(args.batch_size),
        "--local-epochs",
        str(args.local_epochs),
        "--max-steps",
        str(args.max_steps),
        "--test-per-label",
        str(args.test_per_label),
        "--eval-every",
        str(args.eval_every),
        "--interval",
        str(args.interval),
    ]


def comparison(cells: list[dict[str, Any]], command: str) -> dict[str, Any]:
    """The side-by-side object: peak RSS ratio and both targets.

    Parameters
    ----------
    cells : list of dict
        The cells' JSON objects, smallest client count first.
    command : str
        The command line that produced them.
    """
    small, large = cells[0], cells[-1]
    ratio = large["peak_rss_mb"] / small["peak_rss_mb"]
    overheads = [c["overhead_fraction"] for c in cells]
    with_eval = [c["overhead_fraction_with_eval"] for c in cells]
    return {
        "benchmark": "scale",
        "comparison": True,
        "num_clients": [c["num_clients"] for c in cells],
        "peak_rss_mb": [c["peak_rss_mb"] for c in cells],
        "peak_rss_ratio": round(ratio, 4),
        "rss_flat": ratio <= RSS_FLAT_RATIO,
        "rss_flat_threshold": RSS_FLAT_RATIO,
        "overhead_fraction": overheads,
        "overhead_fraction_with_eval": with_eval,
        "overhead_target": OVERHEAD_TARGET,
        "overhead_met": all(o is not None and o <= OVERHEAD_TARGET for o in overheads),
        "overhead_met_with_eval": all(
            o is not None and o <= OVERHEAD_TARGET for o in with_eval
        ),
        "coordinator_cpu_share": [c["coordinator_cpu_share"] for c in cells],
        "flower_poll_cpu_seconds": [c["flower_poll_cpu_seconds"] for c in cells],
        "wall_seconds": [c["wall_seconds"] for c in cells],
        "command": command,
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="100 and 300, 2 rounds")
    parser.add_argument("--clients", default="100,1000", help="comma list of counts")
    parser.add_argument("--sampled", type=int, default=10, help="clients per round")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--local-epochs", type=int, default=5)
    parser.add_argument("--max-steps", type=int, default=10)
    parser.add_argument("--test-per-label", type=int, default=1)
    parser.add_argument(
        "--eval-every", type=int, default=1, help="eval.every: evaluate every N rounds"
    )
    parser.add_argument("--interval", type=float, default=0.5, help="RSS sampling")
    parser.add_argument("--out", default="", help="folder for the runs' outputs")
    parser.add_argument("--cell", type=int, default=0, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    logging.basicConfig(
        level=logging.WARNING,
        stream=sys.stderr,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
    )
    for name in ("benchmarks", "fedgraft", "common", "client", "server"):
        logging.getLogger(name).setLevel(logging.INFO)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("FLWR_TELEMETRY_ENABLED", "0")
    os.environ.setdefault("FLWR_DISABLE_UPDATE_CHECK", "1")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    os.environ.pop("RAY_ADDRESS", None)
    if args.cell:
        result = run_cell(args, args.cell)
        (Path(args.out) / f"cell-{args.cell}.json").write_text(json.dumps(result))
        return 0

    command = "python benchmarks/scale.py " + " ".join(
        sys.argv[1:] if argv is None else argv
    )
    if args.quick:
        args.clients, args.rounds, args.max_steps = "100,300", 2, 5
    counts = sorted({int(c) for c in args.clients.split(",") if c.strip()})
    if len(counts) < 2:
        parser.error("--clients: give at least two counts to compare")
    args.out = str(Path(args.out or tempfile.mkdtemp(prefix="fedgraft-scale-")))
    Path(args.out).mkdir(parents=True, exist_ok=True)
    cells: list[dict[str, Any]] = []
    for num_clients in counts:
        log.info("cell: %d clients, %d sampled per round", num_clients, args.sampled)
        # One process per cell: its peak RSS is that cell's alone.
        done = subprocess.run(
            _cell_command(args, num_clients), stdout=sys.stderr, check=False
        )
        result_file = Path(args.out) / f"cell-{num_clients}.json"
        if done.returncode != 0 or not result_file.exists():
            log.error("cell %d failed (exit %d)", num_clients, done.returncode)
            return 1
        cell = json.loads(result_file.read_text())
        cell["command"] = command
        cells.append(cell)
        print(json.dumps(cell), flush=True)
    print(json.dumps(comparison(cells, command)), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
