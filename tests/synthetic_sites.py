"""The real coordinator (strategy, plain and secure summers) against sites that train
nothing: each site replies with a fixed, known delta through the real client-side
secure-aggregation code. Rounds take milliseconds, so attacks on the coordinator can be
staged message by message (``tamper``) and their outcome checked against the exact
mean of the honest deltas."""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

import numpy as np
from flwr.app import ConfigRecord, Context, Message, MetricRecord, RecordDict
from flwr.clientapp import ClientApp

from client import secagg
from common import keys
from common.codec import AdapterState, Codec, Float32Codec, build_codec
from common.config import RunConfig
from common.evaluation import EvalResult
from common.secagg.encoding import flatten
from common.wire import to_array_record
from server.aggregation.fedavg import FedAvg
from server.secagg import SecureSum
from server.strategy import AggregationRule, BackboneOffer, FederatedLoRA
from server.summation import PlainSum, Summer
from simulations.inprocess_grid import InProcessGrid, Tamper

#: The global adapter the sites' deltas apply to: one LoRA module and a head.
REFERENCE: AdapterState = {
    "layer.lora_A.weight": np.zeros((2, 3), np.float32),
    "layer.lora_B.weight": np.zeros((3, 2), np.float32),
    "head.bias": np.zeros(2, np.float32),
}
NODES = (11, 22, 33, 44, 55, 66)
EXAMPLES = 4


def site_delta(node: int) -> AdapterState:
    """Node ``node``'s delta: every value ``node / 100`` (norm below 1)."""
    return {k: np.full(v.shape, node / 100, np.float32) for k, v in REFERENCE.items()}


def mean_delta(nodes: tuple[int, ...]) -> AdapterState:
    """The equal-weight mean of the deltas of ``nodes``."""
    return {
        k: np.mean([site_delta(n)[k] for n in nodes], axis=0).astype(np.float32)
        for k in REFERENCE
    }


def site_app(
    delta: Callable[[int], AdapterState] = site_delta,
    examples: float = EXAMPLES,
    codec: Codec | None = None,
) -> ClientApp:
    """Sites that reply to every training message with ``delta(node)`` and
    ``examples`` examples, masked (``client.secagg``) or in the clear, encoded by
    ``codec`` (default fp32)."""
    encoder = codec or Float32Codec()
    app = ClientApp()

    @app.train()
    def train(message: Message, context: Context) -> Message:
        change = delta(context.node_id)
        instructions = message.content.config_records[keys.CONFIG_RECORD]
        metrics = MetricRecord({keys.NUM_EXAMPLES: examples})
        if keys.SECAGG_RECORD in message.content.config_records:
            masked, notes = secagg.masked_update(
                context,
                message.content.config_records[keys.SECAGG_RECORD],
                int(instructions[keys.CFG_ROUND]),  # type: ignore[arg-type]
                flatten(change),
                examples,
            )
            content = RecordDict(
                {
                    keys.MASKED_RECORD: masked,
                    keys.METRICS_RECORD: metrics,
                    keys.SECAGG_RECORD: notes,
                }
            )
        else:
            content = RecordDict(
                {
                    keys.ADAPTER_RECORD: to_array_record(encoder.encode(change)),
                    keys.METRICS_RECORD: metrics,
                }
            )
        return Message(content, reply_to=message)

    app.query(keys.ACTION_SECAGG_ADVERTISE)(secagg.advertise)
    app.query(keys.ACTION_SECAGG_SHARE)(secagg.share_keys)
    app.query(keys.ACTION_SECAGG_UNMASK)(secagg.unmask)
    return app


@dataclass
class SyntheticRun:
    """What a run over synthetic sites produced.

    Attributes
    ----------
    rows : list[dict]
        The metrics lines, round 0 first.
    states : list[AdapterState]
        The global adapter after each of them (what a checkpoint would hold).
    grid : InProcessGrid
        Every message sent and received.
    """

    rows: list[dict[str, Any]] = field(default_factory=list)
    states: list[AdapterState] = field(default_factory=list)
    grid: InProcessGrid | None = None

    def record(self, metrics: dict[str, Any], state: AdapterState) -> None:
        """The strategy's ``on_round``."""
        self.rows.append(metrics)
        self.states.append({k: v.copy() for k, v in state.items()})


def synthetic_config(**overrides: object) -> RunConfig:
    """Two rounds, every node sampled, a max-weight that gives each site weight
    ``EXAMPLES / 10``; ``overrides`` win."""
    return RunConfig.from_flat(
        {
            "num-server-rounds": 2,
            "secagg.max-weight": 10.0,
            "train.max-weight": 10.0,
            **overrides,
        }
    )


def default_summer(config: RunConfig) -> Summer:
    """The summer ``server.server_app`` would build for ``config`` (fp32 codec)."""
    if config.secagg.enabled:
        return SecureSum(config.secagg, config.seed)
    return PlainSum(
        build_codec(config.codec.name, config.codec.topk_fraction, config.seed),
        config.update_norm_bound,
        max_weight=config.train.max_weight,
    )


def synthetic_grid(
    nodes: tuple[int, ...] = NODES,
    tamper: Tamper | None = None,
    app: ClientApp | None = None,
) -> InProcessGrid:
    """An in-process grid of synthetic sites (``tamper`` may be set later, to a
    tamper that reads the sites' state from the grid)."""
    return InProcessGrid(app or site_app(), {n: {} for n in nodes}, tamper=tamper)


def run_synthetic(
    config: RunConfig,
    tamper: Tamper | None = None,
    grid: InProcessGrid | None = None,
    rule: AggregationRule | None = None,
    summer: Summer | None = None,
    initial: AdapterState | None = None,
) -> SyntheticRun:
    """Every round of ``config`` over ``grid`` (default: synthetic sites
    ``NODES``), with ``tamper`` rewriting the replies the coordinator receives,
    from ``initial`` (default ``REFERENCE``)."""
    outcome = SyntheticRun()
    grid = grid or synthetic_grid(tamper=tamper)
    outcome.grid = grid
    strategy = FederatedLoRA(
        config=config,
        backbone=BackboneOffer("synthetic", "0" * 64, "mean", None),
        labels=("a", "b"),
        summer=summer or default_summer(config),
        rule=rule or FedAvg(),
        evaluate=lambda state: EvalResult(0.0, 0.0, 0),
        on_round=outcome.record,
    )
    strategy.start(grid, dict(initial or REFERENCE))  # type: ignore[arg-type]
    return outcome


def replying_to(action: str) -> Callable[[Message], bool]:
    """Whether a reply answers a message of type ``action`` (``train``, or a
    secure-aggregation query's action)."""
    return lambda reply: reply.metadata.message_type.split(".")[-1] == action


def config_of(reply: Message, name: str = keys.SECAGG_RECORD) -> ConfigRecord:
    """The reply's config record ``name``."""
    return reply.content.config_records[name]


def assert_states_equal(
    got: Mapping[str, np.ndarray], want: Mapping[str, np.ndarray]
) -> None:
    """Tensor by tensor, to float32 rounding."""
    assert sorted(got) == sorted(want)
    for name in want:
        np.testing.assert_allclose(
            got[name], want[name], rtol=1e-5, atol=1e-6, err_msg=name
        )
