"""Secure aggregation cost: plain sums, fedgraft's SecAgg+ and Flower's SecAgg+.

Every cell (``N`` clients, ``P`` parameters) draws one seeded float32 vector per
client (normals of scale ``1e-3``) and sums them three ways, on the same vectors and
in the same process:

``plain``
    Each client replies with its vector as a float32 ``ArrayRecord``; the coordinator
    adds them with fedgraft's ``PlainSum`` (what a round without secure aggregation
    does).
``fedgraft``
    ``server.secagg.SecureSum.prepare`` (advertise, share keys), one training message
    per client whose handler calls ``client.secagg.masked_update`` on the vector (as
    ``client/client_app.py`` does), and ``SecureSum.collect`` (unmask, decode). Every
    client has weight 1 and ``secagg.max-weight`` is 1, so the decoded total is the
    plain sum.
``fedgraft-malicious``
    The same with ``secagg.mode = malicious``: every site has an Ed25519 key and a
    roster of the sites' public keys (written before the clock starts), signs its key
    advertisement, verifies its neighbours', hashes the model it received (here the
    vector, standing in for a global model of the same size) and signs the survivor
    set in the consistency round; before unmasking it verifies every survivor's
    signature. The coordinator checks each advertisement's signature.
``flower``
    Flower's legacy ``SecAggPlusWorkflow`` inside ``DefaultWorkflow`` with a
    ``LegacyContext`` and ``FedAvg``, against a ``client_fn`` ``ClientApp`` whose
    ``NumPyClient.fit`` returns the vector, behind ``secaggplus_mod``. It yields
    the mean, multiplied back by ``N`` for the correctness check. ``num_shares`` is
    fedgraft's neighbourhood size ``k`` plus one (Flower counts the share a client
    keeps for itself; its neighbourhood is the ``k`` nodes around it in a ring plus
    itself) and ``reconstruction_threshold`` is fedgraft's threshold ``t``.

No engine runs: ``simulations.inprocess_grid.InProcessGrid`` hands every message
straight to the ClientApp and clocks the time spent inside it (a protobuf copy of each
outgoing message stands in for the wire and is counted on neither side).
``client_seconds`` is that time over the measured scope divided by ``N`` (the mean per
client); ``server_seconds`` is the wall time of the coordinator-side calls minus it.
``client_stage_seconds`` and ``server_stage_seconds`` split both over the key stages,
the masked input and the unmasking (fedgraft's ``prepare``, training round and
``collect``; Flower's setup and share-keys, collect-masked-vectors and unmask stages).
``consistency`` is part of the unmasking step for ``fedgraft-malicious``.
``ratio_to_flower_client`` and ``ratio_to_flower_server`` divide each method's
seconds by Flower's in the same cell. Neither
training message carries a global model down (Flower's strategy starts from empty
parameters), so the costs are those of the aggregation alone; Flower's message and
record construction is inside every method alike. For ``flower`` only the fit round
(the ``SecAggPlusWorkflow`` call, its four stages and ``FedAvg.aggregate_fit``) is
timed, not the workflow's initialisation; ``server_seconds_excl_strategy`` leaves out
``FedAvg.aggregate_fit`` too.

Each cell runs ``--repeats`` rounds (default 3) of every method, the methods taking
turns, and reports the fastest round of each (the least disturbed by other load on
the machine); ``client_seconds_all`` and ``server_seconds_all`` list every round. A
small unmeasured round of each method comes first, to pay import and first-call
costs. ``--max-flower-seconds`` skips a flower cell whose round, predicted from an
earlier flower cell, would take longer; its object then carries ``skipped``.

``upload_bytes`` is what one client's upload weighs on the wire: the serialised
float32 array (``plain``), the masked ``uint32`` array (``fedgraft``; ``uint64`` for a
cohort too large for 1e-6 steps in 32 bits, e.g. above 214 clients at clip 10) and the
masked ``int64`` arrays Flower puts in its reply (``flower``), each including the small
``.npy`` header. ``max_abs_error`` compares each method's sum with the float64 sum of
the vectors; ``tolerance`` is the quantisation bound (``N`` half steps for fedgraft's
rounding, ``N`` steps for Flower's stochastic rounding).

Output: one JSON object per measurement on stdout, printed when the cell is done;
logs go to stderr. Run from the repository root::

    python benchmarks/secagg.py --quick                    # N=10 (both P), N=50 small
    python benchmarks/secagg.py > /tmp/secagg_full.jsonl   # all six cells
"""

