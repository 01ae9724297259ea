"""Masks in the ring of integers modulo 2^32 (or 2^64, 2^16), expanded from 32-byte
seeds by a ChaCha20 keystream (``cryptography``); unsigned arithmetic wraps, which is
the ring."""

from __future__ import annotations

import numpy as np
import numpy.typing
from cryptography.hazmat.primitives.ciphers import Cipher, algorithms

_NONCE = bytes(
    16
)  # every seed is used for exactly one stream, so a fixed nonce is safe


def prg(seed: bytes, length: int, dtype: np.typing.DTypeLike = np.uint32) -> np.ndarray:
    """``length`` pseudo-random unsigned integers of ``dtype`` (uniform in its ring:
    uint32 for Z_(2^32), uint64 for Z_(2^64), uint16 for Z_(2^16)) from a 32-byte
    seed."""
    width = np.dtype(dtype).itemsize
    zeros = bytes(width * length)
    stream = bytearray(width * length)
    Cipher(algorithms.ChaCha20(seed, _NONCE), mode=None).encryptor().update_into(
        zeros, stream
    )
    return np.frombuffer(stream, dtype=dtype)  # (length,) dtype


def add_mask(vector: np.ndarray, seed: bytes, sign: int) -> None:
    """``vector += sign * PRG(seed)`` modulo the ring of ``vector``'s unsigned dtype,
    in place."""
    mask = prg(seed, vector.size, vector.dtype)
    if sign > 0:
        np.add(vector, mask, out=vector)
    else:
        np.subtract(vector, mask, out=vector)


def pair_sign(own: int, peer: int) -> int:
    """+1 for the lower node id of a pair, -1 for the higher: the two masks cancel."""
    return 1 if own < peer else -1
