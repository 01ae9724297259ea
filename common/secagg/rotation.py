"""A public random rotation that spreads a delta evenly over its coordinates, so that
a narrow ring (16 bits) can hold every coordinate of the sum.

Secure aggregation sums integers in a fixed ring, so each coordinate needs headroom
for the largest value it may hold. An L2 bound ``C`` alone allows one coordinate to
hold all of ``C``; after a randomised Hadamard transform ``H D`` (``D`` random signs,
``H`` the orthonormal Walsh-Hadamard matrix, applied per block of ``b`` coordinates)
each coordinate is a sum of ``b`` signed terms and is of order ``C / sqrt(b)``
(Suresh et al. 2017; Kairouz et al. 2021, "The Distributed Discrete Gaussian
Mechanism"). The transform is orthonormal: it keeps L2 norms, and ``D H`` undoes it.

The signs come from a ChaCha20 keystream (``cryptography``) of a public seed that all
parties derive from the round; the rotation needs no secrecy, only that clients cannot
pick it.
"""

from __future__ import annotations

import math

import numpy as np

from common.secagg.masking import prg

BLOCK = 4096  # coordinates per Hadamard block: fixed, so the bound is known upfront


def rotated_length(length: int) -> int:
    """Length after padding ``length`` coordinates to whole blocks."""
    return max(1, math.ceil(length / BLOCK)) * BLOCK


def _signs(seed: bytes, length: int) -> np.ndarray:
    bits = prg(seed, length, np.uint8) & 1  # (length,) uint8
    return 1.0 - 2.0 * bits.astype(np.float64)  # (length,) float64 of +-1


def _hadamard(blocks: np.ndarray) -> np.ndarray:
    """Orthonormal Walsh-Hadamard transform of each row of ``(n, b)`` float64."""
    rows, width = blocks.shape
    out = blocks.copy()
    half = 1
    while half < width:
        view = out.reshape(rows, width // (2 * half), 2, half)
        low, high = view[:, :, 0, :].copy(), view[:, :, 1, :]
        view[:, :, 0, :] += high
        view[:, :, 1, :] = low - high
        half *= 2
    return out / math.sqrt(width)


def rotate(vector: np.ndarray, seed: bytes) -> np.ndarray:
    """``H D x`` of ``(P,)`` ``vector``, zero-padded to ``(rotated_length(P),)``
    float64."""
    length = vector.size
    padded = np.zeros(rotated_length(length), dtype=np.float64)
    padded[:length] = vector
    padded *= _signs(seed, padded.size)
    return _hadamard(padded.reshape(-1, BLOCK)).ravel()


def unrotate(rotated: np.ndarray, seed: bytes, length: int) -> np.ndarray:
    """``D H y``: the first ``length`` coordinates of the inverse rotation, float64."""
    if rotated.size != rotated_length(length):
        raise ValueError(
            f"rotated vector has {rotated.size} coordinates, expected "
            f"{rotated_length(length)} for {length}"
        )
    restored = _hadamard(np.asarray(rotated, np.float64).reshape(-1, BLOCK)).ravel()
    return (restored * _signs(seed, restored.size))[:length]


def coordinate_bound(clip_norm: float, sigmas: float = 6.0) -> float:
    """A bound that a rotated coordinate of a delta of norm at most ``clip_norm``
    exceeds with probability below ``2 exp(-sigmas^2 / 2)`` (about 3e-8 at 6):
    ``sigmas * clip_norm / sqrt(BLOCK)``, for the worst case of all the norm in one
    block. Coordinates beyond it are clipped to it."""
    return sigmas * clip_norm / math.sqrt(BLOCK)
