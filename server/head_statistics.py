"""The closed-form head's statistics round (``head.init = closed-form``), before round 0.

One statistics round, as data::

    every connected node -> (secure aggregation: key stages) -> send the initial
    global adapter as a head-statistics query -> each site sums its rows' pooled
    features by label (counts, class sums, the Gram matrix for lda and ridge) ->
    plain: check and add them; secure: unmask their sum only (64-bit fixed point
    sized so the sum cannot wrap) and check it -> solve the head
    (:mod:`common.closed_form`) -> the global adapter with that head

The statistics are sums over rows, so the head equals the one solved centrally on
the union of the sites' rows. A round that yields no usable sum leaves the initial
(label-name) head in place, with a warning.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Mapping, Sequence

import numpy as np
from flwr.app import ConfigRecord, Message, MessageType
from flwr.serverapp import Grid

from common import keys
from common.closed_form import (
    NEEDS_GRAM,
    ClassStatistics,
    head_tensors,
    solve_head,
    statistics_encoding,
)
from common.codec import AdapterState
from common.config import RunConfig
from common.secagg.encoding import HeadroomError
from common.wire import from_array_record
from server.secagg import SecureSum
from server.summation import RoundStats
from server.validation import RejectedUpdate, log_rejection

log = logging.getLogger(__name__)

STATISTICS_MESSAGE = f"{MessageType.QUERY}.{keys.ACTION_HEAD_STATISTICS}"
#: The round number the statistics round's secure key stages use (it runs before
#: round 0's evaluation; training rounds start at 1).
STATISTICS_ROUND = 0


class HeadStatistics:
    """Collects the sites' feature statistics and solves the head.

    Parameters
    ----------
    config : RunConfig
        ``head.closed-form``, its shrinkage, ``head.feature-clip`` and, behind
        secure aggregation, ``secagg.max-weight`` (the most rows a site may sum).
    num_labels : int
        The head's rows.
    summer : SecureSum, optional
        The secure sum (its own key stages); ``None`` for a plain round.
    """

    def __init__(
        self, config: RunConfig, num_labels: int, summer: SecureSum | None = None
    ) -> None:
        self.config = config
        self.num_labels = num_labels
        self.summer = summer
        self._cohort = 0

    @property
    def with_gram(self) -> bool:
        """Whether the variant reads the Gram matrix."""
        return self.config.head.closed_form in NEEDS_GRAM

    def prepare(
        self, grid: Grid, nodes: Sequence[int], stats: RoundStats
    ) -> dict[int, ConfigRecord | None]:
        """The nodes asked for statistics, each with what its message carries."""
        if self.summer is None:
            return {node: None for node in nodes}
        extras = self.summer.prepare(grid, nodes, STATISTICS_ROUND, stats)
        self._cohort = len(extras)
        return extras

    def collect(
        self,
        grid: Grid,
        replies: Sequence[Message],
        width: int,
        stats: RoundStats,
    ) -> ClassStatistics | None:
        """The summed statistics of the replying sites (features of ``width``), or
        ``None`` when no usable sum came."""
        if self.summer is None:
            return self._plain_sum(replies, width, stats)
        return self._secure_sum(grid, replies, width, stats)

    def head(self, statistics: ClassStatistics) -> AdapterState:
        """The head solved from ``statistics`` (float32 ``head.*`` tensors)."""
        head = self.config.head
        weight, bias = solve_head(
            statistics, head.closed_form, head.closed_form_shrinkage
        )
        return head_tensors(weight, bias)

    def fit(
        self, state: AdapterState, statistics: ClassStatistics | None
    ) -> AdapterState:
        """``state`` with the solved head, or unchanged (logged) without statistics
        or when they cannot be solved."""
        if statistics is None:
            log.warning(
                "closed-form head: no usable statistics; the initial head is kept"
            )
            return state
        try:
            solved = self.head(statistics)
        except (ValueError, np.linalg.LinAlgError) as error:
            log.warning("closed-form head: %s; the initial head is kept", error)
            return state
        log.info(
            "closed-form head (%s) solved from %d rows",
            self.config.head.closed_form,
            round(float(statistics.counts.sum())),
        )
        return dict(state) | solved

    # -- the two sums ------------------------------------------------------------------

    def _plain_sum(
        self, replies: Sequence[Message], width: int, stats: RoundStats
    ) -> ClassStatistics | None:
        parts = []
        for reply in replies:
            node = reply.metadata.src_node_id
            try:
                parts.append(self._checked(reply, width))
            # A crafted reply may make any step raise: it rejects this reply alone.
            except Exception as reason:  # noqa: BLE001
                log_rejection(node, reason)
                stats.rejected += 1
        return ClassStatistics.total(parts) if parts else None

    def _checked(self, reply: Message, width: int) -> ClassStatistics:
        """One site's statistics in the clear, checked for shapes, finiteness and
        what rows of norm at most ``head.feature-clip`` can give."""
        record = reply.content.array_records.get(keys.STATISTICS_RECORD)
        if record is None:
            raise RejectedUpdate(f"reply has no '{keys.STATISTICS_RECORD}' arrays")
        arrays = from_array_record(record)
        shapes: dict[str, tuple[int, ...]] = {
            "counts": (self.num_labels,),
            "sums": (self.num_labels, width),
        }
        if self.with_gram:
            shapes["gram"] = (width, width)
        if sorted(arrays) != sorted(shapes):
            raise RejectedUpdate(f"statistics must be exactly {sorted(shapes)}")
        for name, shape in shapes.items():
            if arrays[name].shape != shape or not np.isfinite(arrays[name]).all():
                raise RejectedUpdate(f"statistics '{name}' must be finite, {shape}")
        statistics = ClassStatistics(
            arrays["counts"].astype(np.float64),
            arrays["sums"].astype(np.float64),
            arrays["gram"].astype(np.float64) if self.with_gram else None,
        )
        problem = statistics.problem(1, self.config.head.feature_clip, math.inf, 0.0)
        if problem:
            raise RejectedUpdate(f"statistics: {problem}")
        return statistics

    def _secure_sum(
        self, grid: Grid, replies: Sequence[Message], width: int, stats: RoundStats
    ) -> ClassStatistics | None:
        assert self.summer is not None
        head = self.config.head
        max_rows = self.config.secagg.max_weight
        try:
            encoding = statistics_encoding(self._cohort, head.feature_clip, max_rows)
        except HeadroomError as error:
            log.warning("closed-form head: statistics round skipped: %s", error)
            return None
        length = ClassStatistics.vector_length(self.num_labels, width, self.with_gram)
        summed = self.summer.collect_fixed_point(grid, replies, length, encoding, stats)
        if summed is None:
            return None
        values, survivors = summed
        statistics = ClassStatistics.from_vector(
            values, self.num_labels, width, self.with_gram
        )
        problem = statistics.problem(
            len(survivors), head.feature_clip, max_rows, 1 / encoding.scale
        )
        if problem:
            log.warning(
                "closed-form head: the unmasked statistics of %d site(s) %s, which "
                "no honest upload can cause; the initial head is kept",
                len(survivors),
                problem,
            )
            return None
        return statistics


def feature_width(state: Mapping[str, np.ndarray]) -> int:
    """The pooled features' width: the head's input width."""
    return int(state["head.weight"].shape[1])