from __future__ import annotations

import argparse
import contextlib
import gc
import json
import logging
import sys
import tempfile
import time
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TextIO

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from flwr.app import Context, Message, MetricRecord, RecordDict
from flwr.client import Client, NumPyClient
from flwr.client.mod import secaggplus_mod
from flwr.clientapp import ClientApp
from flwr.common import NDArrays, Scalar, ndarrays_to_parameters
from flwr.common.logger import console_handler
from flwr.common.secure_aggregation.secaggplus_constants import (
    RECORD_KEY_CONFIGS,
    Key,
)
from flwr.common.serde import message_from_proto, message_to_proto
from flwr.server import LegacyContext, ServerConfig
from flwr.server.strategy import FedAvg
from flwr.server.workflow import DefaultWorkflow, SecAggPlusWorkflow
from flwr.server.workflow.constant import MAIN_PARAMS_RECORD

from client import secagg as client_secagg
from common import keys
from common.codec import Float32Codec
from common.config import SecAggConfig
from common.secagg import identity
from common.secagg.encoding import flatten, round_encoding
from common.secagg.protocol import (
    HONEST_BUT_CURIOUS,
    MALICIOUS,
    default_neighbours,
    default_threshold,
)
from common.wire import to_array_record
from server.secagg import SecureSum
from server.summation import PlainSum
from simulations.inprocess_grid import InProcessGrid

log = logging.getLogger("benchmarks.secagg")

FULL_CELLS: tuple[tuple[int, int], ...] = (
    (10, 77_578),
    (10, 1_000_000),
    (50, 77_578),
    (50, 1_000_000),
    (100, 77_578),
    (100, 1_000_000),
)
QUICK_CELLS: tuple[tuple[int, int], ...] = ((10, 77_578), (10, 1_000_000), (50, 77_578))
METHODS: tuple[str, ...] = ("plain", "fedgraft", "fedgraft-malicious", "flower")
VECTOR_SCALE = 1e-3
TENSOR = "w"  # the one tensor every vector stands for


@dataclass
class Stats:
    """The counters ``SecureSum`` and ``PlainSum`` update (``RoundStats``)."""

    rejected: int = 0
    failed: int = 0


class WireGrid(InProcessGrid):
    """``InProcessGrid`` that hands every client its own copy of a message.

    A real engine serialises each message, so a client that edits what it received
    (``secaggplus_mod`` pops the stage from its config record, and Flower's workflow
    sends one record to every node) cannot affect another. The copies are a protobuf
    round trip of the outgoing messages; replies are delivered as they are.

    Attributes
    ----------
    wire_seconds : float
        Time spent copying, counted as neither client nor coordinator time.
    """

    def __init__(
        self,
        client_app: ClientApp,
        nodes: Sequence[int],
        node_configs: Mapping[int, Mapping[str, Any]] | None = None,
    ) -> None:
        configs = node_configs or {}
        super().__init__(client_app, {node: configs.get(node, {}) for node in nodes})
        self.wire_seconds = 0.0

    def send_and_receive(
        self, messages: Iterable[Message], *, timeout: float | None = None
    ) -> list[Message]:
        """Copy each message as the wire would, then deliver it."""
        started = time.perf_counter()
        copies = [message_from_proto(message_to_proto(m)) for m in messages]
        self.wire_seconds += time.perf_counter() - started
        return super().send_and_receive(copies, timeout=timeout)


