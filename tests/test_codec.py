"""Codecs of adapter deltas: round trips, error feedback, what decoding refuses, the
bytes each sends, the config keys, and each codec inside a federation.

Federations run through the real coordinator and ClientApp over ``InProcessGrid``
(conftest), once per codec per module, so that every reply can be inspected.
"""

from __future__ import annotations

import json
import logging
import math
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest
from flwr.app import Array, ArrayRecord, Context, Message, MessageType, RecordDict

from client.adapters import TOPK_RESIDUAL_RECORD, encode_upload
from client.client_app import app as client_app
from common import keys
from common.codec import (
    INDEX_SUFFIX,
    SCALE_SUFFIX,
    VALUE_SUFFIX,
    BFloat16Codec,
    Codec,
    CodecError,
    Float16Codec,
    Float32Codec,
    Int4Codec,
    Int8Codec,
    TopKCodec,
    build_codec,
    dense_reference,
    downlink_codec,
)
from common.config import CODECS, ConfigError, RunConfig
from common.wire import from_array_record
from server.server_app import coordinate
from tests.conftest import InProcessGrid, write_jsonl

DENSE_CODECS = ("fp32", "fp16", "bf16", "int8")
COMPRESSING = ("fp16", "bf16", "int8", "int4", "topk")


def sample_state(seed: int = 0) -> dict[str, np.ndarray]:
    """Two named float32 tensors of different shapes, magnitudes spread over decades."""
    rng = np.random.default_rng(seed)

    def tensor(shape: tuple[int, ...]) -> np.ndarray:
        magnitude = 10.0 ** rng.uniform(-3, 3, shape)
        return (rng.choice([-1.0, 1.0], shape) * magnitude).astype(np.float32)

    return {"a.lora_A.weight": tensor((8, 32)), "b.lora_B.weight": tensor((32, 8))}


def large_state(seed: int = 0) -> dict[str, np.ndarray]:
    """Four 64 x 128 tensors (large enough that per-tensor extras do not matter)."""
    rng = np.random.default_rng(seed)
    return {
        f"layer.{i}.weight": rng.normal(size=(64, 128)).astype(np.float32)
        for i in range(4)
    }


def total_nbytes(arrays: Mapping[str, np.ndarray]) -> int:
    return sum(array.nbytes for array in arrays.values())


# -- round trips -----------------------------------------------------------------------


def test_fp32_round_trip_is_exact() -> None:
    # Prepare
    state, codec = sample_state(), Float32Codec()

    # Execute
    decoded = codec.decode(codec.encode(state), state)

    # Assert
    assert decoded.keys() == state.keys()
    for name, value in state.items():
        assert decoded[name].dtype == np.float32
        np.testing.assert_array_equal(decoded[name], value)


@pytest.mark.parametrize(
    ("codec", "wire_dtype", "relative_error"),
    [
        # Unit roundoff: half of the spacing at 1, 2^-11 (fp16) and 2^-8 (bf16).
        (Float16Codec(), np.float16, 2.0**-11),
        (BFloat16Codec(), np.uint16, 2.0**-8),
    ],
    ids=["fp16", "bf16"],
)
def test_half_precision_round_trip_is_within_its_relative_error(
    codec: Codec, wire_dtype: type, relative_error: float
) -> None:
    # Prepare: magnitudes 1e-3 .. 1e3 stay in fp16's normal range
    state = sample_state()

    # Execute
    arrays = codec.encode(state)
    decoded = codec.decode(arrays, state)

    # Assert
    for name, value in state.items():
        assert arrays[name].dtype == wire_dtype and arrays[name].shape == value.shape
        assert decoded[name].dtype == np.float32
        error = np.abs(decoded[name] - value) / np.abs(value)
        assert error.max() <= relative_error
        assert error.max() > 0  # the values really were rounded


@pytest.mark.parametrize(
    ("float32_bits", "bfloat16_bits"),
    [
        (0x3F800000, 0x3F80),  # 1.0: exact
        (0x3F807FFF, 0x3F80),  # just below half way: down
        (0x3F808001, 0x3F81),  # just above half way: up
        (0x3F808000, 0x3F80),  # half way, even below: stays even
        (0x3F818000, 0x3F82),  # half way, odd below: up to even
        (0xBF818000, 0xBF82),  # negative half way, odd below: away from zero
        (0x7F7FFFFF, 0x7F80),  # largest float32 rounds up to infinity
        (0x7F800000, 0x7F80),  # infinity stays infinity
        (0x00000000, 0x0000),  # zero
        (0x80000000, 0x8000),  # negative zero
    ],
)
def test_bf16_rounds_to_nearest_even(float32_bits: int, bfloat16_bits: int) -> None:
    # Prepare
    value = np.array([float32_bits], np.uint32).view(np.float32)

    # Execute
    encoded = BFloat16Codec().encode({"w": value})["w"]

    # Assert
    assert encoded.dtype == np.uint16
    assert int(encoded[0]) == bfloat16_bits


