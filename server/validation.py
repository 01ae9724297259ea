"""Checking a client's reply before it may touch the global adapter."""

from __future__ import annotations

import logging
import math
from collections.abc import Mapping

import numpy as np
from flwr.app import Message

from common import keys
from common.codec import Codec, CodecError, l2_norm
from common.sharing import LORA_A, LORA_B
from common.wire import from_array_record
from server.contribution import Contribution

log = logging.getLogger(__name__)


class RejectedUpdate(ValueError):
    """A reply that must not be aggregated; the message says why."""


def log_rejection(node: int, reason: Exception) -> None:
    """One warning line naming the node and the reason (with the exception's type
    when it is not one of the checks' own)."""
    if not isinstance(reason, RejectedUpdate):
        reason = RejectedUpdate(f"malformed reply ({type(reason).__name__}: {reason})")
    log.warning("node %d: update rejected: %s", node, reason)


def contribution_from_reply(
    reply: Message,
    reference: Mapping[str, np.ndarray],
    codec: Codec,
    max_norm: float = 0.0,
    flexible_rank: bool = False,
    max_weight: float = math.inf,
) -> Contribution:
    """Decode and validate one training reply.

    Checks that the reply carries the adapter and metrics records, finite scalar
    metrics, a ``num-examples`` in ``[1, max_weight]``, exactly the expected tensor
    names, their shapes and dtype, only finite values, and (when ``max_norm`` > 0) an
    L2 norm of at most ``max_norm``. With ``flexible_rank`` the LoRA factors may have
    any one rank from 1 up to the reference's (FlexLoRA).

    Raises
    ------
    RejectedUpdate
        Naming the first problem found. Any other exception while decoding means a
        malformed reply too: callers reject the reply on any exception.
    """
    content = reply.content
    if keys.ADAPTER_RECORD not in content.array_records:
        raise RejectedUpdate(f"reply has no '{keys.ADAPTER_RECORD}' arrays")
    if keys.METRICS_RECORD not in content.metric_records:
        raise RejectedUpdate(f"reply has no '{keys.METRICS_RECORD}' metrics")
    metrics = reply_metrics(reply)
    weight = metrics.get(keys.NUM_EXAMPLES, 0.0)
    if not (math.isfinite(weight) and 1 <= weight <= max_weight):
        raise RejectedUpdate(
            f"'{keys.NUM_EXAMPLES}' must be a count in [1, train.max-weight = "
            f"{max_weight:g}], got {weight:g}"
        )
    arrays = from_array_record(content.array_records[keys.ADAPTER_RECORD])
    if flexible_rank:
        rank = _common_rank(arrays, reference)
        reference = {
            name: np.empty(_expected_shape(name, value.shape, rank), np.float32)
            for name, value in reference.items()
        }
    try:
        change = codec.decode(arrays, reference)
    except CodecError as error:
        raise RejectedUpdate(str(error)) from None
    for name, value in change.items():
        if not np.isfinite(value).all():
            raise RejectedUpdate(f"'{name}' holds NaN or Inf")
    norm = l2_norm(change)
    if max_norm > 0 and norm > max_norm:
        raise RejectedUpdate(
            f"update norm {norm:.4g} is above train.max-update-norm = {max_norm:g}"
        )
    return Contribution(
        reply.metadata.src_node_id,
        change,
        weight,
        metrics,
        _label_counts(reply, reference, weight),
    )


def reply_metrics(reply: Message) -> dict[str, float]:
    """A reply's training metrics as floats (empty when absent).

    Raises
    ------
    RejectedUpdate
        When a metric is not one finite number (a list, NaN or Inf), naming it: it
        would otherwise reach the metrics line.
    """
    records = reply.content.metric_records
    if keys.METRICS_RECORD not in records:
        return {}
    metrics = {}
    for key, value in records[keys.METRICS_RECORD].items():
        if isinstance(value, list) or not math.isfinite(value):
            raise RejectedUpdate(f"metric '{key}' must be one finite number")
        metrics[key] = float(value)
    return metrics


def _common_rank(
    arrays: Mapping[str, np.ndarray], reference: Mapping[str, np.ndarray]
) -> int | None:
    """The one rank of the reply's LoRA factors (sent densely: FlexLoRA refuses
    top-k), at most the reference's."""
    ranks = {
        arrays[name].shape[0] if arrays[name].ndim else 0
        for name in arrays
        if LORA_A in name and "#" not in name
    }
    if not ranks:
        return None
    limit = max(reference[name].shape[0] for name in reference if LORA_A in name)
    rank = ranks.pop()
    if ranks or not 1 <= rank <= limit:
        raise RejectedUpdate(
            f"LoRA factors must share one rank between 1 and lora.r = {limit}"
        )
    return rank


def _expected_shape(
    name: str, shape: tuple[int, ...], rank: int | None
) -> tuple[int, ...]:
    if rank is None:
        return shape
    if LORA_A in name:
        return (rank, *shape[1:])  # A: (r, in)
    if LORA_B in name:
        return (*shape[:-1], rank)  # B: (out, r)
    return shape


def _label_counts(
    reply: Message, reference: Mapping[str, np.ndarray], weight: float
) -> np.ndarray | None:
    """The optional per-label row counts, checked against the head's size and
    rescaled to sum to the reply's weight: a site's pull on the head's rows is then
    its weight, like its pull on every other tensor, whatever counts it claims."""
    if keys.LABEL_COUNTS_RECORD not in reply.content.array_records:
        return None
    arrays = from_array_record(reply.content.array_records[keys.LABEL_COUNTS_RECORD])
    counts = arrays.get("counts")
    num_labels = reference["head.bias"].shape[0]
    if counts is None or counts.shape != (num_labels,):
        raise RejectedUpdate(f"label counts must have shape ({num_labels},)")
    counts = counts.astype(np.float64)
    total = float(counts.sum())
    if not ((counts >= 0).all() and math.isfinite(total) and total > 0):
        raise RejectedUpdate("label counts must be finite, non-negative, not all 0")
    return counts * (weight / total)