@dataclass
class Clock:
    """Wall and in-ClientApp seconds of named coordinator-side steps.

    Attributes
    ----------
    wall : dict[str, float]
        Step -> wall seconds of the coordinator call (clients included, message
        copies left out).
    client : dict[str, float]
        Step -> seconds spent inside the ClientApp during that call.
    """

    wall: dict[str, float] = field(default_factory=dict)
    client: dict[str, float] = field(default_factory=dict)

    @contextlib.contextmanager
    def step(self, name: str, grid: WireGrid) -> Iterator[None]:
        """Clock the body as step ``name`` (adding to an earlier step of that name)."""
        before = grid.client_seconds, grid.wire_seconds
        started = time.perf_counter()
        try:
            yield
        finally:
            wall = time.perf_counter() - started - (grid.wire_seconds - before[1])
            inside = grid.client_seconds - before[0]
            self.wall[name] = self.wall.get(name, 0.0) + wall
            self.client[name] = self.client.get(name, 0.0) + inside

    def wrap(
        self, name: str, grid: WireGrid, function: Callable[..., Any]
    ) -> Callable[..., Any]:
        """``function`` clocked as step ``name`` on every call."""

        def clocked(*args: Any, **kwargs: Any) -> Any:
            with self.step(name, grid):
                return function(*args, **kwargs)

        return clocked

    def server(self, name: str) -> float:
        """Coordinator seconds of a step: its wall time less the clients' time."""
        return self.wall.get(name, 0.0) - self.client.get(name, 0.0)


@dataclass
class Measurement:
    """One method's result in one cell, before the cell's ratios are added."""

    method: str
    clients: int
    params: int
    client_seconds: float
    server_seconds: float
    upload_bytes: int
    max_abs_error: float
    tolerance: float
    scope: str
    extra: dict[str, Any] = field(default_factory=dict)

    def record(self) -> dict[str, Any]:
        """The JSON object for stdout (without the cross-method ratios)."""
        return {
            "method": self.method,
            "clients": self.clients,
            "params": self.params,
            "client_seconds": round(self.client_seconds, 6),
            "server_seconds": round(self.server_seconds, 6),
            "upload_bytes": self.upload_bytes,
            "upload_vs_float32": round(self.upload_bytes / (4 * self.params), 4),
            "max_abs_error": self.max_abs_error,
            "tolerance": self.tolerance,
            "correct": bool(self.max_abs_error <= self.tolerance),
            "scope": self.scope,
            **self.extra,
        }


def neighbourhood(num_clients: int, neighbours: int, threshold: int) -> tuple[int, int]:
    """fedgraft's ``(k, t)`` for a round of ``num_clients``, as ``SecureSum`` picks."""
    k = min(neighbours or default_neighbours(num_clients), num_clients - 1)
    return k, threshold or default_threshold(k)


def draw_vectors(num_clients: int, params: int, seed: int) -> np.ndarray:
    """``(N, P)`` float32 normals of scale ``VECTOR_SCALE``, seeded per cell."""
    rng = np.random.default_rng([seed, num_clients, params])
    vectors = rng.standard_normal((num_clients, params), dtype=np.float32)
    vectors *= np.float32(VECTOR_SCALE)
    return vectors


def node_vectors(vectors: np.ndarray) -> dict[int, np.ndarray]:
    """Node id ``i + 1`` -> row ``i``."""
    return {index + 1: row for index, row in enumerate(vectors)}


def array_bytes(record: Any) -> int:
    """Serialised size of every array in an ``ArrayRecord`` (``.npy`` bytes)."""
    return sum(len(array.data) for array in record.values())


def max_error(total: np.ndarray, expected: np.ndarray) -> float:
    """Largest absolute difference, in float64."""
    return float(np.max(np.abs(total.astype(np.float64) - expected)))


# -- plain -----------------------------------------------------------------------------


def plain_app(vectors: Mapping[int, np.ndarray]) -> ClientApp:
    """Clients that reply with their vector as float32, as a plain round does."""
    app = ClientApp()
    codec = Float32Codec()

    @app.train()
    def train(message: Message, context: Context) -> Message:
        arrays = codec.encode({TENSOR: vectors[context.node_id]})
        metrics = {keys.NUM_EXAMPLES: 1, keys.TRAIN_LOSS: 0.0, keys.TRAIN_SECONDS: 0.0}
        content = RecordDict(
            {
                keys.ADAPTER_RECORD: to_array_record(arrays),
                keys.METRICS_RECORD: MetricRecord(metrics),
            }
        )
        return Message(content, reply_to=message)

    return app


