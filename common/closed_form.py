"""A classification head solved in closed form from class statistics that are sums.

Every variant reads the frozen backbone's pooled features only through sums over rows:
each label's row count ``N_k`` and feature sum ``s_k``, and (ridge, LDA) the Gram
matrix ``G = sum_j x_j x_j^T``. Sums over sites are sums over the union of their rows,
so a head solved from the sites' summed statistics, plain or secure, is the head solved
centrally on the union, whatever the labels' spread over the sites (Fed3R, Fanì et al.
2024; FedNCM, Legate et al. 2023).

- ``ncm``: nearest class mean, ``w_k = mu_k``, ``b_k = -||mu_k||^2 / 2``.
- ``lda``: a shared covariance ``S = (G - sum_k s_k s_k^T / N_k) / (N - C)``, shrunk
  towards ``tr(S) / d * I`` by ``head.closed-form-shrinkage``; ``w_k = S^-1 mu_k``,
  ``b_k = -mu_k^T S^-1 mu_k / 2 + log(N_k / N)``.
- ``ridge``: least squares onto one-hot targets with a bias column, ``[W b] =
  argmin ||[X 1][W b]^T - Y||^2 + lambda ||W||^2``, ``lambda`` the shrinkage times
  ``tr(G) / d``.

Each row's features are first scaled into the ball of radius ``head.feature-clip``
(a row-wise step, so the union sees the same rows), which bounds every statistic for
the secure sum's fixed point.

A label no site holds gets a zero row and a bias below every held label's (ridge: the
zero row and bias its solution gives).
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass

import numpy as np

from common.config.head import CLOSED_FORMS
from common.secagg.encoding import WIDE_RING_BITS, FixedPoint
from common.sharing import HEAD_PREFIX

__all__ = [
    "CLOSED_FORMS",
    "NEEDS_GRAM",
    "ClassStatistics",
    "clip_rows",
    "head_tensors",
    "solve_head",
    "statistics_encoding",
]
#: The variants that read the Gram matrix (ncm needs counts and class sums only).
NEEDS_GRAM = frozenset({"lda", "ridge"})
#: How far below the lowest held label's bias an unheld label's bias goes.
_UNHELD_MARGIN = 1e3


def clip_rows(features: np.ndarray, clip: float) -> np.ndarray:
    """``(n, d)`` rows scaled down to norm ``clip`` where longer (float64)."""
    rows = np.asarray(features, np.float64)  # (n, d)
    norms = np.linalg.norm(rows, axis=1, keepdims=True)  # (n, 1)
    return rows * np.minimum(1.0, clip / np.maximum(norms, 1e-300))


@dataclass(frozen=True)
class ClassStatistics:
    """Sums over rows of the pooled features, by label.

    Attributes
    ----------
    counts : np.ndarray
        ``(L,) float64`` rows per label.
    sums : np.ndarray
        ``(L, d) float64`` feature sum per label.
    gram : np.ndarray or None
        ``(d, d) float64`` ``sum_j x_j x_j^T``; ``None`` when the variant needs none.
    """

    counts: np.ndarray
    sums: np.ndarray
    gram: np.ndarray | None

    @classmethod
    def of(
        cls,
        features: np.ndarray,
        labels: np.ndarray,
        num_labels: int,
        clip: float,
        with_gram: bool,
    ) -> ClassStatistics:
        """The statistics of rows ``features`` ``(n, d)`` with ``labels`` ``(n,)``,
        each row clipped to norm ``clip``."""
        rows = clip_rows(features, clip)  # (n, d)
        labels = np.asarray(labels, np.int64)
        sums = np.zeros((num_labels, rows.shape[1]))  # (L, d)
        np.add.at(sums, labels, rows)
        return cls(
            counts=np.bincount(labels, minlength=num_labels).astype(np.float64),
            sums=sums,
            gram=rows.T @ rows if with_gram else None,
        )

    @classmethod
    def total(cls, parts: Iterable[ClassStatistics]) -> ClassStatistics:
        """The statistics of the union of the parts' rows."""
        parts = list(parts)
        return cls(
            counts=np.sum([p.counts for p in parts], axis=0),
            sums=np.sum([p.sums for p in parts], axis=0),
            gram=(
                None
                if parts[0].gram is None
                else np.sum([p.gram for p in parts], axis=0)
            ),
        )

    # -- as one vector (the secure sum) ------------------------------------------------

    @staticmethod
    def vector_length(num_labels: int, width: int, with_gram: bool) -> int:
        """Values in :meth:`to_vector`: ``L + L d`` (+ ``d (d + 1) / 2``)."""
        gram = width * (width + 1) // 2 if with_gram else 0
        return num_labels * (1 + width) + gram

    def to_vector(self) -> np.ndarray:
        """``[counts, sums, upper triangle of gram]`` as ``(V,) float64``."""
        parts = [self.counts, self.sums.ravel()]
        if self.gram is not None:
            parts.append(self.gram[np.triu_indices(self.gram.shape[0])])
        return np.concatenate(parts)

    @classmethod
    def from_vector(
        cls, values: np.ndarray, num_labels: int, width: int, with_gram: bool
    ) -> ClassStatistics:
        """The inverse of :meth:`to_vector`."""
        split = num_labels * (1 + width)
        gram = None
        if with_gram:
            upper = np.triu_indices(width)
            gram = np.zeros((width, width))
            gram[upper] = values[split:]
            gram = gram + np.triu(gram, 1).T
        return cls(
            counts=values[:num_labels],
            sums=values[num_labels:split].reshape(num_labels, width),
            gram=gram,
        )

    def problem(self, sites: int, clip: float, max_rows: float, step: float) -> str:
        """What no ``sites`` honest sites of at most ``max_rows`` rows each, with rows
        of norm at most ``clip``, can sum to (up to one rounding ``step`` per site and
        value); ``""`` when nothing.
        """
        slack = sites * step
        rows = float(self.counts.sum())
        if (self.counts < -slack).any() or rows > sites * max_rows + slack:
            return f"has row counts outside [0, {sites} x {max_rows:g}]"
        if np.abs(self.counts - np.rint(self.counts)).max(initial=0) > 1e-3 + slack:
            return "has a row count that is not a whole number"
        width = self.sums.shape[1]
        norms = np.linalg.norm(self.sums, axis=1)  # (L,)
        if not (
            norms <= self.counts.clip(0) * clip + np.sqrt(width) * slack + 1e-9
        ).all():
            return "has a class sum longer than its count x head.feature-clip"
        if self.gram is not None:
            trace = float(np.trace(self.gram))
            if (np.diag(self.gram) < -slack).any() or trace > rows * clip**2 + (
                width * slack + 1e-9
            ):
                return "has a Gram matrix no rows of norm <= head.feature-clip give"
        return ""


