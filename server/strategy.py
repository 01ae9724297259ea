"""The LoRA-aware federated strategy: the round loop of the coordinator.

One round, as data::

    sample nodes -> summer.prepare (secure aggregation's key stages) -> send global
    adapter + instructions -> (hand the backbone to sites that lack it) ->
    summer.collect (validate, sum or unmask the tensors this round's phase trains:
    the head alone, or adapters and head) -> (differential privacy: clip, noise,
    account) -> rule (mean) -> apply to the global adapter -> evaluate (the
    coordinator on its own rows and/or the sites on theirs, server.site_evaluation)
    -> one metrics line

The strategy composes a summer (plain or secure sum of the updates, with the codec
inside), an optional DP step (server.privacy) and an aggregation rule; none is
inherited, so each can be swapped without touching the loop. A client that errs, times
out or sends a bad reply is logged and left out of the round; it can never crash the
coordinator.
"""

from __future__ import annotations

import json
import logging
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol, runtime_checkable

import numpy as np
from flwr.app import ArrayRecord, ConfigRecord, Message, MessageType, RecordDict
from flwr.serverapp import Grid

from common import keys
from common.backbone import bundle_files
from common.codec import AdapterState, Codec, Float32Codec, apply_delta
from common.config import RuleTraits, RunConfig
from common.evaluation import EvalResult
from common.sharing import shared_subset
from common.wire import to_array_record
from server.head_statistics import STATISTICS_MESSAGE, HeadStatistics, feature_width
from server.messaging import send_and_receive
from server.privacy import BudgetExhausted, ClientLevelDP
from server.sampling import Cohort, CohortSampler, SeededSampler
from server.site_evaluation import SiteEvaluator, SitesEvaluation, empty_sites_metrics
from server.summation import RoundSum, Summer

log = logging.getLogger(__name__)

BACKBONE_MESSAGE = f"{MessageType.QUERY}.{keys.ACTION_BACKBONE}"
_NODE_POLL_SECONDS = 1.0
#: What the live count of a round's replies says the sites did.
_SITES_DONE = {
    MessageType.TRAIN: "trained",
    MessageType.EVALUATE: "evaluated",
    STATISTICS_MESSAGE: "sent their feature sums",
}
#: Personalised models (FedSA): the column of a site's evaluation row, the metrics
#: line's columns for the sites' mean and for the worst site, and how the worst is
#: picked (the lowest accuracy, the highest perplexity).
PERSONAL_METRICS: tuple[tuple[str, str, str, Callable[[list[float]], float]], ...] = (
    ("personal_accuracy", "personal_accuracy_mean", "personal_accuracy_min", min),
    (
        "personal_perplexity",
        "personal_perplexity_mean",
        "personal_perplexity_max",
        max,
    ),
)


class AggregationRule(Protocol):
    """Turns a round's contributions into one delta for the global adapter."""

    #: What the rule is (name, needs individual updates...), declared once in
    #: :data:`common.config.AGGREGATION_RULES`.
    traits: RuleTraits

    def aggregate(self, summed: RoundSum) -> AdapterState:
        """The delta to apply to the global adapter."""
        ...


@runtime_checkable
class StatefulRule(Protocol):
    """A rule with state that must survive a resume (a server optimiser)."""

    def state_arrays(self) -> AdapterState:
        """The state as named float32 arrays."""
        ...

    def load_state_arrays(self, arrays: Mapping[str, np.ndarray]) -> None:
        """Restore what :meth:`state_arrays` returned."""
        ...


def rule_state(rule: AggregationRule) -> AdapterState:
    """The rule's state for a checkpoint (empty for a stateless rule)."""
    return rule.state_arrays() if isinstance(rule, StatefulRule) else {}


def non_finite(state: Mapping[str, np.ndarray]) -> list[str]:
    """The names of the tensors of ``state`` that hold NaN or Inf."""
    return sorted(name for name, value in state.items() if not np.isfinite(value).all())