def run_plain(vectors: np.ndarray, expected: np.ndarray) -> Measurement:
    """One plain round: float32 uploads added by ``PlainSum``."""
    count, params = vectors.shape
    grid = WireGrid(plain_app(node_vectors(vectors)), range(1, count + 1))
    summer, stats, clock = PlainSum(Float32Codec()), Stats(), Clock()
    reference = {TENSOR: np.zeros(params, np.float32)}
    with clock.step("round", grid):
        nodes = grid.get_node_ids()
        summer.prepare(grid, nodes, 1, stats)
        messages = [Message(RecordDict(), node, "train") for node in nodes]
        replies = grid.send_and_receive(messages)
        result = summer.collect(grid, replies, reference, stats)
    if result is None or stats.rejected or stats.failed:
        raise RuntimeError(f"plain round failed: {stats}")
    upload = array_bytes(grid.received[0].content.array_records[keys.ADAPTER_RECORD])
    eps = float(np.finfo(np.float32).eps)
    return Measurement(
        method="plain",
        clients=count,
        params=params,
        client_seconds=clock.client["round"] / count,
        server_seconds=clock.server("round"),
        upload_bytes=upload,
        max_abs_error=max_error(result.total[TENSOR], expected),
        tolerance=eps * float(np.max(np.abs(expected))) + 1e-12,
        scope="train + PlainSum.collect",
    )


# -- fedgraft --------------------------------------------------------------------------


def fedgraft_app(vectors: Mapping[int, np.ndarray]) -> ClientApp:
    """fedgraft's SecAgg+ handlers plus a train handler that masks the fixed vector."""
    app = ClientApp()
    app.query(keys.ACTION_SECAGG_ADVERTISE)(client_secagg.advertise)
    app.query(keys.ACTION_SECAGG_SHARE)(client_secagg.share_keys)
    app.query(keys.ACTION_SECAGG_CONSISTENCY)(client_secagg.consistency)
    app.query(keys.ACTION_SECAGG_UNMASK)(client_secagg.unmask)
    # What every client hashes as the global model it received, as client_app does.
    received = np.zeros_like(next(iter(vectors.values()))).tobytes()

    @app.train()
    def train(message: Message, context: Context) -> Message:
        request = message.content.config_records[keys.SECAGG_RECORD]
        server_round = int(request[keys.CFG_ROUND])  # type: ignore[arg-type]
        masked, notes = client_secagg.masked_update(
            context,
            request,
            server_round,
            flatten({TENSOR: vectors[context.node_id]}),
            1,
            model_hash=identity.model_digest({TENSOR: received}, {}),
        )
        metrics = {keys.TRAIN_LOSS: 0.0, keys.TRAIN_SECONDS: 0.0, keys.ON_CUDA: 0}
        content = RecordDict(
            {
                keys.MASKED_RECORD: masked,
                keys.METRICS_RECORD: MetricRecord(metrics),
                keys.SECAGG_RECORD: notes,
            }
        )
        return Message(content, reply_to=message)

    return app


def run_fedgraft(
    vectors: np.ndarray,
    expected: np.ndarray,
    settings: SecAggConfig,
    seed: int,
) -> Measurement:
    """One fedgraft SecAgg+ round: prepare, masked training replies, collect (in
    ``settings.mode``; a malicious-mode round first writes the sites' keys and
    roster, untimed)."""
    count = len(vectors)
    with tempfile.TemporaryDirectory(prefix="secagg-bench-") as folder:
        configs = (
            site_configs(Path(folder), count) if settings.mode == MALICIOUS else None
        )
        app = fedgraft_app(node_vectors(vectors))
        grid = WireGrid(app, range(1, count + 1), configs)
        return fedgraft_round(grid, vectors, expected, settings, seed)


def site_configs(folder: Path, count: int) -> dict[int, dict[str, Any]]:
    """Node configs of ``count`` sites with Ed25519 keys and a shared roster."""
    roster = folder / "roster.txt"
    lines = []
    for node in range(1, count + 1):
        _, public = identity.write_site_keys(f"site{node}", folder)
        lines.append(public.read_text())
    roster.write_text("".join(lines))
    return {
        node: {
            "secagg-roster": str(roster),
            "secagg-signing-key": str(folder / f"site{node}.ed25519"),
        }
        for node in range(1, count + 1)
    }


