"""Fixed-point encoding of clipped, weighted deltas in Z_(2^32), Z_(2^64) or Z_(2^16),
with headroom.

Each client sends ``q(w * clip(delta))`` followed by ``q(w)``, where ``w`` is its
example count divided by ``max-weight`` (so ``0 < w <= 1``) and ``q(x) =
round(x * scale) mod 2^bits``. The coordinator decodes the unmasked sum as signed
integers and divides by the decoded total weight: the example-weighted mean, while no
single count is ever sent in the clear.

The scale is the largest that keeps every coordinate of the sum of ``n`` clients inside
the signed range: ``n * bound * scale < 2^(bits - 1)``, where ``bound`` is the clip
norm in the 32-bit ring. A cohort too large for steps of 1e-6 in 32 bits (about 214
clients at clip 10) sums in the 64-bit ring instead: twice the upload, steps of
``n * clip / 2^62``. The 16-bit ring (the quantising codecs: half the upload) has
too little headroom for that, so there the delta is first rotated
(``common.secagg.rotation``), each coordinate is clipped to a bound of order
``clip / sqrt(block)`` that the rotation makes it all but never reach, and the rounding
is stochastic, so the coarser step adds noise but no bias.
"""

from __future__ import annotations

import math
import secrets
from collections.abc import Mapping
from dataclasses import dataclass

import numpy as np

from common.secagg.rotation import coordinate_bound

