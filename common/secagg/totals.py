"""Exact integer encoding of evaluation totals for the secure sum.

A site's evaluation totals (examples, correct predictions, loss sum, tokens) are
sums, so the coordinator needs only their sum over sites; behind secure aggregation it
must learn nothing else. Each total becomes a non-negative integer (counts as they
are, the loss sum in steps of ``2^-FRACTION_BITS``), split into ``LIMBS`` limbs of
``LIMB_BITS`` bits, each in its own slot of the 32-bit ring. A slot's sum over ``n``
sites stays below ``n * 2^16``, so up to 65,536 sites add without wrapping and the
sum is recovered exactly: ``sum_k limb_k * 2^(16 k)``.
"""

from __future__ import annotations

import numpy as np

LIMB_BITS = 16
LIMBS = 3  # 48 bits a total: counts to 2.8e14, loss sums to 4.3e9
FRACTION_BITS = 16  # the loss sum's step, 1.5e-5
#: The fractional total of :class:`common.evaluation.EvalTotals`' vector: the loss sum.
EVAL_FRACTIONAL = (2,)
#: Sites whose limbs add without wrapping the 32-bit ring.
MAX_SITES = 2 ** (32 - LIMB_BITS)
_LIMB_MASK = (1 << LIMB_BITS) - 1


def _scales(width: int, fractional: tuple[int, ...]) -> np.ndarray:
    scales = np.ones(width, np.float64)  # (width,)
    scales[list(fractional)] = 2.0**FRACTION_BITS
    return scales


def encode_totals(totals: np.ndarray, fractional: tuple[int, ...]) -> np.ndarray:
    """``(T,) float64`` totals -> ``(T * LIMBS,) uint32`` limbs.

    Parameters
    ----------
    totals : np.ndarray
        Non-negative totals; those at the positions ``fractional`` are rounded to
        steps of ``2^-FRACTION_BITS``, the others to integers.

    Raises
    ------
    ValueError
        When a total is negative, not finite, or too large for ``LIMBS`` limbs.
    """
    scaled = np.rint(totals * _scales(totals.size, fractional))  # (T,) float64
    if not np.all(np.isfinite(scaled)) or np.any(scaled < 0):
        raise ValueError("evaluation totals must be finite and non-negative")
    if np.any(scaled >= 2.0 ** (LIMB_BITS * LIMBS)):
        raise ValueError(
            f"an evaluation total exceeds the {LIMB_BITS * LIMBS}-bit secure encoding"
        )
    integers = scaled.astype(np.uint64)  # (T,)
    shifts = np.arange(LIMBS, dtype=np.uint64) * np.uint64(LIMB_BITS)  # (LIMBS,)
    limbs = (integers[:, None] >> shifts[None, :]) & np.uint64(_LIMB_MASK)
    return limbs.astype(np.uint32).reshape(-1)  # (T * LIMBS,) uint32


def within_limbs(ring_sum: np.ndarray, sites: int) -> bool:
    """Whether each summed limb is one that ``sites`` honest uploads can give
    (each below ``2^LIMB_BITS``): a forged vector mostly is not."""
    return bool(np.all(ring_sum.astype(np.uint64) <= sites * _LIMB_MASK))


def decode_totals(ring_sum: np.ndarray, fractional: tuple[int, ...]) -> np.ndarray:
    """The summed limbs ``(T * LIMBS,) uint32`` -> the summed ``(T,) float64``
    totals."""
    limbs = ring_sum.reshape(-1, LIMBS)  # (T, LIMBS) uint32
    # Python integers: the sum can pass 2^53, where float64 stops being exact.
    integers = [
        sum(int(limb) << (LIMB_BITS * k) for k, limb in enumerate(row)) for row in limbs
    ]
    return np.array(integers, np.float64) / _scales(len(integers), fractional)