def test_bf16_bits_match_torch_bfloat16() -> None:
    # Prepare
    import torch

    value = np.random.default_rng(3).normal(scale=10, size=4096).astype(np.float32)

    # Execute
    ours = BFloat16Codec().encode({"w": value})["w"]
    theirs = torch.from_numpy(value).to(torch.bfloat16).view(torch.int16).numpy()

    # Assert
    np.testing.assert_array_equal(ours, theirs.view(np.uint16))


def test_int8_error_is_at_most_one_scale_step_per_value() -> None:
    # Prepare
    state = {
        name: np.random.default_rng(1).normal(size=value.shape).astype(np.float32)
        for name, value in sample_state().items()
    }
    codec = Int8Codec(seed=5)

    # Execute
    arrays = codec.encode(state)
    decoded = codec.decode(arrays, state)

    # Assert
    for name, value in state.items():
        scale = float(arrays[name + SCALE_SUFFIX][0])
        assert arrays[name].dtype == np.int8
        assert scale == pytest.approx(np.abs(value).max() / 127, rel=1e-6)
        assert np.abs(decoded[name] - value).max() <= scale * (1 + 1e-6)


def test_int8_is_unbiased_over_many_seeded_encodings() -> None:
    # Prepare: values between the grid points, where rounding must go both ways
    rng = np.random.default_rng(2)
    value = rng.uniform(-1, 1, size=64).astype(np.float32)
    value[0] = 1.0  # fixes the scale at 1/127
    state, trials = {"w": value}, 4000
    scale = 1 / 127

    # Execute
    total = np.zeros_like(value, dtype=np.float64)
    for seed in range(trials):
        codec = Int8Codec(seed=seed)
        total += codec.decode(codec.encode(state), state)["w"]
    mean = total / trials

    # Assert: each coordinate's std is at most scale / 2; allow 5 standard errors
    assert np.abs(mean - value).max() <= 5 * (scale / 2) / math.sqrt(trials)


def test_int8_encodes_a_zero_tensor_as_zeros_with_a_valid_scale() -> None:
    # Prepare
    state = {"w": np.zeros((4, 3), np.float32)}
    codec = Int8Codec()

    # Execute
    arrays = codec.encode(state)
    decoded = codec.decode(arrays, state)

    # Assert
    assert not arrays["w"].any()
    assert np.isfinite(arrays["w" + SCALE_SUFFIX]).all()
    assert arrays["w" + SCALE_SUFFIX][0] > 0
    np.testing.assert_array_equal(decoded["w"], state["w"])


