"""Per-label head sums, the slots ``aggregation = fedavg-per-label`` adds to a round's
sum (inside the masked vector behind secure aggregation).

Row ``k`` of the per-label mean is ``sum_i v_ik * delta_i[k] / sum_i v_ik``, where
``v_ik`` is site ``i``'s weight on label ``k``: its row count of ``k`` rescaled so
that its counts sum to its weight (a site pulls the head no harder than any other
tensor, whatever counts it claims). Both sums are sums over sites, so each site
appends to its masked vector

    ``[v_i (L,), v_ik * delta_i[head.weight][k] (L * d,), v_ik * delta_i[head.bias][k]
    (L,)]``

in the same fixed point as its weighted delta, and the coordinator divides the two
decoded sums. Each ``v_ik`` lies in ``[0, w_i]`` with ``w_i <= 1`` and each head row
of the clipped delta has norm at most the clip norm, so every appended coordinate of
``n`` sites sums within ``n * max(clip, 1)``: the bound the ring is already sized for
(:meth:`common.secagg.encoding.FixedPoint.for_clients`), whatever the cohort.

What the coordinator learns beyond FedAvg's sum: ``sum_i v_ik`` for each label, the
total row count of each label over the round's sites (divided by
``secagg.max-weight``), never one site's.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

import numpy as np

from common.sharing import HEAD_PREFIX

HEAD_WEIGHT = f"{HEAD_PREFIX}weight"
HEAD_BIAS = f"{HEAD_PREFIX}bias"
#: The head tensors averaged per label, in their order in the appended slots.
HEAD_TENSORS = (HEAD_WEIGHT, HEAD_BIAS)


def label_slots(reference: Mapping[str, np.ndarray]) -> int:
    """Slots the per-label sums take for a round sharing ``reference``: ``L * (d +
    2)`` for a head of ``L`` rows of width ``d``; 0 when the round shares no head."""
    if not all(name in reference for name in HEAD_TENSORS):
        return 0
    labels, width = reference[HEAD_WEIGHT].shape
    return labels * (width + 2)


def label_weights(counts: np.ndarray, weight: float) -> np.ndarray:
    """A site's weight on each label: its row counts rescaled to sum to ``weight``
    ``(L,) float64``.

    Raises
    ------
    ValueError
        When the counts are negative, not finite or all zero.
    """
    counts = np.asarray(counts, np.float64)  # (L,)
    total = float(counts.sum())
    if not (np.isfinite(counts).all() and (counts >= 0).all() and total > 0):
        raise ValueError("label counts must be finite, non-negative, not all 0")
    return counts * (weight / total)


def site_label_sums(
    head: Mapping[str, np.ndarray], counts: np.ndarray, weight: float, clip: float
) -> np.ndarray:
    """What a site appends: ``(L * (d + 2),) float64`` (see the module docstring).

    Parameters
    ----------
    head : Mapping[str, np.ndarray]
        The site's head delta: ``head.weight`` ``(L, d)`` and ``head.bias`` ``(L,)``.
    counts : np.ndarray
        Its rows per label ``(L,)``.
    weight : float
        Its weight in the ring (``FixedPoint.weight_of``).
    clip : float
        The factor that clipped its whole delta (``FixedPoint.clip_factor``), so the
        rows appended are those of the delta the ring holds.
    """
    v = label_weights(counts, weight)  # (L,)
    rows = head[HEAD_WEIGHT].astype(np.float64) * (v * clip)[:, None]  # (L, d)
    bias = head[HEAD_BIAS].astype(np.float64) * (v * clip)  # (L,)
    return np.concatenate([v, rows.ravel(), bias])


@dataclass(frozen=True)
class LabelSums:
    """The per-label sums of a round, plain or decoded from the secure sum.

    Attributes
    ----------
    counts : np.ndarray
        ``(L,) float64``: ``sum_i v_ik``, each label's summed weight.
    rows : dict[str, np.ndarray]
        ``head.weight`` ``(L, d)`` and ``head.bias`` ``(L,)``, float64: ``sum_i v_ik
        * delta_i[k]``.
    """

    counts: np.ndarray
    rows: dict[str, np.ndarray]

    @classmethod
    def from_vector(
        cls, values: np.ndarray, reference: Mapping[str, np.ndarray]
    ) -> LabelSums:
        """Split the decoded slots ``(L * (d + 2),) float64`` of a round sharing
        ``reference``."""
        labels, width = reference[HEAD_WEIGHT].shape
        return cls(
            counts=values[:labels],
            rows={
                HEAD_WEIGHT: values[labels : labels * (width + 1)].reshape(
                    labels, width
                ),
                HEAD_BIAS: values[labels * (width + 1) :],
            },
        )

    def problem(self, weight: float, clip_norm: float, sites: int, step: float) -> str:
        """What these sums break that no ``sites`` honest sites of total weight
        ``weight`` can cause, up to one rounding ``step`` per site and slot; or
        ``""``.

        Every honest ``v_ik`` is non-negative, a site's sum to its weight, and its
        row ``k`` has norm at most ``v_ik * clip_norm``.
        """
        slack = sites * step
        labels = self.counts.size
        if (self.counts < -slack).any():
            return "has a negative per-label count"
        if abs(float(self.counts.sum()) - weight) > (labels + 1) * slack:
            return (
                f"has per-label counts summing to {float(self.counts.sum()):.6g}, "
                f"not the total weight {weight:.6g}"
            )
        norms = np.sqrt(
            np.sum(self.rows[HEAD_WEIGHT] ** 2, axis=1) + self.rows[HEAD_BIAS] ** 2
        )  # (L,)
        width = self.rows[HEAD_WEIGHT].shape[1] + 1
        counts = np.maximum(self.counts, 0) + slack
        limit = counts * clip_norm + np.sqrt(width) * slack
        if not (norms <= limit * (1 + 1e-9)).all():
            return "has a per-label head row above its count x secagg.clip-norm"
        return ""