def fedgraft_round(
    grid: WireGrid,
    vectors: np.ndarray,
    expected: np.ndarray,
    settings: SecAggConfig,
    seed: int,
) -> Measurement:
    """Clock one fedgraft round on ``grid``."""
    count, params = vectors.shape
    summer, stats, clock = SecureSum(settings, seed), Stats(), Clock()
    reference = {TENSOR: np.zeros(params, np.float32)}
    nodes = grid.get_node_ids()
    with clock.step("keys", grid):
        extras = summer.prepare(grid, nodes, 1, stats)
    with clock.step("masked_input", grid):
        messages = [
            Message(RecordDict({keys.SECAGG_RECORD: record}), node, "train")
            for node, record in extras.items()
        ]
        replies = grid.send_and_receive(messages)
    with clock.step("unmask", grid):
        result = summer.collect(grid, replies, reference, stats)
    if result is None or result.count != count or stats.rejected or stats.failed:
        raise RuntimeError(f"fedgraft round failed: {stats}, extras for {len(extras)}")
    uploads = [
        r for r in grid.received if keys.MASKED_RECORD in r.content.array_records
    ]
    upload = array_bytes(uploads[0].content.array_records[keys.MASKED_RECORD])
    k, t = neighbourhood(count, settings.neighbours, settings.threshold)
    scale = round_encoding(count, settings.clip_norm, settings.max_weight).scale
    stages = ("keys", "masked_input", "unmask")
    return Measurement(
        method="fedgraft" if settings.mode != MALICIOUS else "fedgraft-malicious",
        clients=count,
        params=params,
        client_seconds=sum(clock.client.values()) / count,
        server_seconds=sum(clock.server(s) for s in stages),
        upload_bytes=upload,
        max_abs_error=max_error(result.total[TENSOR], expected),
        tolerance=count * 0.5 / scale + 1e-6 * float(np.max(np.abs(expected))),
        scope="SecureSum.prepare + masked train round + SecureSum.collect",
        extra={
            "neighbours": k,
            "threshold": t,
            "decoded_weight": result.weight,
            "client_stage_seconds": {
                s: round(clock.client[s] / count, 6) for s in stages
            },
            "server_stage_seconds": {s: round(clock.server(s), 6) for s in stages},
        },
    )


# -- flower ----------------------------------------------------------------------------


class FixedClient(NumPyClient):
    """A legacy client whose ``fit`` returns one fixed vector with weight 1.

    Parameters
    ----------
    vector : np.ndarray
        What ``fit`` returns, whatever it is sent.
    """

    def __init__(self, vector: np.ndarray) -> None:
        self.vector = vector

    def fit(
        self, parameters: NDArrays, config: dict[str, Scalar]
    ) -> tuple[NDArrays, int, dict[str, Scalar]]:
        """The fixed vector, one example, no metrics."""
        del parameters, config
        return [self.vector], 1, {}


def flower_app(vectors: Mapping[int, np.ndarray]) -> ClientApp:
    """A legacy ``client_fn`` ClientApp behind ``secaggplus_mod``."""

    def client_fn(context: Context) -> Client:
        return FixedClient(vectors[context.node_id]).to_client()

    return ClientApp(client_fn=client_fn, mods=[secaggplus_mod])


def flower_stage(message: Message) -> str:
    """The SecAgg+ stage a workflow message asks for (read before the mod pops it)."""
    configs = message.content.config_records.get(RECORD_KEY_CONFIGS)
    return str(configs.get(Key.STAGE, "")) if configs is not None else ""


