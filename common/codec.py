"""Adapter deltas: difference, application, and the encoding that crosses the wire.

A codec turns a float32 delta into the arrays a client uploads and back. This module
holds the lossless float32 codec; compressing codecs implement the same two methods.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Protocol

import numpy as np

#: Trainable tensors by name (LoRA factors and the head), float32.
AdapterState = dict[str, np.ndarray]


def delta(
    local: Mapping[str, np.ndarray], reference: Mapping[str, np.ndarray]
) -> AdapterState:
    """``local - reference`` per tensor (float32)."""
    return {
        k: (np.asarray(local[k], np.float32) - reference[k]).astype(np.float32)
        for k in reference
    }


def apply_delta(
    reference: Mapping[str, np.ndarray],
    change: Mapping[str, np.ndarray],
    scale: float = 1.0,
) -> AdapterState:
    """``reference + scale * change`` per tensor (float32); tensors that ``change``
    does not name (not trained this round) are kept as they are."""
    return {
        k: (reference[k] + np.float32(scale) * change[k]).astype(np.float32)
        if k in change
        else np.asarray(reference[k], np.float32)
        for k in reference
    }


def l2_norm(state: Mapping[str, np.ndarray]) -> float:
    """Global L2 norm over every tensor of ``state``."""
    return float(
        np.sqrt(
            sum(float(np.square(v, dtype=np.float64).sum()) for v in state.values())
        )
    )


class Codec(Protocol):
    """Turns a float32 delta into wire arrays and back."""

    name: str

    def encode(self, change: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
        """Arrays to upload for ``change``."""
        ...

    def decode(self, arrays: Mapping[str, np.ndarray]) -> AdapterState:
        """The float32 delta the arrays stand for."""
        ...


class Float32Codec:
    """Lossless: the delta travels as float32."""

    name = "fp32"

    def encode(self, change: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
        """Each tensor as a contiguous float32 array."""
        return {k: np.ascontiguousarray(v, dtype=np.float32) for k, v in change.items()}

    def decode(self, arrays: Mapping[str, np.ndarray]) -> AdapterState:
        """Each array as float32 (the validator checks dtypes before this)."""
        return {k: np.asarray(v, dtype=np.float32) for k, v in arrays.items()}