def statistics_encoding(cohort: int, clip: float, max_rows: float) -> FixedPoint:
    """The 64-bit fixed point of a secure sum of ``cohort`` sites' statistics, each
    site holding at most ``max_rows`` rows of norm at most ``clip``.

    Every value a site sends lies within ``max_rows * max(1, clip)^2`` (a count is at
    most ``max_rows``, a class-sum coordinate ``max_rows * clip``, a Gram entry
    ``max_rows * clip^2``), so the sum of ``cohort`` of them cannot wrap the ring.

    Raises
    ------
    common.secagg.encoding.HeadroomError
        When the step would be coarser than ``1e-6``.
    """
    bound = max_rows * max(1.0, clip) ** 2
    return FixedPoint.for_clients(
        cohort, bound, max_weight=1.0, ring_bits=WIDE_RING_BITS
    )


def solve_head(
    statistics: ClassStatistics, variant: str, shrinkage: float
) -> tuple[np.ndarray, np.ndarray]:
    """The head ``(weight (L, d), bias (L,))`` float64 of ``variant`` (see the module
    docstring).

    Raises
    ------
    ValueError
        When no row is counted, or a variant needing the Gram matrix has none.
    """
    counts, sums = statistics.counts, statistics.sums
    held = counts > 0.5  # whole rows; a secure sum's rounding leaves 0 at 0
    if not held.any():
        raise ValueError("the closed-form head's statistics count no row")
    if variant in NEEDS_GRAM and statistics.gram is None:
        raise ValueError(f"head.closed-form = {variant} needs the Gram matrix")
    labels, width = sums.shape
    if variant == "ridge":
        return _ridge(statistics, shrinkage)
    means = sums[held] / counts[held, None]  # (C, d)
    weight = np.zeros((labels, width))
    bias = np.zeros(labels)
    if variant == "ncm":
        weight[held] = means
        bias[held] = -0.5 * np.sum(means**2, axis=1)
    elif variant == "lda":
        total, classes = float(counts[held].sum()), int(held.sum())
        scatter = statistics.gram - (sums[held].T / counts[held]) @ sums[held]
        covariance = scatter / max(total - classes, 1.0)  # (d, d)
        if not np.trace(covariance) > 0:
            raise ValueError(
                "the rows' features do not vary within their labels, so lda has no "
                "covariance to invert; use head.closed-form = ncm"
            )
        covariance = (1 - shrinkage) * covariance + shrinkage * (
            np.trace(covariance) / width
        ) * np.eye(width)
        precise = np.linalg.solve(covariance, means.T).T  # (C, d)
        weight[held] = precise
        bias[held] = -0.5 * np.sum(precise * means, axis=1) + np.log(
            counts[held] / total
        )
    else:
        raise ValueError(f"unknown closed-form head {variant!r}; use {CLOSED_FORMS}")
    bias[~held] = bias[held].min() - _UNHELD_MARGIN
    return weight, bias


def head_tensors(weight: np.ndarray, bias: np.ndarray) -> dict[str, np.ndarray]:
    """The solved head as the adapter state's float32 ``head.*`` tensors."""
    return {
        f"{HEAD_PREFIX}weight": weight.astype(np.float32),
        f"{HEAD_PREFIX}bias": bias.astype(np.float32),
    }


def _ridge(
    statistics: ClassStatistics, shrinkage: float
) -> tuple[np.ndarray, np.ndarray]:
    """Ridge regression onto one-hot targets, with an unpenalised bias column."""
    counts, sums, gram = statistics.counts, statistics.sums, statistics.gram
    assert gram is not None
    width = gram.shape[0]
    penalty = shrinkage * np.trace(gram) / width
    feature_sum = sums.sum(axis=0)  # (d,)
    system = np.empty((width + 1, width + 1))  # [X 1]^T [X 1] + lambda diag(1.., 0)
    system[:width, :width] = gram + penalty * np.eye(width)
    system[:width, width] = system[width, :width] = feature_sum
    system[width, width] = counts.sum()
    targets = np.vstack([sums.T, counts[None, :]])  # [X 1]^T Y: (d + 1, L)
    solution = np.linalg.solve(system, targets)  # (d + 1, L)
    return solution[:width].T, solution[width]