def run_flower(
    vectors: np.ndarray,
    expected: np.ndarray,
    neighbours: int,
    threshold: int,
    quantization_range: int,
    clipping_range: float,
) -> Measurement:
    """One fit round of Flower's ``SecAggPlusWorkflow`` through ``DefaultWorkflow``."""
    count, params = vectors.shape
    grid = WireGrid(flower_app(node_vectors(vectors)), range(1, count + 1))
    strategy = FedAvg(
        fraction_fit=1.0,
        fraction_evaluate=0.0,
        min_fit_clients=count,
        min_evaluate_clients=0,
        min_available_clients=count,
        initial_parameters=ndarrays_to_parameters([]),
    )
    clock = Clock()
    strategy.aggregate_fit = clock.wrap(  # type: ignore[method-assign]
        "aggregate_fit", grid, strategy.aggregate_fit
    )
    workflow = SecAggPlusWorkflow(
        num_shares=neighbours + 1,
        reconstruction_threshold=threshold,
        max_weight=1.0,
        clipping_range=clipping_range,
        quantization_range=quantization_range,
    )
    for stage, name in (
        ("setup_stage", "keys"),
        ("share_keys_stage", "keys"),
        ("collect_masked_vectors_stage", "masked_input"),
        ("unmask_stage", "unmask"),
    ):
        setattr(workflow, stage, clock.wrap(name, grid, getattr(workflow, stage)))
    server_context = Context(
        run_id=1, node_id=0, node_config={}, state=RecordDict(), run_config={}
    )
    legacy = LegacyContext(
        server_context, config=ServerConfig(num_rounds=1), strategy=strategy
    )
    DefaultWorkflow(fit_workflow=clock.wrap("fit", grid, workflow))(grid, legacy)

    masked = [
        r
        for r in grid.received
        if not r.has_error()
        and Key.MASKED_PARAMETERS
        in r.content.config_records.get(RECORD_KEY_CONFIGS, {})
    ]
    if len(masked) != count:
        raise RuntimeError(f"flower: {len(masked)} masked vectors from {count} clients")
    blobs = masked[0].content.config_records[RECORD_KEY_CONFIGS][Key.MASKED_PARAMETERS]
    upload = sum(len(b) for b in blobs)  # type: ignore[union-attr, arg-type]
    mean = legacy.state.array_records[MAIN_PARAMS_RECORD].to_numpy_ndarrays()
    if len(mean) != 1 or mean[0].shape != (params,):
        raise RuntimeError(f"flower: aggregate has shapes {[a.shape for a in mean]}")
    total = mean[0].astype(np.float64) * count
    step = 2 * clipping_range / quantization_range
    stages = ("keys", "masked_input", "unmask")
    server_seconds = clock.server("fit")
    return Measurement(
        method="flower",
        clients=count,
        params=params,
        client_seconds=clock.client["fit"] / count,
        server_seconds=server_seconds,
        upload_bytes=upload,
        max_abs_error=max_error(total, expected),
        tolerance=count * step * 1.01 + 1e-6 * float(np.max(np.abs(expected))),
        scope="fit round: SecAggPlusWorkflow (4 stages incl. FedAvg.aggregate_fit)",
        extra={
            "neighbours": neighbours,
            "num_shares": neighbours + 1,
            "threshold": threshold,
            "server_seconds_excl_strategy": round(
                server_seconds - clock.server("aggregate_fit"), 6
            ),
            "client_stage_seconds": {
                s: round(clock.client[s] / count, 6) for s in stages
            },
            "server_stage_seconds": {s: round(clock.server(s), 6) for s in stages},
            "server_aggregate_fit_seconds": round(clock.server("aggregate_fit"), 6),
        },
    )


# -- cells -----------------------------------------------------------------------------


def fastest(runs: Sequence[Measurement]) -> Measurement:
    """The run with the least total seconds, carrying every run's spread and error.

    The fastest of several rounds is the one least disturbed by other load on the
    machine (``timeit``'s convention); ``max_abs_error`` becomes the worst over all
    runs, so every round's sum is checked.
    """
    chosen = min(runs, key=lambda m: m.client_seconds * m.clients + m.server_seconds)
    chosen.max_abs_error = max(m.max_abs_error for m in runs)
    chosen.extra["repeats"] = len(runs)
    if len(runs) > 1:
        chosen.extra["client_seconds_all"] = [round(m.client_seconds, 6) for m in runs]
        chosen.extra["server_seconds_all"] = [round(m.server_seconds, 6) for m in runs]
    return chosen


