"""The ``codec.*`` keys: how tensors travel."""

from __future__ import annotations

from dataclasses import dataclass

from common.config.keys import one_of, setting, share

CODECS = ("fp32", "fp16", "bf16", "int8", "int4", "topk")


@dataclass(frozen=True)
class CodecConfig:
    """How tensors travel (``codec``)."""

    name: str = setting(
        "codec",
        "fp32",
        "how deltas go up and the global adapter comes down: `fp32` (lossless), "
        "`fp16`, `bf16`, `int8` (stochastic rounding, one scale per tensor), `int4` "
        "(stochastic rounding, one scale per block of 128 values, two codes a byte; "
        "the downlink goes in `int8`) or `topk` (largest values, client-side error "
        "feedback; the downlink stays fp32). Behind secure aggregation: `fp32` sums "
        "in a 32-bit ring, `fp16`/`bf16`/`int8`/`int4` in a 16-bit ring; `topk` is "
        "refused, and `topk` and `int4` are refused with `aggregation = flexlora`",
        check=one_of(CODECS),
    )
    topk_fraction: float = setting(
        "codec.topk-fraction",
        0.05,
        "share of each tensor's values `topk` keeps",
        check=share(),
    )

    @property
    def secure_ring_bits(self) -> int:
        """The ring secure aggregation sums in with this codec: 32 bits for
        ``fp32``; 16 for ``fp16``, ``bf16``, ``int8`` and ``int4``, which then
        quantise in the fixed-point encoding itself (a rotated delta, stochastic
        rounding: half of fp32's upload)."""
        return 32 if self.name == "fp32" else 16