@dataclass
class RoundReport:
    """What happened in one round (becomes one line of ``metrics.jsonl``)."""

    server_round: int
    phase: str | None = None
    available: int = 0
    sampled: int = 0
    clients: int = 0
    client_metrics: list[dict[str, float]] = field(default_factory=list)
    participants: list[int] = field(default_factory=list)
    failed: int = 0
    rejected: int = 0
    bytes_up: int = 0
    bytes_down: int = 0
    bytes_backbone: int = 0
    privacy: dict[str, float] = field(default_factory=dict)
    #: False when the cohort was sampled in secret (client-level DP, fraction < 1):
    #: its members and size then stay out of the metrics line.
    cohort_public: bool = True
    #: The sites' evaluation columns (empty when the sites do not evaluate).
    sites: dict[str, Any] = field(default_factory=dict)

    def metrics(self, evaluation: EvalResult | None, seconds: float) -> dict[str, Any]:
        """The metrics line for ``metrics.jsonl``; ``evaluation`` is ``None`` in a
        round ``eval.every`` skips (its ``eval_*`` columns are then null)."""
        # Sites send no train loss behind secure aggregation or under DP.
        reporting = [m for m in self.client_metrics if keys.TRAIN_LOSS in m]
        losses = [m[keys.TRAIN_LOSS] for m in reporting]
        weights = [m.get(keys.NUM_EXAMPLES, 1.0) for m in reporting]
        train_loss = float(np.average(losses, weights=weights)) if losses else None
        personal_metrics: dict[str, float] = {}
        site_rows = self.sites.get("sites_eval_rows", [])
        for key, mean_column, worst_column, worst in PERSONAL_METRICS:
            values = [row[key] for row in site_rows if key in row]
            if values:
                personal_metrics[mean_column] = float(np.mean(values))
                personal_metrics[worst_column] = float(worst(values))
        # dp.level = sample: each site's own DP-SGD epsilon; the worst one counts.
        site_epsilons = [
            m[keys.SAMPLE_EPSILON]
            for m in self.client_metrics
            if keys.SAMPLE_EPSILON in m
        ]
        extras = personal_metrics | self.privacy | self.sites
        if site_epsilons:
            extras["sample_epsilon_max"] = float(max(site_epsilons))
        public = self.cohort_public
        return (
            {
                "round": self.server_round,
                "phase": self.phase,
                "sampled": self.sampled if public else None,
                "clients": self.clients if public else None,
                # Node ids as text: they are uint64 and JSON readers often use doubles.
                "participants": (
                    [str(node) for node in self.participants] if public else None
                ),
                "failed": self.failed,
                "rejected": self.rejected,
                "train_loss": train_loss,
                "train_samples": int(
                    sum(m.get(keys.TRAIN_SAMPLES, 0) for m in self.client_metrics)
                ),
                "clients_on_cuda": int(
                    sum(m.get(keys.ON_CUDA, 0) for m in self.client_metrics)
                ),
                "eval_loss": evaluation.loss if evaluation else None,
                "eval_accuracy": evaluation.accuracy if evaluation else None,
                "bytes_up": self.bytes_up,
                "bytes_down": self.bytes_down,
                "bytes_backbone": self.bytes_backbone,
                "seconds": round(seconds, 3),
            }
            | extras
            | _perplexity(evaluation)
        )


