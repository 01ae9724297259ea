"""Fixed-point encoding of clipped, weighted deltas in Z_(2^32), with headroom.

Each client sends ``q(w * clip(delta))`` followed by ``q(w)``, where ``w`` is its
example count divided by ``max-weight`` (so ``0 < w <= 1``) and ``q(x) =
round(x * scale) mod 2^32``. The coordinator decodes the unmasked sum as signed
integers and divides by the decoded total weight: the example-weighted mean, while no
single count is ever sent in the clear.

The scale is the largest that keeps every coordinate of the sum of ``n`` clients inside
the signed 32-bit range: ``n * clip * scale < 2^31``.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass

import numpy as np

RING_BITS = 32
_SIGNED_LIMIT = 2 ** (RING_BITS - 1) - 1


class HeadroomError(ValueError):
    """The configured clients, clip norm and precision cannot fit the ring."""


@dataclass(frozen=True)
class FixedPoint:
    """Encoding parameters of one round.

    Attributes
    ----------
    scale : float
        Integer steps per unit; one quantisation step is ``1 / scale``.
    clip_norm : float
        L2 bound applied to each delta before weighting.
    max_weight : float
        Example counts are divided by this (and capped at it).
    """

    scale: float
    clip_norm: float
    max_weight: float

    @classmethod
    def for_clients(
        cls,
        num_clients: int,
        clip_norm: float,
        max_weight: float,
        min_step: float = 1e-6,
    ) -> FixedPoint:
        """The finest encoding whose sum over ``num_clients`` cannot overflow.

        Raises
        ------
        HeadroomError
            When even that encoding is coarser than ``min_step``, saying what to change.
        """
        if clip_norm <= 0 or max_weight < 1:
            raise HeadroomError(
                "secagg.clip-norm must be > 0 and secagg.max-weight >= 1"
            )
        # |sum_i w_i x_ik| <= n * clip; the weight coordinate sums to <= n <= n * clip
        # when clip >= 1.
        bound = num_clients * max(clip_norm, 1.0)
        scale = math.floor(_SIGNED_LIMIT / bound)
        if scale < 1 / min_step:
            raise HeadroomError(
                f"{num_clients} clients with secagg.clip-norm = {clip_norm} "
                "leave a quantisation "
                f"step of {1 / max(scale, 1):.2e} (> {min_step:.0e}) in 32 bits; lower "
                "secagg.clip-norm or sample fewer clients per round"
            )
        return cls(scale=float(scale), clip_norm=clip_norm, max_weight=max_weight)

    def encode(self, flat_delta: np.ndarray, num_examples: float) -> np.ndarray:
        """Clip, weight and quantise: ``(P + 1,) uint32`` with the weight last.

        Raises
        ------
        ValueError
            When the delta holds NaN or Inf (it must never reach the ring).
        """
        if not np.isfinite(flat_delta).all():
            raise ValueError("delta holds NaN or Inf: refusing to encode it")
        norm = float(np.linalg.norm(flat_delta))
        weight = min(num_examples, self.max_weight) / self.max_weight
        clip = min(1.0, self.clip_norm / norm) if norm > 0 else 1.0
        values = np.empty(flat_delta.size + 1, dtype=np.float64)  # (P + 1,) float64
        np.multiply(flat_delta, clip * weight * self.scale, out=values[:-1])
        values[-1] = weight * self.scale
        np.rint(values, out=values)
        return values.astype(np.int64).astype(np.uint32)

    def decode_sum(self, ring_sum: np.ndarray) -> tuple[np.ndarray, float]:
        """Signed decoding of an unmasked sum: (sum of weighted deltas
        ``(P,) float64``, total weight)."""
        signed = (
            ring_sum.astype(np.uint32).view(np.int32).astype(np.float64) / self.scale
        )
        return signed[:-1], float(signed[-1])


def flatten(state: Mapping[str, np.ndarray]) -> np.ndarray:
    """All tensors in sorted-name order as one float32 vector."""
    return np.concatenate(
        [np.asarray(state[k], np.float32).ravel() for k in sorted(state)]
    )


def unflatten(
    vector: np.ndarray, reference: Mapping[str, np.ndarray]
) -> dict[str, np.ndarray]:
    """Inverse of :func:`flatten` with the shapes of ``reference``."""
    out, offset = {}, 0
    for name in sorted(reference):
        size = reference[name].size
        out[name] = (
            vector[offset : offset + size]
            .reshape(reference[name].shape)
            .astype(np.float32)
        )
        offset += size
    return out