def add_ratios(records: list[dict[str, Any]]) -> None:
    """Ratios of each method's seconds to Flower's in the same cell."""
    flower = next(
        (r for r in records if r["method"] == "flower" and "skipped" not in r), None
    )
    if flower is None:
        return
    for record in records:
        if "skipped" in record:
            continue
        record["ratio_to_flower_client"] = round(
            record["client_seconds"] / flower["client_seconds"], 4
        )
        record["ratio_to_flower_server"] = round(
            record["server_seconds"] / flower["server_seconds"], 4
        )
        if str(record["method"]).startswith("fedgraft"):
            record["ratio_to_flower_server_excl_strategy"] = round(
                record["server_seconds"] / flower["server_seconds_excl_strategy"], 4
            )


def flower_cost(clients: int, params: int, neighbours: int) -> float:
    """Relative work of a Flower round: each client expands ``k + 1`` masks of ``P``."""
    return clients * (neighbours + 1) * params


def secagg_settings(args: argparse.Namespace, mode: str) -> SecAggConfig:
    """fedgraft's settings: weight 1 for every client, so the sum is the plain one."""
    return SecAggConfig(
        enabled=True,
        neighbours=args.neighbours,
        threshold=args.threshold,
        clip_norm=args.clip_norm,
        max_weight=1.0,
        timeout=120.0,
        mode=mode,
    )


def measure(
    method: str,
    vectors: np.ndarray,
    expected: np.ndarray,
    args: argparse.Namespace,
    repeat: int = 0,
) -> Measurement:
    """One round of ``method`` on ``vectors``."""
    gc.collect()
    if method == "plain":
        return run_plain(vectors, expected)
    if method.startswith("fedgraft"):
        mode = MALICIOUS if method == "fedgraft-malicious" else HONEST_BUT_CURIOUS
        return run_fedgraft(
            vectors, expected, secagg_settings(args, mode), args.seed + repeat
        )
    k, t = neighbourhood(len(vectors), args.neighbours, args.threshold)
    return run_flower(
        vectors, expected, k, t, args.quantization_range, args.clipping_range
    )


def warm_up(args: argparse.Namespace) -> None:
    """One small round of every method, unmeasured (lazy imports, first-call costs)."""
    vectors = draw_vectors(5, 1_000, args.seed)
    expected = vectors.sum(axis=0, dtype=np.float64)
    for method in args.methods:
        measure(method, vectors, expected, args)
    log.info("warmed up")


def flower_skip(
    clients: int, params: int, k: int, t: int, predicted: float, limit: float
) -> dict[str, Any]:
    """The JSON object for a flower cell left out by ``--max-flower-seconds``."""
    reason = (
        f"predicted {predicted:.0f} s for one round (scaled from an earlier "
        f"flower cell) exceeds --max-flower-seconds {limit:g}"
    )
    log.warning("N=%d P=%d flower skipped: %s", clients, params, reason)
    return {
        "method": "flower",
        "clients": clients,
        "params": params,
        "neighbours": k,
        "num_shares": k + 1,
        "threshold": t,
        "skipped": reason,
    }


