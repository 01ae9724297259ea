"""The LoRA-aware federated strategy: the round loop of the coordinator.

One round, as data::

    sample nodes -> send global adapter + instructions -> (hand the backbone to
    sites that lack it) -> validate replies -> sum -> mean -> apply to the global
    adapter -> evaluate -> one metrics line

The strategy composes a codec (wire format of deltas) and an aggregation rule (which
holds a replaceable summer); neither is inherited, so each can be swapped without
touching the loop. A client that errs, times out or sends a bad reply is logged and
left out of the round; it can never crash the coordinator.
"""

from __future__ import annotations

import json
import logging
import math
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol

import numpy as np
from flwr.app import ArrayRecord, ConfigRecord, Message, MessageType, RecordDict
from flwr.serverapp import Grid

from common import keys
from common.backbone import bundle_files
from common.codec import Codec, apply_delta
from common.config import RunConfig
from common.evaluation import EvalResult
from common.model import AdapterState
from common.wire import to_array_record
from server.contribution import Contribution
from server.validation import RejectedUpdate, contribution_from_reply

log = logging.getLogger(__name__)

BACKBONE_MESSAGE = f"{MessageType.QUERY}.{keys.ACTION_BACKBONE}"
_NODE_POLL_SECONDS = 1.0


class AggregationRule(Protocol):
    """Turns a round's contributions into one delta for the global adapter."""

    name: str

    def aggregate(self, contributions: Sequence[Contribution]) -> AdapterState:
        """The delta to apply to the global adapter."""
        ...


@dataclass
class RoundReport:
    """What happened in one round (becomes one line of ``metrics.jsonl``)."""

    server_round: int
    sampled: int = 0
    contributions: list[Contribution] = field(default_factory=list)
    failed: int = 0
    rejected: int = 0
    bytes_up: int = 0
    bytes_down: int = 0
    bytes_backbone: int = 0

    def metrics(self, evaluation: EvalResult, seconds: float) -> dict[str, Any]:
        """The metrics line for ``metrics.jsonl``."""
        weights = [c.weight for c in self.contributions]
        losses = [c.metrics.get(keys.TRAIN_LOSS, math.nan) for c in self.contributions]
        train_loss = float(np.average(losses, weights=weights)) if weights else None
        return {
            "round": self.server_round,
            "sampled": self.sampled,
            "clients": len(self.contributions),
            "failed": self.failed,
            "rejected": self.rejected,
            "train_loss": train_loss,
            "train_samples": int(sum(c.metrics.get(keys.TRAIN_SAMPLES, 0) for c in self.contributions)),
            "clients_on_cuda": int(sum(c.metrics.get(keys.ON_CUDA, 0) for c in self.contributions)),
            "eval_loss": evaluation.loss,
            "eval_accuracy": evaluation.accuracy,
            "bytes_up": self.bytes_up,
            "bytes_down": self.bytes_down,
            "bytes_backbone": self.bytes_backbone,
            "seconds": round(seconds, 3),
        }


@dataclass(frozen=True)
class BackboneOffer:
    """What the coordinator tells clients about the backbone."""

    reference: str
    fingerprint: str
    pooling: str
    directory: Any  # pathlib.Path of the coordinator's copy (sent only on request)


