"""Secure aggregation across cohort sizes and neighbourhoods, at message level: the
ring and fixed-point step against the figures README states, large cohorts in the
64-bit ring, and sparse SecAgg+ graphs (k < n - 1) with dropouts."""

from __future__ import annotations

import numpy as np
import pytest
from flwr.app import Message

from common.secagg.encoding import FixedPoint, round_encoding
from tests.synthetic_sites import (
    NODES,
    REFERENCE,
    assert_states_equal,
    mean_delta,
    replying_to,
    run_synthetic,
    synthetic_config,
)

SECURE = {"secagg.enabled": True}


@pytest.mark.parametrize(
    ("clients", "clip", "bits", "stated_step"),
    [
        # README: n max(1, clip) / 2^31 in 32 bits, n max(1, clip) / 2^62 in 64 bits
        (6, 10.0, 32, 60 / 2**31),
        (214, 10.0, 32, 2140 / 2**31),
        (215, 10.0, 64, 2150 / 2**62),
        (1000, 10.0, 64, 10_000 / 2**62),
        (100_000, 10.0, 64, 1e6 / 2**62),
        (6, 0.5, 32, 6 / 2**31),
    ],
)
def test_the_ring_and_step_follow_the_cohort_as_stated(
    clients: int, clip: float, bits: int, stated_step: float
) -> None:
    # Execute
    encoding = round_encoding(clients, clip, max_weight=10_000.0)

    # Assert
    assert encoding.ring_bits == bits
    assert 1 / encoding.scale == pytest.approx(stated_step, rel=1e-6)
    assert 1 / encoding.scale <= 1e-6


def test_the_narrow_ring_step_is_the_stated_figure() -> None:
    # README: (n max(1, 6 clip / 64)) / 2^15, "about 2e-4 for six clients"
    encoding = round_encoding(6, 10.0, max_weight=10_000.0, ring_bits=16)
    assert 1 / encoding.scale == pytest.approx(6 / 2**15, rel=2e-3)


@pytest.mark.parametrize("sign", [1.0, -1.0])
def test_a_thousand_clients_at_the_clip_sum_without_wrapping_in_64_bits(
    sign: float,
) -> None:
    # Prepare: the worst case: every client at full weight with its whole clip norm
    # on one coordinate, all the same sign
    clients, clip = 1000, 10.0
    encoding = round_encoding(clients, clip, max_weight=1.0)
    delta = np.zeros(5)
    delta[2] = sign * clip
    encoded = encoding.encode(delta, num_examples=1.0)

    # Execute: the ring sum, as the unmasked total would be
    total = np.zeros_like(encoded)
    for _ in range(clients):
        np.add(total, encoded, out=total)
    weighted, weight = encoding.decode_sum(total)

    # Assert
    assert encoding.ring_bits == 64 and weight == pytest.approx(clients)
    assert weighted[2] == pytest.approx(sign * clients * clip, rel=1e-12)


def test_the_32_bit_ring_is_kept_where_it_fits() -> None:
    # The 64-bit ring doubles the upload: only a cohort that needs it pays
    assert FixedPoint.for_clients(214, 10.0, 10_000.0).ring_bits == 32


@pytest.mark.parametrize(
    ("overrides", "bits"),
    [({}, 32), ({"secagg.clip-norm": 400.0}, 64)],
)
def test_the_secure_mean_is_exact_within_the_stated_step_in_either_ring(
    overrides: dict[str, object], bits: int
) -> None:
    # Prepare: clip 400 with six clients leaves steps above 1e-6 in 32 bits
    config = synthetic_config(**SECURE, **overrides)

    # Execute
    run = run_synthetic(config)

    # Assert: each of n clients rounds w * x to half a step; the mean divides by W
    uploads = [m for m in run.grid.received if replying_to("train")(m)]  # type: ignore[union-attr]
    dtype = next(iter(uploads[0].content.array_records["masked"].values())).dtype
    assert dtype == f"uint{bits}"
    clip, n, weight = config.secagg.clip_norm, len(NODES), len(NODES) * 0.4
    step = n * max(clip, 1.0) / (2**31 if bits == 32 else 2**62)
    for name, value in mean_delta(NODES).items():
        np.testing.assert_allclose(
            run.states[1][name], value, rtol=0, atol=n * step / 2 / weight + 1e-7
        )


def lose(node: int, action: str):  # type: ignore[no-untyped-def]
    """A tamper that loses ``node``'s replies to ``action`` (a dropout)."""
    return lambda sender, reply: (
        None if sender == node and replying_to(action)(reply) else reply
    )


@pytest.mark.parametrize("neighbours", [2, 3, 4])
@pytest.mark.parametrize("stage", [None, "secagg_share", "train", "secagg_unmask"])
def test_a_sparse_neighbourhood_gives_the_survivors_mean(
    neighbours: int, stage: str | None
) -> None:
    # Prepare: k < n - 1 neighbours; optionally node 33 drops out at ``stage``
    dropped = 33
    tamper = lose(dropped, stage) if stage else None
    config = synthetic_config(**SECURE, **{"secagg.neighbours": neighbours})

    # Execute
    run = run_synthetic(config, tamper)

    # Assert: t = k // 2 + 1 tolerates k - t dropouts around a node: none for
    # k = 2, so the round is skipped whole (never a wrong sum); one for k = 3, 4
    sent_shares = {
        m.metadata.dst_node_id
        for m in run.grid.sent
        if _is(m, "secagg_share")  # type: ignore[union-attr]
    }
    assert sent_shares == set(NODES)
    if stage is None:
        assert_states_equal(run.states[1], mean_delta(NODES))
    elif neighbours == 2:
        assert run.rows[1]["clients"] == 0
        assert_states_equal(run.states[1], REFERENCE)
    else:
        survivors = tuple(n for n in NODES if n != dropped or stage == "secagg_unmask")
        assert run.rows[1]["clients"] == len(survivors)
        assert_states_equal(run.states[1], mean_delta(survivors))


def _is(message: Message, action: str) -> bool:
    return message.metadata.message_type.split(".")[-1] == action