def _perplexity(evaluation: EvalResult | None) -> dict[str, float]:
    """``eval_perplexity`` for a causal language model (lower is better); nothing
    for a classifier or an unevaluated round."""
    if evaluation is None or evaluation.perplexity is None:
        return {}
    return {"eval_perplexity": evaluation.perplexity}


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
    summer : Summer
        Validates and adds the updates (plain or secure).
    rule : AggregationRule
        Combines the contributions of a round.
    evaluate : Callable[[AdapterState], EvalResult] or None
        The coordinator's evaluation of a global adapter; ``None`` when it holds no
        evaluation rows (``eval.where = sites``).
    on_round : Callable[[dict, AdapterState], None]
        Called after every round with its metrics line and the new global adapter.
    downlink : Callable[[int], Codec]
        The codec that encodes the global adapter sent in a round (seeded by the
        round, so a resumed run sends what an uninterrupted one would).
    privacy : ClientLevelDP, optional
        Client-level DP between the sum and the rule (``dp.enabled``).
    sampler : CohortSampler, optional
        Picks each round's cohort; by default :class:`server.sampling.SeededSampler`
        from the run's seed and ``train.fraction``.
    run_identity : str, optional
        The run's identity, the same after a resume (the sites key the state they
        keep by it).
    sites : SiteEvaluator, optional
        The sites' evaluation of the global model (``eval.where = sites | both``).
    head_statistics : HeadStatistics, optional
        ``head.init = closed-form``: a fresh run first asks the sites for their
        feature statistics and solves the head (its traffic counts in round 0).

    Attributes
    ----------
    stop_reason : str or None
        Why the run stopped before ``num-server-rounds`` (the privacy budget).
    """

    def __init__(
        self,
        config: RunConfig,
        backbone: BackboneOffer,
        labels: tuple[str, ...],
        summer: Summer,
        rule: AggregationRule,
        evaluate: Callable[[AdapterState], EvalResult] | None,
        on_round: Callable[[dict[str, Any], AdapterState], None],
        downlink: Callable[[int], Codec] | None = None,
        privacy: ClientLevelDP | None = None,
        sampler: CohortSampler | None = None,
        run_identity: str = "",
        sites: SiteEvaluator | None = None,
        head_statistics: HeadStatistics | None = None,
    ) -> None:
        self.config = config
        self.backbone = backbone
        self.labels = labels
        self.summer = summer
        self.rule = rule
        self.evaluate = evaluate
        self.on_round = on_round
        self.downlink = downlink or (lambda server_round: Float32Codec())
        self.privacy = privacy
        self.sampler = sampler or SeededSampler(
            config.seed, config.train.fraction, config.train.min_clients
        )
        self.run_identity = run_identity
        self.sites = sites
        self.head_statistics = head_statistics
        self.stop_reason: str | None = None
        self._bundle: ArrayRecord | None = None

    # -- the run -----------------------------------------------------------------------

    def start(
        self, grid: Grid, initial: AdapterState, completed_rounds: int = 0
    ) -> AdapterState:
        """Run the rounds after ``completed_rounds``; a fresh run (0) first evaluates
        the initial adapter as round 0. A round the privacy budget cannot afford
        ends the run before it starts (see :attr:`stop_reason`).

        Returns
        -------
        AdapterState
            The final global adapter.
        """
        state = initial
        if completed_rounds == 0:
            started = time.perf_counter()
            first = RoundReport(0)
            if self.head_statistics is not None:
                state = self.fit_head(grid, self.head_statistics, state, first)
            if self.privacy is not None:
                first.privacy = self.privacy.metrics()
            evaluation = self.evaluate_round(grid, 0, state, first)
            self.on_round(
                first.metrics(evaluation, time.perf_counter() - started), state
            )
        for server_round in range(
            completed_rounds + 1, self.config.num_server_rounds + 1
        ):
            started = time.perf_counter()
            report = RoundReport(server_round)
            try:
                state = self.run_round(grid, server_round, state, report)
            except BudgetExhausted as reason:
                self.stop_reason = f"stopped before round {server_round}: {reason}"
                log.warning("%s", self.stop_reason)
                break
            evaluation = self.evaluate_round(grid, server_round, state, report)
            self.on_round(
                report.metrics(evaluation, time.perf_counter() - started), state
            )
        return state

    def fit_head(
        self,
        grid: Grid,
        head_statistics: HeadStatistics,
        state: AdapterState,
        report: RoundReport,
    ) -> AdapterState:
        """Ask every connected node for its feature statistics under ``state`` and
        return ``state`` with the head solved from their sum (unchanged when no
        usable sum comes)."""
        nodes = self.wait_for_nodes(grid, self.config.train.min_clients)
        extras = head_statistics.prepare(grid, nodes, report)
        replies = self.deliver(grid, extras, 0, state, report, STATISTICS_MESSAGE)
        statistics = head_statistics.collect(
            grid, self.usable(replies, report), feature_width(state), report
        )
        return head_statistics.fit(state, statistics)

    def evaluates(self, server_round: int) -> bool:
        """Whether the global model is evaluated after ``server_round``: before the
        first, every ``eval.every`` rounds and after the last."""
        return (
            server_round % self.config.eval_every == 0
            or server_round == self.config.num_server_rounds
        )

    def evaluate_round(
        self, grid: Grid, server_round: int, state: AdapterState, report: RoundReport
    ) -> EvalResult | None:
        """Evaluate ``state`` where ``eval.where`` says: the coordinator's figures
        when it evaluates, else the sites'; ``None`` in a round ``eval.every``
        skips. The sites' columns go into ``report``."""
        if self.sites is not None:
            report.sites = empty_sites_metrics()
        if not self.evaluates(server_round):
            return None
        at_sites = (
            self.evaluate_at_sites(self.sites, grid, server_round, state, report)
            if self.sites is not None
            else None
        )
        if at_sites is not None:
            report.sites = at_sites.metrics()
        if self.evaluate is not None:
            return self.evaluate(state)
        return at_sites.result() if at_sites is not None else None

    def evaluate_at_sites(
        self,
        sites: SiteEvaluator,
        grid: Grid,
        server_round: int,
        state: AdapterState,
        report: RoundReport,
    ) -> SitesEvaluation | None:
        """Send the global adapter to the sites ``sites`` samples as an evaluate
        message and add their totals (the traffic counts in ``report``'s bytes)."""
        stats = RoundReport(server_round)
        available = self.wait_for_nodes(grid, self.config.eval_min_clients)
        nodes = sites.sample(available, server_round)
        extras = sites.prepare(grid, nodes, server_round, stats)
        replies = self.deliver(
            grid, extras, server_round, state, stats, MessageType.EVALUATE
        )
        evaluation = sites.collect(grid, self.usable(replies, stats), stats)
        report.bytes_up += stats.bytes_up
        report.bytes_down += stats.bytes_down
        report.bytes_backbone += stats.bytes_backbone
        return evaluation

    def run_round(
        self, grid: Grid, server_round: int, state: AdapterState, report: RoundReport
    ) -> AdapterState:
        """One round: configure, train, aggregate. Returns the new global adapter.

        Raises
        ------
        BudgetExhausted
            Before anything is sent, when the round would overspend ``dp.*``.
        """
        cohort = self.configure_train(grid, server_round, report)
        nodes = cohort.nodes
        if self.privacy is not None:
            self.privacy.begin_round(cohort)
        if len(nodes) < self.config.train.min_clients:
            # A Poisson sample can come out short. Under DP the round is charged
            # all the same: whether it ran depends on the sample.
            if self.privacy is not None:
                self.privacy.release(None, report)
            log.warning(
                "round %d skipped: %d node(s) sampled, train.min-clients = %d",
                server_round,
                len(nodes),
                self.config.train.min_clients,
            )
            return state
        extras = self.summer.prepare(grid, nodes, server_round, report)
        if self.privacy is not None:
            self.privacy.expect_shares(len(extras))
        replies = self.deliver(
            grid, extras, server_round, state, report, MessageType.TRAIN
        )
        # Replies carry exactly the tensors this round's phase and rule share.
        report.phase = self.config.train.phase(server_round)
        shared = shared_subset(state, report.phase, self.config.aggregation.rule)
        summed = self.summer.collect(grid, self.usable(replies, report), shared, report)
        if self.privacy is not None:
            summed = self.privacy.release(summed, report)
        if summed is not None:
            report.clients, report.client_metrics = summed.count, summed.client_metrics
            report.participants = summed.nodes
        if summed is None or summed.count < self.config.train.min_clients:
            log.warning(
                "round %d skipped: %d client(s) replied usefully, "
                "train.min-clients = %d",
                server_round,
                report.clients,
                self.config.train.min_clients,
            )
            return state
        return self.aggregate_train(summed, state)

    # -- the steps ---------------------------------------------------------------------

    def configure_train(
        self, grid: Grid, server_round: int, report: RoundReport
    ) -> Cohort:
        """Wait for enough nodes, then sample the round's cohort (counted in
        ``report.available`` and ``report.sampled``).

        The sample is a pure function of the sampler's seed or key, the round and
        the node ids, so a resumed run samples exactly as an uninterrupted one.
        """
        needed = self.config.train.min_clients
        nodes = self.wait_for_nodes(grid, needed)
        cohort = self.sampler.sample(nodes, server_round)
        report.available, report.sampled = cohort.available, len(cohort.nodes)
        report.cohort_public = cohort.public
        return cohort

    def wait_for_nodes(self, grid: Grid, needed: int) -> list[int]:
        """The connected nodes, sorted, once ``needed`` are (or ``train.timeout``
        has passed)."""
        deadline = time.monotonic() + self.config.train.timeout
        nodes = sorted(grid.get_node_ids())
        while len(nodes) < needed and time.monotonic() < deadline:
            time.sleep(_NODE_POLL_SECONDS)
            nodes = sorted(grid.get_node_ids())
        return nodes

    def instructions(self, server_round: int, expected_clients: int) -> ConfigRecord:
        """The round's instructions: backbone identity, label map, run config,
        ``m``, the clients sent it (each adds 1/m of the noise in distributed DP),
        and with client-level DP the round's clip norm and noise."""
        return ConfigRecord(
            {
                keys.CFG_BACKBONE_REF: self.backbone.reference,
                keys.CFG_BACKBONE_FINGERPRINT: self.backbone.fingerprint,
                keys.CFG_POOLING: self.backbone.pooling,
                keys.CFG_LABELS: json.dumps(list(self.labels)),
                keys.CFG_RUN_CONFIG: json.dumps(dict(self.config.flat)),
                keys.CFG_ROUND: server_round,
                keys.CFG_EXPECTED_CLIENTS: expected_clients,
                keys.CFG_RUN_IDENTITY: self.run_identity,
                keys.CFG_SITES_EVALUATE: self.sites is not None,
                **(self.privacy.instructions() if self.privacy is not None else {}),
            }
        )

    def deliver(
        self,
        grid: Grid,
        extras: Mapping[int, ConfigRecord | None],
        server_round: int,
        state: AdapterState,
        report: RoundReport,
        message_type: str,
    ) -> list[Message]:
        """Send the global adapter to the nodes of ``extras`` (with what the summer
        adds for each) as ``message_type`` (train or evaluate); hand the backbone to
        sites that ask for it.

        Returns the replies that carry a result or an error (status answers are
        consumed here).
        """
        adapter = to_array_record(self.downlink(server_round).encode(state))
        # m: the nodes sent this message (after secure aggregation's key stages
        # the cohort a site can see), each adding 1/m of distributed DP's noise.
        instructions = self.instructions(server_round, len(extras))
        replies = self._send(grid, extras, adapter, instructions, report, message_type)
        needing = [
            r.metadata.src_node_id
            for r in replies
            if self._status(r) == keys.STATUS_NEEDS_BACKBONE
        ]
        if needing:
            stored = self.distribute_backbone(grid, needing, report)
            if stored:
                replies += self._send(
                    grid,
                    {n: extras[n] for n in stored},
                    adapter,
                    instructions,
                    report,
                    message_type,
                )
        return [r for r in replies if self._status(r) is None]

    def distribute_backbone(
        self, grid: Grid, nodes: Sequence[int], report: RoundReport
    ) -> list[int]:
        """Send the backbone files once to each site in ``nodes``.

        Returns the nodes that confirmed a verified copy.
        """
        if self._bundle is None:
            self._bundle = to_array_record(bundle_files(self.backbone.directory))
        log.info(
            "sending the backbone (%.1f MB) to %d site(s)",
            self._bundle.count_bytes() / 1e6,
            len(nodes),
        )
        config = ConfigRecord(
            {keys.CFG_BACKBONE_FINGERPRINT: self.backbone.fingerprint}
        )
        messages = [
            Message(
                RecordDict(
                    {keys.BACKBONE_RECORD: self._bundle, keys.CONFIG_RECORD: config}
                ),
                node,
                BACKBONE_MESSAGE,
            )
            for node in nodes
        ]
        report.bytes_backbone += self._bundle.count_bytes() * len(messages)
        stored = []
        for reply in send_and_receive(
            grid, messages, self.config.train.timeout, "backbone sent to sites"
        ):
            if reply.has_error():
                log.warning(
                    "node %d could not store the backbone: %s",
                    reply.metadata.src_node_id,
                    reply.error.reason,
                )
            elif self._status(reply) == keys.STATUS_BACKBONE_STORED:
                stored.append(reply.metadata.src_node_id)
        report.failed += len(nodes) - len(stored)
        return stored

    def usable(self, replies: Iterable[Message], report: RoundReport) -> list[Message]:
        """Replies without an error; errors are logged with the node and counted."""
        usable = []
        for reply in replies:
            if reply.has_error():
                reason = (reply.error.reason or "no reason").strip().splitlines()
                log.warning(
                    "node %d failed: %s",
                    reply.metadata.src_node_id,
                    reason[-1] if reason else "no reason",
                )
                report.failed += 1
                continue
            report.bytes_up += sum(
                record.count_bytes() for record in reply.content.array_records.values()
            )
            usable.append(reply)
        return usable

    def aggregate_train(self, summed: RoundSum, state: AdapterState) -> AdapterState:
        """Combine the round's sum with the rule and apply the result.

        A sum the rule refuses, or a new global adapter that is not finite, skips the
        round: the last good global adapter (and a server optimiser's state) is kept,
        so nothing non-finite is ever checkpointed.
        """
        before = rule_state(self.rule)
        try:
            updated = apply_delta(state, self.rule.aggregate(summed))
        except ValueError as error:
            log.warning("round skipped: the rule refused the round's sum: %s", error)
            updated = None
        broken = [] if updated is None else non_finite(updated)
        if updated is not None and not broken:
            return updated
        if broken:
            log.warning(
                "round skipped: the aggregate holds NaN or Inf in %s; the last good "
                "global adapter is kept",
                ", ".join(broken[:3]) + (" ..." if len(broken) > 3 else ""),
            )
        if isinstance(self.rule, StatefulRule):
            self.rule.load_state_arrays(before)
        return state

    # -- helpers -----------------------------------------------------------------------

    def _send(
        self,
        grid: Grid,
        extras: Mapping[int, ConfigRecord | None],
        adapter: ArrayRecord,
        instructions: ConfigRecord,
        report: RoundReport,
        message_type: str,
    ) -> list[Message]:
        messages = []
        for node, extra in extras.items():
            content = RecordDict(
                {keys.ADAPTER_RECORD: adapter, keys.CONFIG_RECORD: instructions}
            )
            if extra is not None:
                content[keys.SECAGG_RECORD] = extra
            messages.append(Message(content, node, message_type))
        report.bytes_down += adapter.count_bytes() * len(messages)
        replies = send_and_receive(
            grid,
            messages,
            self.config.train.timeout,
            f"round {instructions[keys.CFG_ROUND]}: sites "
            + _SITES_DONE.get(message_type, "replied"),
        )
        missing = set(extras) - {r.metadata.src_node_id for r in replies}
        report.failed += len(missing)
        for node in sorted(missing):
            log.warning(
                "node %d did not reply within train.timeout = %.0fs",
                node,
                self.config.train.timeout,
            )
        return replies

    @staticmethod
    def _status(reply: Message) -> str | None:
        if reply.has_error() or keys.STATUS_RECORD not in reply.content.config_records:
            return None
        return str(
            reply.content.config_records[keys.STATUS_RECORD].get(keys.STATUS_KIND, "")
        )