class FederatedLoRA:
    """Coordinates rounds of LoRA fine-tuning over a Flower :class:`Grid`.

    Parameters
    ----------
    config : RunConfig
        The validated run configuration.
    backbone : BackboneOffer
        Reference, fingerprint and pooling the clients must use.
    labels : tuple[str, ...]
        The label map every client encodes its rows with.
    codec : Codec
        Wire format of the deltas.
    rule : AggregationRule
        Combines the contributions of a round.
    evaluate : Callable[[AdapterState], EvalResult]
        The coordinator's evaluation of a global adapter.
    on_round : Callable[[dict, AdapterState], None]
        Called after every round with its metrics line and the new global adapter.
    """

    def __init__(
        self,
        config: RunConfig,
        backbone: BackboneOffer,
        labels: tuple[str, ...],
        codec: Codec,
        rule: AggregationRule,
        evaluate: Callable[[AdapterState], EvalResult],
        on_round: Callable[[dict[str, Any], AdapterState], None],
    ) -> None:
        self.config = config
        self.backbone = backbone
        self.labels = labels
        self.codec = codec
        self.rule = rule
        self.evaluate = evaluate
        self.on_round = on_round
        self._rng = np.random.default_rng(config.seed)
        self._bundle: ArrayRecord | None = None

    # -- the run ------------------------------------------------------------------------

    def start(self, grid: Grid, initial: AdapterState) -> AdapterState:
        """Evaluate the initial adapter as round 0, then run every round.

        Returns
        -------
        AdapterState
            The final global adapter.
        """
        state = initial
        started = time.perf_counter()
        self.on_round(RoundReport(0).metrics(self.evaluate(state), time.perf_counter() - started), state)
        for server_round in range(1, self.config.num_server_rounds + 1):
            started = time.perf_counter()
            report = RoundReport(server_round)
            state = self.run_round(grid, server_round, state, report)
            self.on_round(report.metrics(self.evaluate(state), time.perf_counter() - started), state)
        return state

    def run_round(self, grid: Grid, server_round: int, state: AdapterState, report: RoundReport) -> AdapterState:
        """One round: configure, train, aggregate. Returns the new global adapter."""
        nodes = self.configure_train(grid)
        report.sampled = len(nodes)
        replies = self.train(grid, nodes, server_round, state, report)
        contributions = self.collect(replies, state, report)
        if len(contributions) < self.config.train.min_clients:
            log.warning(
                "round %d skipped: %d client(s) replied usefully, train.min-clients = %d",
                server_round, len(contributions), self.config.train.min_clients,
            )
            return state
        return self.aggregate_train(contributions, state)

    # -- the steps ----------------------------------------------------------------------

    def configure_train(self, grid: Grid) -> list[int]:
        """Wait for enough nodes, then sample ``train.fraction`` of them (seeded)."""
        needed = self.config.train.min_clients
        deadline = time.monotonic() + self.config.train.timeout
        nodes = sorted(grid.get_node_ids())
        while len(nodes) < needed and time.monotonic() < deadline:
            time.sleep(_NODE_POLL_SECONDS)
            nodes = sorted(grid.get_node_ids())
        count = min(len(nodes), max(needed, math.ceil(self.config.train.fraction * len(nodes))))
        # Sample positions, not ids: node ids are uint64 and numpy would turn them to floats.
        chosen = self._rng.choice(len(nodes), size=count, replace=False)
        return [nodes[int(position)] for position in sorted(chosen)]

    def instructions(self, server_round: int) -> ConfigRecord:
        """The round's instructions: backbone identity, label map and run config."""
        return ConfigRecord(
            {
                keys.CFG_BACKBONE_REF: self.backbone.reference,
                keys.CFG_BACKBONE_FINGERPRINT: self.backbone.fingerprint,
                keys.CFG_POOLING: self.backbone.pooling,
                keys.CFG_LABELS: json.dumps(list(self.labels)),
                keys.CFG_RUN_CONFIG: json.dumps(dict(self.config.flat)),
                keys.CFG_ROUND: server_round,
            }
        )

    def train(
        self, grid: Grid, nodes: Sequence[int], server_round: int, state: AdapterState, report: RoundReport
    ) -> list[Message]:
        """Send the global adapter to ``nodes``; hand the backbone to sites that ask.

        Returns the replies that carry a result or an error (status answers are
        consumed here).
        """
        adapter = to_array_record(state)
        replies = self._send(grid, nodes, MessageType.TRAIN, adapter, self.instructions(server_round), report)
        needing = [r.metadata.src_node_id for r in replies if self._status(r) == keys.STATUS_NEEDS_BACKBONE]
        if needing:
            stored = self.distribute_backbone(grid, needing, report)
            if stored:
                replies += self._send(grid, stored, MessageType.TRAIN, adapter, self.instructions(server_round), report)
        return [r for r in replies if self._status(r) is None]

    def distribute_backbone(self, grid: Grid, nodes: Sequence[int], report: RoundReport) -> list[int]:
        """Send the backbone files once to each site in ``nodes``.

        Returns the nodes that confirmed a verified copy.
        """
        if self._bundle is None:
            self._bundle = to_array_record(bundle_files(self.backbone.directory))
        log.info("sending the backbone (%.1f MB) to %d site(s)", self._bundle.count_bytes() / 1e6, len(nodes))
        config = ConfigRecord({keys.CFG_BACKBONE_FINGERPRINT: self.backbone.fingerprint})
        messages = [
            Message(RecordDict({keys.BACKBONE_RECORD: self._bundle, keys.CONFIG_RECORD: config}), node, BACKBONE_MESSAGE)
            for node in nodes
        ]
        report.bytes_backbone += self._bundle.count_bytes() * len(messages)
        stored = []
        for reply in grid.send_and_receive(messages, timeout=self.config.train.timeout):
            if reply.has_error():
                log.warning("node %d could not store the backbone: %s", reply.metadata.src_node_id, reply.error.reason)
            elif self._status(reply) == keys.STATUS_BACKBONE_STORED:
                stored.append(reply.metadata.src_node_id)
        report.failed += len(nodes) - len(stored)
        return stored

    def collect(self, replies: Iterable[Message], state: AdapterState, report: RoundReport) -> list[Contribution]:
        """Validate every reply; log and drop errors and bad updates."""
        for reply in replies:
            node = reply.metadata.src_node_id
            if reply.has_error():
                log.warning("node %d failed: %s", node, (reply.error.reason or "").strip().splitlines()[-1:] or "no reason")
                report.failed += 1
                continue
            report.bytes_up += self._adapter_bytes(reply)
            try:
                report.contributions.append(contribution_from_reply(reply, state, self.codec))
            except RejectedUpdate as reason:
                log.warning("node %d: update rejected: %s", node, reason)
                report.rejected += 1
        return report.contributions

    def aggregate_train(self, contributions: Sequence[Contribution], state: AdapterState) -> AdapterState:
        """Combine the contributions with the rule and apply the result."""
        return apply_delta(state, self.rule.aggregate(contributions))

    # -- helpers ------------------------------------------------------------------------

    def _send(
        self,
        grid: Grid,
        nodes: Sequence[int],
        message_type: str,
        adapter: ArrayRecord,
        instructions: ConfigRecord,
        report: RoundReport,
    ) -> list[Message]:
        messages = [
            Message(RecordDict({keys.ADAPTER_RECORD: adapter, keys.CONFIG_RECORD: instructions}), node, message_type)
            for node in nodes
        ]
        report.bytes_down += adapter.count_bytes() * len(messages)
        replies = list(grid.send_and_receive(messages, timeout=self.config.train.timeout))
        missing = set(nodes) - {r.metadata.src_node_id for r in replies}
        report.failed += len(missing)
        for node in sorted(missing):
            log.warning("node %d did not reply within train.timeout = %.0fs", node, self.config.train.timeout)
        return replies

    @staticmethod
    def _status(reply: Message) -> str | None:
        if reply.has_error() or keys.STATUS_RECORD not in reply.content.config_records:
            return None
        return str(reply.content.config_records[keys.STATUS_RECORD].get(keys.STATUS_KIND, ""))

    @staticmethod
    def _adapter_bytes(reply: Message) -> int:
        records = reply.content.array_records
        return records[keys.ADAPTER_RECORD].count_bytes() if keys.ADAPTER_RECORD in records else 0
