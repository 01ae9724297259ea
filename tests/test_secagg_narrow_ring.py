"""The 16-bit ring of secure aggregation (the quantising codecs): a public rotation
spreads each delta over its coordinates, stochastic rounding keeps the sum unbiased,
and the masks cancel in Z_(2^16) as they do in Z_(2^32)."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pytest

from common import keys
from common.secagg.encoding import FixedPoint, HeadroomError, round_encoding
from common.secagg.rotation import (
    BLOCK,
    coordinate_bound,
    rotate,
    rotated_length,
    unrotate,
)
from tests.test_secagg_federation import NODES, final_adapter, run, six_site_data
from tests.test_secagg_protocol import run_protocol

__all__ = ["six_site_data"]  # a fixture, used by name

SEED = bytes(range(32))


@pytest.mark.parametrize("length", [1, 5, 4096, 4097, 77_578])
def test_the_rotation_keeps_the_norm_and_is_undone_exactly(length: int) -> None:
    vector = np.random.default_rng(length).normal(size=length)
    rotated = rotate(vector, SEED)
    assert rotated.size == rotated_length(length) >= length
    assert np.linalg.norm(rotated) == pytest.approx(np.linalg.norm(vector))
    np.testing.assert_allclose(unrotate(rotated, SEED, length), vector, atol=1e-9)


def test_the_rotation_spreads_a_spike_over_its_block() -> None:
    # Prepare: the worst case for a coordinate bound, all the norm in one place
    spike = np.zeros(10_000)
    spike[123] = 3.0

    # Execute
    rotated = rotate(spike, SEED)

    # Assert: every coordinate of the spike's block holds 3 / sqrt(block)
    assert np.abs(rotated).max() == pytest.approx(3.0 / math.sqrt(BLOCK))
    assert np.abs(rotated).max() < coordinate_bound(3.0)


def test_other_seeds_give_other_rotations() -> None:
    vector = np.random.default_rng(0).normal(size=300)
    assert not np.allclose(rotate(vector, SEED), rotate(vector, bytes(32)))


def test_the_narrow_ring_leaves_headroom_for_every_client_and_rounding_step() -> None:
    clients, clip = 10, 10.0
    bound = coordinate_bound(clip)
    encoding = FixedPoint.for_clients(
        clients, clip, 1000.0, 1e-3, ring_bits=16, coordinate_bound=bound
    )
    largest = clients * (max(bound, 1.0) * encoding.scale + 1)
    assert encoding.ring == np.uint16
    assert largest <= 2**15 - 1


def test_the_narrow_ring_refuses_too_many_clients_naming_the_fix() -> None:
    with pytest.raises(HeadroomError, match="16 bits.*codec = fp32"):
        FixedPoint.for_clients(5000, 10.0, 1000.0, 1e-3, ring_bits=16)


def test_the_start_up_check_sizes_the_ring_of_the_codec() -> None:
    # 400 clients fit the 32-bit ring but not the 16-bit one
    assert round_encoding(400, 1.0, 1000.0, 32).ring == np.uint32
    with pytest.raises(HeadroomError, match="16 bits.*codec = fp32"):
        round_encoding(400, 1.0, 1000.0, 16)


def test_stochastic_rounding_in_the_narrow_ring_is_unbiased() -> None:
    # Prepare: one small delta encoded many times
    encoding = FixedPoint.for_clients(4, 1.0, 1.0, 1e-3, ring_bits=16)
    delta = np.full(200, 0.3 / encoding.scale)  # a third of a step
    rng = np.random.default_rng(5)

    # Execute
    decoded = [
        encoding.decode_sum(encoding.encode(delta, 1.0, rng))[0] for _ in range(400)
    ]

    # Assert: rounding to nearest would give 0 everywhere; the mean is the value
    mean = np.mean(decoded)
    assert mean == pytest.approx(0.3 / encoding.scale, rel=0.05)


def test_a_masked_sum_in_16_bits_decodes_to_the_weighted_sum_of_rotated_deltas() -> (
    None
):
    # Prepare: 8 clients, deltas of realistic LoRA size, each under the clip norm
    rng = np.random.default_rng(2)
    length, clip = 20_000, 5.0
    deltas = [rng.normal(scale=0.004, size=length) for _ in range(8)]
    weights = [100, 250, 40, 77, 300, 12, 90, 60]
    encoding = FixedPoint.for_clients(
        len(deltas), clip, 1000.0, 1e-3, 16, coordinate_bound(clip)
    )
    inputs = {
        3000 + i: encoding.encode(rotate(d, SEED), w, np.random.default_rng(i))
        for i, (d, w) in enumerate(zip(deltas, weights, strict=True))
    }

    # Execute: masks, one dropout at the masked-input stage, unmask, decode
    total, survivors = run_protocol(inputs, drop_after={3005: "mask"})
    rotated_sum, weight = encoding.decode_sum(total)
    weighted_sum = unrotate(rotated_sum, SEED, length)

    # Assert: the survivors' weighted sum, within the stochastic rounding noise
    assert total.dtype == np.uint16 and 3005 not in survivors
    kept = [i for i in range(8) if 3000 + i in survivors]
    exact = sum(weights[i] / 1000.0 * deltas[i] for i in kept)
    step = 1 / encoding.scale
    assert weight == pytest.approx(sum(weights[i] for i in kept) / 1000.0, abs=8 * step)
    error = weighted_sum - exact
    # Each client's stochastic rounding errs by less than a step per coordinate, with
    # variance at most step^2 / 4: the sum's error is that of 7 independent roundings.
    assert np.abs(error).max() < len(kept) * step
    assert np.linalg.norm(error) < 1.2 * math.sqrt(len(kept) * length) * step / 2
    assert abs(error.mean()) < 0.05 * step  # no bias


def test_the_16_bit_upload_of_minilms_adapter_is_about_half_of_float32() -> None:
    parameters = 77_578  # LoRA r=8 on query and value plus a 150-way head
    assert 2 * (rotated_length(parameters) + 1) / (4 * (parameters + 1)) < 0.51


def test_a_16_bit_secure_round_agrees_with_the_plain_mean_within_its_rounding(
    tiny_backbone: Path, six_site_data: Path, tmp_path: Path
) -> None:
    # Execute: the same round, summed securely in 16 bits and in the clear; fp16 both
    # ways, so both start from the same downlink (fp16's rounding of the uploads,
    # about 5e-4 relative, is far below the ring's step)
    grid, rows = run(
        tiny_backbone, six_site_data, tmp_path / "secure", NODES, codec="fp16"
    )
    _, plain_rows = run(
        tiny_backbone,
        six_site_data,
        tmp_path / "plain",
        NODES,
        codec="fp16",
        **{"secagg.enabled": False},
    )

    # Assert: every upload is a uint16 vector of the rotated length
    secure, plain = (
        final_adapter(tmp_path / "secure"),
        final_adapter(tmp_path / "plain"),
    )
    size = sum(v.size for v in plain.values())
    uploads = [
        next(iter(r.content.array_records[keys.MASKED_RECORD].values())).numpy()
        for r in grid.received
        if keys.MASKED_RECORD in r.content.array_records
    ]
    assert rows[1]["clients"] == plain_rows[1]["clients"] == 6
    assert [(u.dtype, u.size) for u in uploads] == [
        (np.dtype(np.uint16), rotated_length(size) + 1)
    ] * 6
    # ... and the mean is the plain one up to 6 stochastic roundings of one step
    # (max-weight 10, four rows each: total weight 2.4)
    encoding = FixedPoint.for_clients(
        6, 10.0, 10.0, 1e-2, ring_bits=16, coordinate_bound=coordinate_bound(10.0)
    )
    step, total_weight = 1 / encoding.scale, 24 / 10.0
    error = np.concatenate([(secure[k] - plain[k]).ravel() for k in plain])
    rms_bound = math.sqrt(6) * step / 2 / total_weight
    assert np.sqrt(np.mean(error**2)) < 1.5 * rms_bound
    moved = np.concatenate([plain[k].ravel() for k in plain if "lora_B" in k])
    assert np.abs(moved).max() > 20 * rms_bound  # the round moved B well past noise