def run_cell(
    clients: int,
    params: int,
    args: argparse.Namespace,
    flower_rates: dict[int, float],
) -> list[dict[str, Any]]:
    """Measure every method on one cell's vectors; returns the cell's JSON objects.

    ``flower_rates`` maps ``P`` to the seconds per unit of :func:`flower_cost` of the
    last flower cell with that many parameters (key ``0``: the last flower cell of
    any size). It predicts a flower cell's duration, preferring a cell of the same
    ``P`` since Flower's key and unmask stages do not grow with ``P``.
    """
    vectors = draw_vectors(clients, params, args.seed)
    expected = vectors.sum(axis=0, dtype=np.float64)
    k, t = neighbourhood(clients, args.neighbours, args.threshold)
    methods = list(args.methods)
    rate = flower_rates.get(params, flower_rates.get(0))
    skipped: dict[str, Any] | None = None
    if "flower" in methods and rate is not None:
        predicted = rate * flower_cost(clients, params, k)
        if predicted > args.max_flower_seconds:
            skipped = flower_skip(
                clients, params, k, t, predicted, args.max_flower_seconds
            )
            methods.remove("flower")
    # Methods take turns within each repeat, so a burst of other load is shared.
    runs: dict[str, list[Measurement]] = {method: [] for method in methods}
    for repeat in range(args.repeats):
        for method in methods:
            started = time.perf_counter()
            run = measure(method, vectors, expected, args, repeat)
            elapsed = time.perf_counter() - started
            runs[method].append(run)
            log.info(
                "N=%d P=%d %s run %d: client %.4f s per client, server %.4f s "
                "(%.1f s wall)",
                clients,
                params,
                method,
                repeat + 1,
                run.client_seconds,
                run.server_seconds,
                elapsed,
            )
            if method == "flower":
                rate = elapsed / flower_cost(clients, params, k)
                flower_rates[params] = flower_rates[0] = rate
            if run.max_abs_error > run.tolerance:
                log.error(
                    "N=%d P=%d %s: max abs error %.3g above tolerance %.3g",
                    clients,
                    params,
                    method,
                    run.max_abs_error,
                    run.tolerance,
                )
    records = [fastest(runs[method]).record() for method in methods]
    if skipped is not None:
        records.append(skipped)
    add_ratios(records)
    return records


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    """Command-line options."""
    parser = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0] if __doc__ else None,
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    parser.add_argument(
        "--quick", action="store_true", help="only N=10 (both P) and N=50 at P=77,578"
    )
    parser.add_argument(
        "--clients",
        type=int,
        nargs="+",
        help="client counts (overrides the cell list; with --params)",
    )
    parser.add_argument(
        "--params", type=int, nargs="+", help="parameter counts (with --clients)"
    )
    parser.add_argument("--methods", nargs="+", choices=METHODS, default=list(METHODS))
    parser.add_argument(
        "--repeats",
        type=int,
        default=3,
        help="rounds per method and cell (methods take turns); the fastest is reported",
    )
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument(
        "--neighbours",
        type=int,
        default=0,
        help="fedgraft secagg.neighbours (0 = about 2 log2 N)",
    )
    parser.add_argument(
        "--threshold",
        type=int,
        default=0,
        help="fedgraft secagg.threshold (0 = k // 2 + 1)",
    )
    parser.add_argument(
        "--clip-norm",
        type=float,
        default=10.0,
        help="fedgraft secagg.clip-norm (vectors have norm ~1e-3 sqrt(P))",
    )
    parser.add_argument(
        "--clipping-range",
        type=float,
        default=8.0,
        help="Flower's clipping_range (its default)",
    )
    parser.add_argument(
        "--quantization-range",
        type=int,
        default=4_194_304,
        help="Flower's quantization_range (its default, 2**22)",
    )
    parser.add_argument(
        "--max-flower-seconds",
        type=float,
        default=180.0,
        help="skip a flower cell predicted to take longer than this",
    )
    args = parser.parse_args(argv)
    if (args.clients is None) != (args.params is None):
        parser.error("--clients and --params go together")
    if args.repeats < 1:
        parser.error("--repeats must be at least 1")
    return args


def cells(args: argparse.Namespace) -> list[tuple[int, int]]:
    """The (N, P) cells to run, in order."""
    if args.clients is not None:
        return [(n, p) for n in args.clients for p in args.params]
    return list(QUICK_CELLS if args.quick else FULL_CELLS)


def main(argv: Sequence[str] | None = None, out: TextIO | None = None) -> int:
    """Run the benchmark; returns 1 when any sum was outside its tolerance."""
    args = parse_args(argv)
    out = out if out is not None else sys.stdout
    logging.basicConfig(
        level=logging.INFO, stream=sys.stderr, format="%(asctime)s %(name)s %(message)s"
    )
    logging.getLogger("flwr").setLevel(logging.WARNING)
    logging.getLogger("flwr").propagate = False
    console_handler.setStream(sys.stderr)
    flower_rates: dict[int, float] = {}
    failures = 0
    started = time.perf_counter()
    # Anything a library prints goes to stderr: stdout carries only the JSON lines.
    with contextlib.redirect_stdout(sys.stderr):
        warm_up(args)
        for clients, params in cells(args):
            records = run_cell(clients, params, args, flower_rates)
            for record in records:
                failures += int(record.get("correct") is False)
                print(json.dumps(record), file=out, flush=True)
    log.info("done in %.1f s", time.perf_counter() - started)
    return 1 if failures else 0


if __name__ == "__main__":
    raise SystemExit(main())