def test_int4_error_is_at_most_one_block_step_per_value() -> None:
    # Prepare: sizes that do not fill their last block, and one that is a single
    # value
    rng = np.random.default_rng(3)
    state = {
        "odd": rng.normal(size=(7, 45)).astype(np.float32),
        "one": np.array([0.25], np.float32),
        "big": rng.normal(size=(8, 256)).astype(np.float32),
    }
    codec = Int4Codec(seed=1)

    # Execute
    decoded = codec.decode(codec.encode(state), state)

    # Assert
    for name, value in state.items():
        flat = np.zeros(-(-value.size // 128) * 128, np.float32)
        flat[: value.size] = value.ravel()
        step = np.repeat(np.abs(flat.reshape(-1, 128)).max(axis=1) / 7, 128)
        error = np.abs(decoded[name].ravel() - value.ravel())
        assert decoded[name].shape == value.shape
        assert (error <= step[: value.size] * (1 + 1e-6)).all(), name


def test_int4_is_unbiased_over_many_seeded_encodings() -> None:
    # Prepare
    state = {"w": np.random.default_rng(0).normal(size=(4, 64)).astype(np.float32)}
    step = float(np.abs(state["w"][:2]).max()) / 7  # the first block's step

    # Execute
    mean = np.mean(
        [
            Int4Codec(seed).decode(Int4Codec(seed).encode(state), state)["w"]
            for seed in range(2000)
        ],
        axis=0,
    )

    # Assert: the standard error of 2000 draws is at most step / 2 / sqrt(2000)
    assert np.abs(mean - state["w"]).max() < 5 * step / 2 / math.sqrt(2000)


def test_int4_block_scales_keep_one_outlier_from_flattening_its_tensor() -> None:
    # Prepare: one value a thousand times the rest, in the first block only
    rng = np.random.default_rng(2)
    value = rng.normal(scale=1e-3, size=1024).astype(np.float32)
    value[0] = 1.0
    state = {"w": value}

    # Execute
    decoded = Int4Codec(seed=0).decode(Int4Codec(seed=0).encode(state), state)["w"]

    # Assert: blocks without the outlier keep their own resolution
    rest = slice(128, None)
    assert np.abs(decoded[rest] - value[rest]).max() <= np.abs(value[rest]).max() / 7
    assert np.corrcoef(decoded[rest], value[rest])[0, 1] > 0.9


def test_int4_packs_two_codes_a_byte_offset_by_eight() -> None:
    codec = Int4Codec(seed=0)
    state = {"w": np.array([-7.0, 7.0, 0.0, 3.0], np.float32)}  # scale 1: exact
    arrays = codec.encode(state)
    assert arrays["w"].tolist() == [1 | (15 << 4), 8 | (11 << 4)] + [0x88] * 62
    assert arrays["w" + SCALE_SUFFIX].tolist() == [1.0]


def test_int4_does_not_turn_a_nan_change_into_finite_values() -> None:
    state = {"w": np.array([0.001, np.nan, -0.002], np.float32)}
    codec = Int4Codec()
    with np.errstate(invalid="ignore"):
        arrays = codec.encode(state)
    with pytest.raises(CodecError, match="finite and > 0"):
        codec.decode(arrays, state)


@pytest.mark.parametrize(
    ("fraction", "size"),
    [
        (0.05, 256),
        (0.1, 64),
        (0.25, 8),
        (1.0, 17),
        (0.001, 10),  # at least one value always travels
        (0.07, 100),  # 0.07 * 100 is 7.000000000000001 in floating point
    ],
)
def test_topk_keeps_exactly_the_largest_magnitudes_and_zeros_the_rest(
    fraction: float, size: int
) -> None:
    # Prepare: distinct magnitudes, signs mixed, so the top k is unique
    rng = np.random.default_rng(4)
    magnitudes = rng.permutation(np.arange(1, size + 1)).astype(np.float32)
    value = magnitudes * rng.choice([-1.0, 1.0], size).astype(np.float32)
    state = {"w": value.reshape(1, size)}
    codec = TopKCodec(fraction)
    expected_k = max(1, math.ceil(round(fraction * size, 9)))

    # Execute
    arrays = codec.encode(state)
    decoded = codec.decode(arrays, state)["w"].ravel()

    # Assert
    assert arrays["w" + INDEX_SUFFIX].dtype == np.int32
    assert arrays["w" + VALUE_SUFFIX].dtype == np.float32
    kept = np.flatnonzero(decoded)
    assert kept.size == expected_k
    threshold = size - expected_k  # magnitudes above it are the k largest
    np.testing.assert_array_equal(np.sort(kept), np.flatnonzero(magnitudes > threshold))
    np.testing.assert_array_equal(decoded[kept], value[kept])


# -- error feedback --------------------------------------------------------------------


def test_topk_error_feedback_loses_nothing_over_rounds() -> None:
    # Prepare: the same change every round
    change = sample_state(seed=7)
    codec, rounds = TopKCodec(0.1), 6
    residual: dict[str, np.ndarray] = {}
    sent_total = {k: np.zeros_like(v, dtype=np.float64) for k, v in change.items()}

    # Execute
    for _ in range(rounds):
        arrays, residual = codec.encode_with_feedback(change, residual)
        for name, value in codec.decode(arrays, change).items():
            sent_total[name] += value

    # Assert: what was sent plus what is still held is every change made
    for name, value in change.items():
        np.testing.assert_allclose(
            sent_total[name] + residual[name],
            rounds * value.astype(np.float64),
            rtol=1e-5,
            atol=1e-5 * np.abs(value).max(),
        )


def test_topk_residual_is_exactly_what_the_arrays_leave_out() -> None:
    # Prepare
    change, held = sample_state(seed=8), sample_state(seed=9)
    codec = TopKCodec(0.2)

    # Execute
    arrays, residual = codec.encode_with_feedback(change, held)

    # Assert
    for name in change:
        compensated = change[name] + held[name]
        index = arrays[name + INDEX_SUFFIX]
        flat_residual = residual[name].ravel()
        np.testing.assert_array_equal(
            arrays[name + VALUE_SUFFIX], compensated.ravel()[index]
        )
        assert not flat_residual[index].any()
        left_out = np.setdiff1d(np.arange(compensated.size), index)
        np.testing.assert_array_equal(
            flat_residual[left_out], compensated.ravel()[left_out]
        )


def test_encode_upload_keeps_the_topk_residual_in_the_context_state() -> None:
    # Prepare
    context = Context(
        run_id=1, node_id=7, node_config={}, state=RecordDict(), run_config={}
    )
    change, codec = sample_state(seed=10), TopKCodec(0.1)
    sent_total = {k: np.zeros_like(v) for k, v in change.items()}

    # Execute: two rounds of the same change through the site's context
    for _ in range(2):
        arrays = encode_upload(codec, change, context)
        for name, value in codec.decode(arrays, change).items():
            sent_total[name] += value

    # Assert
    assert TOPK_RESIDUAL_RECORD in context.state.array_records
    residual = from_array_record(context.state.array_records[TOPK_RESIDUAL_RECORD])
    for name, value in change.items():
        np.testing.assert_allclose(
            sent_total[name] + residual[name], 2 * value, rtol=1e-5, atol=1e-3
        )


def test_encode_upload_ignores_a_residual_of_another_shape() -> None:
    # Prepare: a residual left by tensors of other shapes (another phase)
    context = Context(
        run_id=1, node_id=7, node_config={}, state=RecordDict(), run_config={}
    )
    change, codec = sample_state(seed=11), TopKCodec(0.1)
    context.state[TOPK_RESIDUAL_RECORD] = ArrayRecord(
        {name: Array(np.ones((3, 3), np.float32)) for name in change}
    )

    # Execute
    arrays = encode_upload(codec, change, context)

    # Assert: as if there were no residual
    np.testing.assert_equal(arrays, codec.encode(change))


@pytest.mark.parametrize("name", DENSE_CODECS)
def test_encode_upload_of_a_dense_codec_leaves_the_context_state_alone(
    name: str,
) -> None:
    context = Context(
        run_id=1, node_id=7, node_config={}, state=RecordDict(), run_config={}
    )
    encode_upload(build_codec(name), sample_state(), context)
    assert TOPK_RESIDUAL_RECORD not in context.state.array_records


# -- what decoding refuses -------------------------------------------------------------


Corruption = Callable[[dict[str, np.ndarray]], None]
TARGET = "b.lora_B.weight"  # the tensor each corruption touches


def _set(key: str, value: np.ndarray) -> Corruption:
    def corrupt(arrays: dict[str, np.ndarray]) -> None:
        arrays[key] = value

    return corrupt


def _rename(old: str, new: str) -> Corruption:
    def corrupt(arrays: dict[str, np.ndarray]) -> None:
        arrays[new] = arrays.pop(old)

    return corrupt


def _recast(key: str, dtype: type) -> Corruption:
    def corrupt(arrays: dict[str, np.ndarray]) -> None:
        arrays[key] = arrays[key].astype(dtype)

    return corrupt


def _reshape(key: str) -> Corruption:
    def corrupt(arrays: dict[str, np.ndarray]) -> None:
        arrays[key] = arrays[key].reshape(-1)

    return corrupt


def _first_index(value: int | None) -> Corruption:
    """Set the first top-k position to ``value`` (``None``: repeat the second)."""

    def corrupt(arrays: dict[str, np.ndarray]) -> None:
        index = arrays[TARGET + INDEX_SUFFIX].copy()
        index[0] = index[1] if value is None else value
        arrays[TARGET + INDEX_SUFFIX] = index

    return corrupt


SIZE = 32 * 8  # TARGET's number of values
SCALE = TARGET + SCALE_SUFFIX
INDEX, VALUE = TARGET + INDEX_SUFFIX, TARGET + VALUE_SUFFIX

REFUSALS = [
    # (codec, corruption, words the message must hold besides the tensor's name)
    *[
        pytest.param(codec, corruption, words, id=f"{codec}-{case}")
        for codec in DENSE_CODECS
        for case, corruption, words in (
            ("missing", lambda a: a.pop(TARGET), "missing"),
            ("renamed", _rename(TARGET, TARGET + ".x"), "unexpected"),
            ("dtype", _recast(TARGET, np.float64), "dtype"),
            ("shape", _reshape(TARGET), "shape"),
        )
    ],
    pytest.param("int8", lambda a: a.pop(SCALE), "missing", id="int8-no-scale"),
    pytest.param("int8", _recast(SCALE, np.float64), "dtype", id="int8-scale-dtype"),
    pytest.param(
        "int8", _set(SCALE, np.ones(2, np.float32)), "shape", id="int8-scale-shape"
    ),
    *[
        pytest.param(
            "int8",
            _set(SCALE, np.array([bad], np.float32)),
            "finite and > 0",
            id=f"int8-scale-{bad}",
        )
        for bad in (0.0, -1.0, math.nan, math.inf)
    ],
    pytest.param("int4", lambda a: a.pop(SCALE), "missing", id="int4-no-scale"),
    pytest.param("int4", _recast(TARGET, np.int8), "dtype", id="int4-codes-dtype"),
    pytest.param(
        "int4", _set(TARGET, np.zeros(3, np.uint8) + 0x88), "shape", id="int4-length"
    ),
    pytest.param(
        "int4", _set(SCALE, np.ones(3, np.float32)), "shape", id="int4-scale-shape"
    ),
    pytest.param(
        "int4",
        _set(SCALE, np.array([0.0, 1.0], np.float32)),
        "finite and > 0",
        id="int4-scale-zero",
    ),
    pytest.param(
        "int4",
        _set(TARGET, np.zeros(SIZE // 2, np.uint8)),
        "outside -7..7",
        id="int4-code-zero",
    ),
    pytest.param("topk", lambda a: a.pop(INDEX), "missing", id="topk-no-index"),
    pytest.param("topk", _rename(VALUE, TARGET), "unexpected", id="topk-renamed"),
    pytest.param("topk", _recast(INDEX, np.int64), "int32", id="topk-index-dtype"),
    pytest.param("topk", _recast(VALUE, np.float16), "float32", id="topk-value-dtype"),
    pytest.param(
        "topk", _set(INDEX, np.arange(3, dtype=np.int32)), "shape", id="topk-lengths"
    ),
    pytest.param("topk", _first_index(SIZE), "out of range", id="topk-past-end"),
    pytest.param("topk", _first_index(-1), "out of range", id="topk-negative"),
    pytest.param("topk", _first_index(None), "repeats", id="topk-repeated"),
]


@pytest.mark.parametrize(("name", "corrupt", "words"), REFUSALS)
def test_decoding_refuses_bad_arrays_naming_the_tensor(
    name: str, corrupt: Corruption, words: str
) -> None:
    # Prepare
    state = sample_state()
    codec = build_codec(name, topk_fraction=0.25)
    arrays = codec.encode(state)
    corrupt(arrays)

    # Execute
    with pytest.raises(CodecError) as raised:
        codec.decode(arrays, state)

    # Assert
    assert TARGET in str(raised.value) and words in str(raised.value)


# -- bytes -----------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("name", "low", "high"),
    [
        ("fp32", 1.0, 1.0),
        ("fp16", 0.5, 0.5),
        ("bf16", 0.5, 0.5),
        ("int8", 0.25, 0.2502),  # one byte a value and a 4-byte scale per tensor
        ("int4", 0.1328, 0.1329),  # half a byte a value, 4 bytes per 128 values
        ("topk", 2 * 0.0625, 2 * 0.0625),  # 8 bytes per kept value
    ],
)
def test_encoded_bytes_are_the_codecs_share_of_float32(
    name: str, low: float, high: float
) -> None:
    # Prepare
    state = large_state()
    codec = build_codec(name, topk_fraction=0.0625)

    # Execute
    ratio = total_nbytes(codec.encode(state)) / total_nbytes(state)

    # Assert
    assert low <= ratio <= high


# -- configuration ---------------------------------------------------------------------


@pytest.mark.parametrize(
    ("flat", "key"),
    [
        ({"codec": "fp8"}, "codec"),
        ({"codec": "FP16"}, "codec"),
        ({"codec.topk-fraction": 0.0}, "codec.topk-fraction"),
        ({"codec.topk-fraction": -0.1}, "codec.topk-fraction"),
        ({"codec.topk-fraction": 1.5}, "codec.topk-fraction"),
        ({"codec.topk-fraction": "nan"}, "codec.topk-fraction"),
        ({"codec.topk-fraction": "a lot"}, "codec.topk-fraction"),
    ],
)
def test_an_invalid_codec_setting_is_refused_naming_its_key(
    flat: dict[str, object], key: str
) -> None:
    with pytest.raises(ConfigError, match=f"config key '{key}'"):
        RunConfig.from_flat(flat)


def test_topk_is_refused_with_secure_aggregation() -> None:
    with pytest.raises(ConfigError, match="config key 'codec'.*masks cannot sum"):
        RunConfig.from_flat({"codec": "topk", "secagg.enabled": True})


@pytest.mark.parametrize(
    ("name", "ring_bits"),
    [("fp32", 32), ("fp16", 16), ("bf16", 16), ("int8", 16), ("int4", 16)],
)
def test_dense_codecs_pick_the_ring_of_secure_aggregation(
    name: str, ring_bits: int
) -> None:
    config = RunConfig.from_flat({"codec": name, "secagg.enabled": True})
    assert config.secagg.enabled and config.codec.secure_ring_bits == ring_bits


@pytest.mark.parametrize("mode", ["central", "distributed"])
def test_the_16_bit_ring_is_refused_with_client_level_dp(mode: str) -> None:
    with pytest.raises(ConfigError, match="config key 'codec'.*dp.clip-norm"):
        RunConfig.from_flat(
            {
                "codec": "int8",
                "secagg.enabled": True,
                "dp.enabled": True,
                "dp.mode": mode,
            }
        )


@pytest.mark.parametrize("name", ["topk", "int4"])
def test_flexlora_refuses_a_codec_that_flattens_the_factors(name: str) -> None:
    with pytest.raises(ConfigError, match="config key 'codec'.*flexlora"):
        RunConfig.from_flat({"aggregation": "flexlora", "codec": name})


@pytest.mark.parametrize("name", DENSE_CODECS)
def test_flexlora_accepts_a_dense_codec(name: str) -> None:
    config = RunConfig.from_flat({"aggregation": "flexlora", "codec": name})
    assert config.codec.name == name


def test_every_configurable_codec_builds_with_its_name() -> None:
    assert [build_codec(name).name for name in CODECS] == list(CODECS)


def test_the_downlink_is_fp32_for_topk_int8_for_int4_and_the_codec_otherwise() -> None:
    for name in CODECS:
        codec = build_codec(name)
        expected = {"topk": "fp32", "int4": "int8"}.get(name, name)
        assert downlink_codec(codec).name == expected


@pytest.mark.parametrize("name", DENSE_CODECS)
def test_a_dense_encoding_decodes_without_knowing_the_shapes(name: str) -> None:
    # Prepare: the client's view of the global adapter: arrays only
    state = sample_state()
    codec = build_codec(name)
    arrays = codec.encode(state)

    # Execute
    decoded = codec.decode(arrays, dense_reference(arrays))

    # Assert
    assert {k: v.shape for k, v in decoded.items()} == {
        k: v.shape for k, v in state.items()
    }


# -- in a federation -------------------------------------------------------------------

NODES = (101, 202)


@dataclass
class FederatedRun:
    """What a 2-round in-process federation left behind."""

    grid: InProcessGrid
    rows: list[dict[str, object]]
    residual_after_round_1: dict[int, dict[str, np.ndarray]]

    def train_replies(self) -> list[Message]:
        return [
            reply
            for reply in self.grid.received
            if not reply.has_error()
            and keys.ADAPTER_RECORD in reply.content.array_records
        ]

    def train_messages(self) -> list[Message]:
        return [
            m for m in self.grid.sent if m.metadata.message_type == MessageType.TRAIN
        ]


def _rows_with_domains() -> list[dict[str, object]]:
    rows = []
    for domain, labels in (
        ("bank", ("send", "balance")),
        ("travel", ("flight", "hotel")),
    ):
        for label in labels:
            for index in range(3):
                text = f"please {label} number {index} my account"
                rows.append({"text": text, "label": label, "domain": domain})
    return rows


def _federate(
    backbone: Path, folder: Path, codec: str, tamper: Callable | None = None
) -> FederatedRun:
    data = write_jsonl(folder / "small.jsonl", _rows_with_domains())
    configs = {
        node: {
            "partition-id": index,
            "num-partitions": len(NODES),
            "cache-dir": str(folder / "cache" / str(node)),
        }
        for index, node in enumerate(NODES)
    }
    grid = InProcessGrid(client_app, configs)
    residuals: dict[int, dict[str, np.ndarray]] = {}
    rounds_seen: dict[int, int] = {}

    def watch(node: int, reply: Message) -> Message | None:
        # The site's context right after its round-1 update (not its status reply).
        if not reply.has_error() and keys.ADAPTER_RECORD in reply.content.array_records:
            rounds_seen[node] = rounds_seen.get(node, 0) + 1
            state = grid.contexts[node].state.array_records
            if rounds_seen[node] == 1 and TOPK_RESIDUAL_RECORD in state:
                residuals[node] = from_array_record(state[TOPK_RESIDUAL_RECORD])
        return tamper(node, reply) if tamper is not None else reply

    grid.tamper = watch
    config = RunConfig.from_flat(
        {
            "model.name": str(backbone),
            "data.path": str(data),
            "data.partition": "column:domain",
            "sim.num-clients": 2,
            "num-server-rounds": 2,
            "train.batch-size": 4,
            "train.lr": 0.01,
            "data.holdout-fraction": 0.25,
            "codec": codec,
            "codec.topk-fraction": 0.05,
            "output.dir": str(folder / "out"),
        }
    )
    coordinate(grid, config)  # type: ignore[arg-type]
    rows = [
        json.loads(line)
        for line in (folder / "out" / "metrics.jsonl").read_text().splitlines()
    ]
    return FederatedRun(grid, rows, residuals)


@pytest.fixture(scope="module")
def federation(
    tiny_backbone: Path, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[Callable[[str], FederatedRun]]:
    """One clean 2-round federation per codec, run on first use in this module."""
    runs: dict[str, FederatedRun] = {}

    def run(codec: str) -> FederatedRun:
        if codec not in runs:
            folder = tmp_path_factory.mktemp(f"federation-{codec}")
            runs[codec] = _federate(tiny_backbone, folder, codec)
        return runs[codec]

    yield run


@pytest.mark.parametrize("codec", CODECS)
def test_a_two_round_federation_completes_with_each_codec(
    codec: str, federation: Callable[[str], FederatedRun]
) -> None:
    rows = federation(codec).rows
    assert [row["round"] for row in rows] == [0, 1, 2]
    for row in rows[1:]:
        assert (row["clients"], row["rejected"], row["failed"]) == (2, 0, 0), codec
        assert np.isfinite(row["eval_loss"])


def _wire_dtypes(record: ArrayRecord) -> dict[str, np.dtype]:
    return {name: array.numpy().dtype for name, array in record.items()}


@pytest.mark.parametrize(
    ("codec", "expected"),
    [
        ("fp32", {"": np.float32}),
        ("fp16", {"": np.float16}),
        ("bf16", {"": np.uint16}),
        ("int8", {"": np.int8, SCALE_SUFFIX: np.float32}),
        ("int4", {"": np.uint8, SCALE_SUFFIX: np.float32}),
        ("topk", {INDEX_SUFFIX: np.int32, VALUE_SUFFIX: np.float32}),
    ],
)
def test_replies_carry_the_codecs_wire_dtypes(
    codec: str,
    expected: dict[str, type],
    federation: Callable[[str], FederatedRun],
) -> None:
    # Prepare
    replies = federation(codec).train_replies()

    # Assert: every array of every reply has its suffix's dtype, and every suffix
    # the codec sends appears
    assert len(replies) == 2 * len(NODES)
    for reply in replies:
        dtypes = _wire_dtypes(reply.content.array_records[keys.ADAPTER_RECORD])
        suffixes = {("#" + n.split("#")[1]) if "#" in n else "" for n in dtypes}
        assert suffixes == set(expected), codec
        for name, dtype in dtypes.items():
            suffix = ("#" + name.split("#")[1]) if "#" in name else ""
            assert dtype == expected[suffix], (codec, name)


@pytest.mark.parametrize("codec", COMPRESSING)
def test_compressing_codecs_upload_fewer_bytes_per_round_than_fp32(
    codec: str, federation: Callable[[str], FederatedRun]
) -> None:
    full = [row["bytes_up"] for row in federation("fp32").rows[1:]]
    compressed = [row["bytes_up"] for row in federation(codec).rows[1:]]
    assert all(0 < c < f for c, f in zip(compressed, full, strict=True)), (
        compressed,
        full,
    )


@pytest.mark.parametrize(
    ("codec", "expected"),
    [
        ("fp32", {"": np.float32}),
        ("int8", {"": np.int8, SCALE_SUFFIX: np.float32}),
        ("int4", {"": np.int8, SCALE_SUFFIX: np.float32}),  # the adapter itself
        ("topk", {"": np.float32}),  # a sparse model is not a model
    ],
)
def test_the_global_adapter_goes_down_in_the_downlink_codec(
    codec: str,
    expected: dict[str, type],
    federation: Callable[[str], FederatedRun],
) -> None:
    # Prepare
    messages = federation(codec).train_messages()

    # Assert: (round 1 is sent twice: again after the backbone reached the sites)
    assert len(messages) >= 2 * len(NODES)
    for message in messages:
        dtypes = _wire_dtypes(message.content.array_records[keys.ADAPTER_RECORD])
        for name, dtype in dtypes.items():
            suffix = ("#" + name.split("#")[1]) if "#" in name else ""
            assert dtype == expected[suffix], (codec, name)


def test_int8_downlink_costs_fewer_bytes_and_topk_the_same_as_fp32(
    federation: Callable[[str], FederatedRun],
) -> None:
    def down(codec: str) -> list[int]:
        return [row["bytes_down"] for row in federation(codec).rows[1:]]

    assert all(i < f for i, f in zip(down("int8"), down("fp32"), strict=True))
    assert down("topk") == down("fp32")


def test_topk_sites_hold_a_residual_after_round_1(
    federation: Callable[[str], FederatedRun],
) -> None:
    # Prepare
    run = federation("topk")
    first_replies = {
        r.metadata.src_node_id: from_array_record(
            r.content.array_records[keys.ADAPTER_RECORD]
        )
        for r in run.train_replies()[: len(NODES)]
    }

    # Assert: each site keeps a residual that is zero exactly where it sent values
    assert set(run.residual_after_round_1) == set(NODES)
    for node, residual in run.residual_after_round_1.items():
        arrays = first_replies[node]
        assert {n + INDEX_SUFFIX for n in residual} == {
            n for n in arrays if n.endswith(INDEX_SUFFIX)
        }
        assert any(np.abs(v).sum() > 0 for v in residual.values())
        for name, value in residual.items():
            assert value.dtype == np.float32
            assert not value.ravel()[arrays[name + INDEX_SUFFIX]].any()


def test_dense_codecs_keep_no_residual(
    federation: Callable[[str], FederatedRun],
) -> None:
    run = federation("int8")
    assert run.residual_after_round_1 == {}
    for context in run.grid.contexts.values():
        assert TOPK_RESIDUAL_RECORD not in context.state.array_records


def _nan_scales(bad_node: int) -> Callable[[int, Message], Message]:
    def tamper(sender: int, reply: Message) -> Message:
        records = reply.content.array_records
        if (
            sender == bad_node
            and not reply.has_error()
            and keys.ADAPTER_RECORD in records
        ):
            arrays = {k: v.numpy() for k, v in records[keys.ADAPTER_RECORD].items()}
            for name in arrays:
                if name.endswith(SCALE_SUFFIX):
                    arrays[name] = np.full_like(arrays[name], np.nan)
            records[keys.ADAPTER_RECORD] = ArrayRecord(
                {k: Array(v) for k, v in arrays.items()}
            )
        return reply

    return tamper


def test_a_reply_with_a_nan_int8_scale_is_rejected_and_counted(
    tiny_backbone: Path, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    # Execute
    with caplog.at_level(logging.WARNING):
        run = _federate(tiny_backbone, tmp_path, "int8", tamper=_nan_scales(202))

    # Assert
    for row in run.rows[1:]:
        assert (row["rejected"], row["clients"]) == (1, 1)
        assert np.isfinite(row["eval_loss"])
    assert "node 202: update rejected" in caplog.text
    assert SCALE_SUFFIX in caplog.text and "finite and > 0" in caplog.text


def test_int8_does_not_turn_a_nan_change_into_finite_values() -> None:
    # Prepare: a diverged client's change
    state = {"w": np.array([0.001, np.nan, -0.002], np.float32)}
    codec = Int8Codec()

    # Execute
    with np.errstate(invalid="ignore"):
        arrays = codec.encode(state)
    try:
        decoded = codec.decode(arrays, state)
    except CodecError:
        return  # refusing it is fine too

    # Assert
    assert not np.isfinite(decoded["w"]).all()


def test_a_nan_sent_by_topk_does_not_stay_in_the_residual() -> None:
    codec = TopKCodec(0.5)
    change = {"w": np.array([np.nan, 0.1, 0.2, 0.3], np.float32)}
    _, residual = codec.encode_with_feedback(change, {})
    assert np.isfinite(residual["w"]).all()
