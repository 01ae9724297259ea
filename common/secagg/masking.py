"""Masks in the ring of integers modulo 2^32, expanded from 32-byte seeds by a
ChaCha20 keystream (``cryptography``); uint32 arithmetic wraps, which is the ring."""

from __future__ import annotations

import numpy as np
from cryptography.hazmat.primitives.ciphers import Cipher, algorithms

_NONCE = bytes(
    16
)  # every seed is used for exactly one stream, so a fixed nonce is safe


def prg(seed: bytes, length: int) -> np.ndarray:
    """``length`` pseudo-random uint32 values from a 32-byte seed."""
    zeros = bytes(4 * length)
    stream = bytearray(4 * length)
    Cipher(algorithms.ChaCha20(seed, _NONCE), mode=None).encryptor().update_into(
        zeros, stream
    )
    return np.frombuffer(stream, dtype=np.uint32)  # (length,) uint32


def add_mask(vector: np.ndarray, seed: bytes, sign: int) -> None:
    """``vector += sign * PRG(seed)`` modulo 2^32, in place."""
    mask = prg(seed, vector.size)
    if sign > 0:
        np.add(vector, mask, out=vector)
    else:
        np.subtract(vector, mask, out=vector)


def pair_sign(own: int, peer: int) -> int:
    """+1 for the lower node id of a pair, -1 for the higher: the two masks cancel."""
    return 1 if own < peer else -1
