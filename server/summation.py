"""The sum step of a round, kept apart so that a secure summer can replace it.

A summer sees the round twice: ``prepare`` before the training messages go out (a
secure summer runs its key stages there and returns what each client must receive) and
``collect`` with the replies (a plain summer validates and adds the deltas; a secure one
adds masked vectors and unmasks the total).
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Protocol

import numpy as np
from flwr.app import ConfigRecord, Message
from flwr.serverapp import Grid

from common.codec import AdapterState, Codec
from common.secagg.label_sums import LabelSums
from server.contribution import Contribution
from server.validation import contribution_from_reply, log_rejection


@dataclass
class RoundSum:
    """What a summer hands the aggregation rule.

    Attributes
    ----------
    total : AdapterState
        Sum over contributing clients of ``weight_i * delta_i`` (float32).
    weight : float
        Sum of the weights (example counts, or their secure-aggregation scaling).
    count : int
        Clients whose update is in ``total``.
    client_metrics : list[dict[str, float]]
        Training metrics of those clients.
    nodes : list[int]
        Their node ids.
    contributions : list[Contribution]
        The individual updates, for rules that need them; empty behind secure
        aggregation.
    reference : AdapterState
        The global tensors the updates are relative to (those shared this round).
    unclipped : float or None
        Adaptive clipping behind secure aggregation: the sum of the clients' centred
        bits ``1[||delta_i|| <= C] - 1/2`` (plus their noise shares in distributed
        DP).
    label_sums : LabelSums or None
        The per-label head sums (``fedavg-per-label`` behind secure aggregation);
        ``None`` elsewhere (a plain sum keeps each client's counts in
        ``contributions``).
    """

    total: AdapterState
    weight: float
    count: int
    client_metrics: list[dict[str, float]] = field(default_factory=list)
    nodes: list[int] = field(default_factory=list)
    contributions: list[Contribution] = field(default_factory=list)
    reference: AdapterState = field(default_factory=dict)
    unclipped: float | None = None
    label_sums: LabelSums | None = None


class RoundStats(Protocol):
    """The counters a summer updates (the strategy's round report)."""

    rejected: int
    failed: int


class Summer(Protocol):
    """Adds a round's updates."""

    def prepare(
        self, grid: Grid, nodes: Sequence[int], server_round: int, stats: RoundStats
    ) -> dict[int, ConfigRecord | None]:
        """Nodes that go on to training, each with what its training message must
        carry."""
        ...

    def collect(
        self,
        grid: Grid,
        replies: Sequence[Message],
        reference: Mapping[str, np.ndarray],
        stats: RoundStats,
    ) -> RoundSum | None:
        """The round's sum from the training replies, or ``None`` when it cannot be
        formed."""
        ...


class PlainSum:
    """Adds the clients' deltas in the clear (the coordinator sees each one).

    Parameters
    ----------
    codec : Codec
        Decodes each reply's arrays.
    max_norm : float
        Replies whose delta has a larger L2 norm are rejected; 0 turns the check off.
    flexible_rank : bool
        Accept LoRA factors of any rank up to the reference's (FlexLoRA); tensors
        whose shapes differ between clients are then left out of the total.
    max_weight : float
        Replies whose ``num-examples`` is above this are rejected
        (``train.max-weight``).
    """

    def __init__(
        self,
        codec: Codec,
        max_norm: float = 0.0,
        flexible_rank: bool = False,
        max_weight: float = math.inf,
    ) -> None:
        self.codec = codec
        self.max_norm = max_norm
        self.flexible_rank = flexible_rank
        self.max_weight = max_weight

    def prepare(
        self, grid: Grid, nodes: Sequence[int], server_round: int, stats: RoundStats
    ) -> dict[int, ConfigRecord | None]:
        """Every sampled node trains; nothing extra to send."""
        return {node: None for node in nodes}

    def collect(
        self,
        grid: Grid,
        replies: Sequence[Message],
        reference: Mapping[str, np.ndarray],
        stats: RoundStats,
    ) -> RoundSum | None:
        """Validate each reply and add ``weight * delta`` in float64."""
        contributions = []
        for reply in replies:
            try:
                contributions.append(
                    contribution_from_reply(
                        reply,
                        reference,
                        self.codec,
                        self.max_norm,
                        self.flexible_rank,
                        self.max_weight,
                    )
                )
            # Whatever a crafted reply makes the decoding raise (a list where a
            # number belongs, an array of another stype) rejects that reply alone.
            except Exception as reason:  # noqa: BLE001
                log_rejection(reply.metadata.src_node_id, reason)
                stats.rejected += 1
        if not contributions:
            return None
        total = {
            k: np.zeros(v.shape, np.float64)
            for k, v in reference.items()
            if all(c.change[k].shape == v.shape for c in contributions)
        }
        for contribution in contributions:
            for k in total:
                total[k] += contribution.weight * contribution.change[k].astype(
                    np.float64
                )
        with np.errstate(over="ignore"):  # beyond float32 is inf: not applied
            total32 = {k: v.astype(np.float32) for k, v in total.items()}
        return RoundSum(
            total=total32,
            weight=float(sum(c.weight for c in contributions)),
            count=len(contributions),
            client_metrics=[c.metrics for c in contributions],
            nodes=[c.node_id for c in contributions],
            contributions=contributions,
            reference=dict(reference),
        )