RING_BITS = 32
NARROW_RING_BITS = 16
#: The ring of a cohort too large for 1e-6 steps in 32 bits (twice the upload).
WIDE_RING_BITS = 64
MIN_STEP = 1e-6  # the coarsest step the 32- and 64-bit rings accept
NARROW_MIN_STEP = 1e-2  # the coarsest step the 16-bit ring accepts (~300 clients)
_RING_DTYPES = {64: np.uint64, 32: np.uint32, 16: np.uint16}
_SIGNED_DTYPES = {64: np.int64, 32: np.int32, 16: np.int16}


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
    ring_bits : int
        32, or 16 for a rotated delta in the narrow ring.
    coordinate_bound : float
        In the narrow ring, each coordinate of the weighted delta is clipped to this;
        0 in the 32-bit ring (the L2 clip bounds every coordinate there).
    """

    scale: float
    clip_norm: float
    max_weight: float
    ring_bits: int = RING_BITS
    coordinate_bound: float = 0.0

    @property
    def ring(self) -> type[np.unsignedinteger]:
        """The unsigned dtype whose wrap-around is the ring."""
        return _RING_DTYPES[self.ring_bits]

    @classmethod
    def for_clients(
        cls,
        num_clients: int,
        clip_norm: float,
        max_weight: float,
        min_step: float = MIN_STEP,
        ring_bits: int = RING_BITS,
        coordinate_bound: float = 0.0,
    ) -> FixedPoint:
        """The finest encoding whose sum over ``num_clients`` cannot overflow.

        ``coordinate_bound`` (narrow ring) replaces the clip norm as the largest
        value a coordinate may hold.

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
        per_coordinate = coordinate_bound or clip_norm
        bound = num_clients * max(per_coordinate, 1.0)
        # Stochastic rounding may add one step per client: keep n steps spare.
        spare = num_clients if ring_bits < RING_BITS else 0
        # float64 holds integers exactly only to 2^53: in 64 bits a spare bit
        # absorbs the rounding of the scaled values.
        top = 2 ** (ring_bits - 1) - 1 if ring_bits <= 32 else 2 ** (ring_bits - 2)
        scale = math.floor((top - spare) / bound)
        if scale < 1 / min_step:
            raise HeadroomError(
                f"{num_clients} clients with secagg.clip-norm = {clip_norm} "
                "leave a quantisation "
                f"step of {1 / max(scale, 1):.2e} (> {min_step:.0e}) in {ring_bits} "
                "bits; lower secagg.clip-norm or sample fewer clients per round"
                + (", or use codec = fp32 (32-bit ring)" if ring_bits < 32 else "")
            )
        return cls(
            scale=float(scale),
            clip_norm=clip_norm,
            max_weight=max_weight,
            ring_bits=ring_bits,
            coordinate_bound=coordinate_bound,
        )

    def encode(
        self,
        flat_delta: np.ndarray,
        num_examples: float,
        rng: np.random.Generator | None = None,
    ) -> np.ndarray:
        """Clip, weight and quantise: ``(P + 1,)`` in the ring, with the weight last.

        Parameters
        ----------
        rng : numpy.random.Generator, optional
            Draws the stochastic rounding of the narrow ring (a fresh CSPRNG-seeded
            one by default); the 32-bit ring rounds to nearest.

        Raises
        ------
        ValueError
            When the delta holds NaN or Inf (it must never reach the ring).
        """
        if not np.isfinite(flat_delta).all():
            raise ValueError("delta holds NaN or Inf: refusing to encode it")
        weight = self.weight_of(num_examples)
        clip = self.clip_factor(flat_delta)
        values = np.empty(flat_delta.size + 1, dtype=np.float64)  # (P + 1,) float64
        np.multiply(flat_delta, clip * weight * self.scale, out=values[:-1])
        values[-1] = weight * self.scale
        if self.coordinate_bound:
            limit = self.coordinate_bound * self.scale
            np.clip(values[:-1], -limit, limit, out=values[:-1])
        if self.ring_bits < RING_BITS:
            generator = rng or np.random.default_rng(secrets.randbits(128))
            floor = np.floor(values)
            values = floor + (generator.random(values.size) < values - floor)
        else:
            np.rint(values, out=values)
        return values.astype(np.int64).astype(self.ring)

    def weight_of(self, num_examples: float) -> float:
        """A client's weight in the ring: its example count over ``max_weight``,
        capped at 1."""
        return min(num_examples, self.max_weight) / self.max_weight

    def clip_factor(self, flat_delta: np.ndarray) -> float:
        """The factor (at most 1) that brings ``flat_delta`` within the clip norm."""
        norm = float(np.linalg.norm(flat_delta))
        return min(1.0, self.clip_norm / norm) if norm > 0 else 1.0

    def to_ring(self, values: np.ndarray) -> np.ndarray:
        """Real ``values`` (e.g. appended counts) as ring elements, rounded."""
        return (
            np.rint(np.asarray(values, np.float64) * self.scale)
            .astype(np.int64)
            .astype(self.ring)
        )

    def decode_sum(self, ring_sum: np.ndarray) -> tuple[np.ndarray, float]:
        """Signed decoding of an unmasked sum: (sum of weighted deltas
        ``(P,) float64``, total weight)."""
        signed = self.decode(ring_sum)
        return signed[:-1], float(signed[-1])

    def decode(self, ring_values: np.ndarray) -> np.ndarray:
        """Ring elements as signed reals ``float64``, in steps of ``1 / scale``."""
        return (
            np.asarray(ring_values)
            .astype(self.ring)
            .view(_SIGNED_DTYPES[self.ring_bits])
            .astype(np.float64)
            / self.scale
        )


def round_encoding(
    num_clients: int, bound: float, max_weight: float, ring_bits: int = RING_BITS
) -> FixedPoint:
    """The encoding of a round of ``num_clients`` whose coordinates stay within
    ``bound`` each (the clip norm, plus any noise headroom): the 16-bit ring for a
    rotated delta with its per-coordinate bound and coarser floor; otherwise the
    32-bit ring, or the 64-bit ring when the cohort is too large for steps of
    ``MIN_STEP`` in 32 bits.

    Raises
    ------
    HeadroomError
        When the ring cannot hold that many clients at a useful step.
    """
    if ring_bits < RING_BITS:
        return FixedPoint.for_clients(
            num_clients,
            bound,
            max_weight,
            min_step=NARROW_MIN_STEP,
            ring_bits=ring_bits,
            coordinate_bound=coordinate_bound(bound),
        )
    try:
        return FixedPoint.for_clients(num_clients, bound, max_weight)
    except HeadroomError:
        # Too many clients (about 2^31 * 1e-6 / clip) for 1e-6 steps in 32 bits.
        return FixedPoint.for_clients(
            num_clients, bound, max_weight, ring_bits=WIDE_RING_BITS
        )


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
