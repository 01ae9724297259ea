"""Adapter deltas: difference, application, and the encoding that crosses the wire.

A codec turns float32 tensors into the arrays that travel (a client's delta up, the
global adapter down) and back: ``fp32`` (lossless), ``fp16`` and ``bf16`` (2 bytes a
value), ``int8`` (1 byte a value, stochastic rounding, one scale per tensor), ``int4``
(half a byte a value, stochastic rounding, one scale per block of 128) and ``topk`` (the
largest values with their positions, with error feedback at the sender).
Decoding checks every name, dtype and shape against the expected tensors.
"""

from __future__ import annotations

import math
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


class CodecError(ValueError):
    """Wire arrays that do not decode against the expected tensors; the message names
    the tensor."""


class Codec(Protocol):
    """Turns float32 tensors into wire arrays and back."""

    name: str

    def encode(self, change: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
        """Arrays to send for ``change``."""
        ...

    def decode(
        self, arrays: Mapping[str, np.ndarray], reference: Mapping[str, np.ndarray]
    ) -> AdapterState:
        """The float32 tensors the arrays stand for, shaped as ``reference``.

        Raises
        ------
        CodecError
            When a name, dtype or shape is not what this codec sends.
        """
        ...


def _expect_names(arrays: Mapping[str, np.ndarray], expected: set[str]) -> None:
    missing, extra = sorted(expected - set(arrays)), sorted(set(arrays) - expected)
    if missing or extra:
        raise CodecError(
            f"wrong tensor names: missing {missing[:3]}, unexpected {extra[:3]}"
        )


def _expect(name: str, array: np.ndarray, dtype: type, shape: tuple[int, ...]) -> None:
    if array.dtype != dtype:
        raise CodecError(
            f"'{name}' has dtype {array.dtype}, expected {np.dtype(dtype).name}"
        )
    if array.shape != shape:
        raise CodecError(f"'{name}' has shape {array.shape}, expected {shape}")


class Float32Codec:
    """Lossless: every tensor travels as float32 (4 bytes per value)."""

    name = "fp32"

    def encode(self, change: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
        """Each tensor as a contiguous float32 array."""
        return {k: np.ascontiguousarray(v, dtype=np.float32) for k, v in change.items()}

    def decode(
        self, arrays: Mapping[str, np.ndarray], reference: Mapping[str, np.ndarray]
    ) -> AdapterState:
        """Each array, checked against ``reference``'s names and shapes."""
        _expect_names(arrays, set(reference))
        for name, array in arrays.items():
            _expect(name, array, np.float32, reference[name].shape)
        return {k: np.asarray(v, dtype=np.float32) for k, v in arrays.items()}


class Float16Codec:
    """IEEE half precision (2 bytes per value; relative error about 5e-4)."""

    name = "fp16"

    def encode(self, change: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
        """Each tensor rounded to float16."""
        return {
            k: np.asarray(v, np.float32).astype(np.float16) for k, v in change.items()
        }

    def decode(
        self, arrays: Mapping[str, np.ndarray], reference: Mapping[str, np.ndarray]
    ) -> AdapterState:
        """Each float16 array widened to float32."""
        _expect_names(arrays, set(reference))
        for name, array in arrays.items():
            _expect(name, array, np.float16, reference[name].shape)
        return {k: v.astype(np.float32) for k, v in arrays.items()}


class BFloat16Codec:
    """bfloat16 (2 bytes per value, float32's range, 8 bits of mantissa).

    numpy has no bfloat16, so the values travel as the upper 16 bits of their float32
    pattern (``uint16``), rounded to nearest even.
    """

    name = "bf16"

    def encode(self, change: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
        """Each tensor's float32 bits rounded to their upper half."""
        out = {}
        for name, value in change.items():
            value = np.ascontiguousarray(value, np.float32)
            bits = value.view(np.uint32)
            rounding = ((bits >> 16) & 1) + np.uint32(0x7FFF)
            upper = ((bits + rounding) >> 16).astype(np.uint16)
            # Rounding could carry a NaN's mantissa into the sign: keep it a NaN.
            out[name] = np.where(np.isnan(value), np.uint16(0x7FC0), upper)
        return out

    def decode(
        self, arrays: Mapping[str, np.ndarray], reference: Mapping[str, np.ndarray]
    ) -> AdapterState:
        """Each ``uint16`` array as the upper half of float32 values."""
        _expect_names(arrays, set(reference))
        for name, array in arrays.items():
            _expect(name, array, np.uint16, reference[name].shape)
        return {
            k: (v.astype(np.uint32) << 16).view(np.float32) for k, v in arrays.items()
        }


SCALE_SUFFIX = "#scale"
INDEX_SUFFIX = "#index"
VALUE_SUFFIX = "#value"


class Int8Codec:
    """8-bit integers with one float32 scale per tensor and stochastic rounding.

    ``q = floor(x / s + u)`` with ``u ~ U[0, 1)`` and ``s = max|x| / 127``, so the
    decoded value ``q * s`` is an unbiased estimate of ``x``: errors average out over
    clients instead of piling up.

    Parameters
    ----------
    seed : int
        Seeds the rounding noise (each client and round should use its own).
    """

    name = "int8"

    def __init__(self, seed: int = 0) -> None:
        self.rng = np.random.default_rng(seed)

    def encode(self, change: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
        """Each tensor as int8 codes and its scale."""
        out = {}
        # Sorted: the noise a tensor gets must not depend on the mapping's order (a
        # state read back from a checkpoint comes sorted).
        for name in sorted(change):
            value = change[name]
            value = np.asarray(value, np.float32)
            if not np.isfinite(value).all():
                # A NaN scale makes the receiver reject the tensor, as it would the
                # float32 values; codes alone could not say "not finite".
                out[name] = np.zeros(value.shape, np.int8)
                out[name + SCALE_SUFFIX] = np.asarray([np.nan], np.float32)
                continue
            peak = float(np.abs(value).max()) if value.size else 0.0
            tiny = float(np.finfo(np.float32).tiny)
            scale = max(peak / 127, tiny) if peak > 0 else 1.0
            noise = self.rng.random(value.shape, dtype=np.float32)
            codes = np.floor(value / scale + noise)
            out[name] = np.clip(codes, -127, 127).astype(np.int8)
            out[name + SCALE_SUFFIX] = np.asarray([scale], np.float32)
        return out

    def decode(
        self, arrays: Mapping[str, np.ndarray], reference: Mapping[str, np.ndarray]
    ) -> AdapterState:
        """Codes times scale, per tensor."""
        _expect_names(arrays, set(reference) | {k + SCALE_SUFFIX for k in reference})
        out = {}
        for name, shape in ((k, v.shape) for k, v in reference.items()):
            _expect(name, arrays[name], np.int8, shape)
            scale = arrays[name + SCALE_SUFFIX]
            _expect(name + SCALE_SUFFIX, scale, np.float32, (1,))
            if not (np.isfinite(scale).all() and scale[0] > 0):
                raise CodecError(f"'{name}{SCALE_SUFFIX}' must be finite and > 0")
            out[name] = arrays[name].astype(np.float32) * scale[0]
        return out


class Int4Codec:
    """4-bit integers in blocks: two codes per byte, one float32 scale per block of
    ``block`` consecutive values, stochastic rounding.

    Each tensor is flattened and cut into blocks; a block's codes are
    ``q = floor(x / s + u)`` in ``[-7, 7]`` with ``s = max|x| / 7`` over the block and
    ``u ~ U[0, 1)``, so ``q * s`` is an unbiased estimate of ``x``. Per-block scales
    keep one large value from flattening the rest of its tensor (as QLoRA's
    block-wise quantisation does). Codes travel offset by 8 (``1..15``), two to a
    ``uint8``, the even position in the low half.

    Parameters
    ----------
    seed : int
        Seeds the rounding noise (each client and round should use its own).
    block : int
        Values per scale.
    """

    name = "int4"
    LEVELS = 7

    def __init__(self, seed: int = 0, block: int = 128) -> None:
        if block < 2 or block % 2:
            raise ValueError(f"int4 block must be an even number >= 2, got {block}")
        self.rng = np.random.default_rng(seed)
        self.seed = seed
        self.block = block

    def encode(self, change: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
        """Each tensor as packed 4-bit codes and its block scales."""
        out = {}
        for name in sorted(change):  # sorted: the noise must not follow dict order
            flat = np.asarray(change[name], np.float32).ravel()
            blocks = -(-flat.size // self.block)
            padded = np.zeros(blocks * self.block, np.float32)
            padded[: flat.size] = flat
            padded = padded.reshape(blocks, self.block)
            if not np.isfinite(flat).all():
                # A NaN scale makes the receiver reject the tensor (see Int8Codec).
                out[name] = np.zeros(blocks * self.block // 2, np.uint8)
                out[name + SCALE_SUFFIX] = np.full(blocks, np.nan, np.float32)
                continue
            peak = np.abs(padded).max(axis=1)
            tiny = np.finfo(np.float32).tiny
            scale = np.where(peak > 0, np.maximum(peak / self.LEVELS, tiny), 1.0)
            scale = scale.astype(np.float32)
            noise = self.rng.random(padded.shape, dtype=np.float32)
            codes = np.floor(padded / scale[:, None] + noise)
            nibbles = (np.clip(codes, -self.LEVELS, self.LEVELS) + 8).astype(np.uint8)
            pairs = nibbles.reshape(-1, 2)
            out[name] = pairs[:, 0] | (pairs[:, 1] << 4)
            out[name + SCALE_SUFFIX] = scale
        return out

    def decode(
        self, arrays: Mapping[str, np.ndarray], reference: Mapping[str, np.ndarray]
    ) -> AdapterState:
        """Codes times their block's scale, per tensor, shaped as ``reference``."""
        _expect_names(arrays, set(reference) | {k + SCALE_SUFFIX for k in reference})
        out = {}
        for name, target in reference.items():
            blocks = -(-target.size // self.block)
            _expect(name, arrays[name], np.uint8, (blocks * self.block // 2,))
            scale = arrays[name + SCALE_SUFFIX]
            _expect(name + SCALE_SUFFIX, scale, np.float32, (blocks,))
            if not (np.isfinite(scale).all() and (scale > 0).all()):
                raise CodecError(f"'{name}{SCALE_SUFFIX}' must be finite and > 0")
            packed = arrays[name]
            nibbles = np.stack([packed & 0x0F, packed >> 4], axis=1).ravel()
            if (nibbles == 0).any():
                raise CodecError(f"'{name}' holds a 4-bit code outside -7..7")
            codes = nibbles.astype(np.float32).reshape(blocks, self.block) - 8
            values = (codes * scale[:, None]).ravel()[: target.size]
            out[name] = values.reshape(target.shape)
        return out


class TopKCodec:
    """The largest ``fraction`` of each tensor's values by magnitude, as int32
    positions and float32 values (8 bytes per kept value).

    What is dropped is not lost when the sender keeps it as error feedback
    (:meth:`encode_with_feedback`, Stich et al. 2018): it is added to the next round's
    update, so every coordinate eventually travels.

    Parameters
    ----------
    fraction : float
        Share of each tensor's values kept, in (0, 1].
    """

    name = "topk"

    def __init__(self, fraction: float) -> None:
        if not 0 < fraction <= 1:
            raise ValueError(f"top-k fraction must be in (0, 1], got {fraction}")
        self.fraction = fraction

    def encode(self, change: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
        """Each tensor's kept positions and values."""
        out = {}
        for name, value in change.items():
            flat = np.asarray(value, np.float32).ravel()
            # round() first: 0.07 * 100 is 7.000000000000001 in floating point.
            wanted = math.ceil(round(self.fraction * flat.size, 9))
            keep = max(1, wanted) if flat.size else 0
            index = np.argpartition(np.abs(flat), flat.size - keep)[flat.size - keep :]
            index = np.sort(index).astype(np.int32)
            out[name + INDEX_SUFFIX] = index
            out[name + VALUE_SUFFIX] = flat[index]
        return out

    def encode_with_feedback(
        self, change: Mapping[str, np.ndarray], residual: Mapping[str, np.ndarray]
    ) -> tuple[dict[str, np.ndarray], AdapterState]:
        """Encode ``change + residual``; return the arrays and the new residual (what
        the arrays leave out)."""
        compensated = {
            k: np.asarray(v, np.float32) + residual.get(k, np.float32(0))
            for k, v in change.items()
        }
        arrays = self.encode(compensated)
        sent = self.decode(arrays, compensated)
        # A non-finite value goes up (and gets the reply rejected) but is not kept:
        # it would poison every later upload of this site.
        return arrays, {
            k: np.where(
                np.isfinite(compensated[k]), compensated[k] - sent[k], 0
            ).astype(np.float32)
            for k in compensated
        }

    def decode(
        self, arrays: Mapping[str, np.ndarray], reference: Mapping[str, np.ndarray]
    ) -> AdapterState:
        """Zeros of ``reference``'s shapes with the sent values scattered in."""
        _expect_names(
            arrays,
            {k + INDEX_SUFFIX for k in reference}
            | {k + VALUE_SUFFIX for k in reference},
        )
        out = {}
        for name, target in reference.items():
            index, values = arrays[name + INDEX_SUFFIX], arrays[name + VALUE_SUFFIX]
            if index.dtype != np.int32 or values.dtype != np.float32:
                raise CodecError(
                    f"'{name}': top-k positions must be int32, values float32"
                )
            if index.ndim != 1 or index.shape != values.shape:
                raise CodecError(
                    f"'{name}': top-k positions and values differ in shape"
                )
            if index.size and (index.min() < 0 or index.max() >= target.size):
                raise CodecError(f"'{name}': a top-k position is out of range")
            if np.unique(index).size != index.size:
                raise CodecError(f"'{name}': a top-k position repeats")
            flat = np.zeros(target.size, np.float32)
            flat[index] = values
            out[name] = flat.reshape(target.shape)
        return out


def build_codec(name: str, topk_fraction: float = 0.05, seed: int = 0) -> Codec:
    """The codec called ``name`` (one of ``common.config.CODECS``)."""
    if name == "fp32":
        return Float32Codec()
    if name == "fp16":
        return Float16Codec()
    if name == "bf16":
        return BFloat16Codec()
    if name == "int8":
        return Int8Codec(seed)
    if name == "int4":
        return Int4Codec(seed)
    if name == "topk":
        return TopKCodec(topk_fraction)
    raise ValueError(f"unknown codec {name!r}")


def downlink_codec(codec: Codec) -> Codec:
    """The codec of the global adapter sent down: the same, except that top-k falls
    back to float32 (a sparse model is not a model; clients are stateless) and int4
    to int8 (the adapter itself goes down, not a delta, and every client trains from
    it: 4-bit rounding noise there would not average out over clients)."""
    if isinstance(codec, TopKCodec):
        return Float32Codec()
    if isinstance(codec, Int4Codec):
        return Int8Codec(codec.seed)
    return codec


def dense_reference(arrays: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
    """The tensors a downlink encoding (fp32, fp16, bf16 or int8) stands for, read
    from the arrays themselves: a receiver can decode the global adapter without
    knowing its shapes in advance."""
    return {k: v for k, v in arrays.items() if not k.endswith(SCALE_SUFFIX)}
