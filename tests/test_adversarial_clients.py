"""A malicious client cannot crash or steer a round (issue 19, attacks D to G).

Each attack is staged as a malicious site would send it: the real coordinator
(strategy, plain or secure summer) receives the crafted reply over an in-process grid
of synthetic sites (``tests.synthetic_sites``), whose honest deltas are known, so the
outcome is checked against the exact mean of the honest sites.
"""

from __future__ import annotations

import logging
from collections.abc import Callable

import numpy as np
import pytest
from flwr.app import Array, ArrayRecord, Message, MetricRecord

from common import keys
from common.secagg import crypto
from common.secagg.encoding import FixedPoint
from common.wire import from_array_record, to_array_record
from server.aggregation import build_rule
from server.secagg import SecureSum
from simulations.inprocess_grid import InProcessGrid
from tests.synthetic_sites import (
    NODES,
    REFERENCE,
    assert_states_equal,
    config_of,
    mean_delta,
    replying_to,
    run_synthetic,
    site_app,
    synthetic_config,
    synthetic_grid,
)

ATTACKER = NODES[-1]
HONEST = NODES[:-1]
SECURE = {"secagg.enabled": True}


def once(node: int, action: str, change: Callable[[Message], None]):  # type: ignore[no-untyped-def]
    """A tamper that applies ``change`` to ``node``'s first reply to ``action``
    (round 1 only: round 2 shows the run going on)."""
    done: list[bool] = []

    def tamper(sender: int, reply: Message) -> Message:
        if sender == node and replying_to(action)(reply) and not done:
            done.append(True)
            change(reply)
        return reply

    return tamper


def set_metric(key: str, value: object) -> Callable[[Message], None]:
    def change(reply: Message) -> None:
        reply.content.metric_records[keys.METRICS_RECORD][key] = value  # type: ignore[assignment]

    return change


def assert_attacker_left_out(run, rejected: int = 1) -> None:  # type: ignore[no-untyped-def]
    """Round 1 went on without the attacker; round 2 (untampered) used everybody."""
    assert (run.rows[1]["clients"], run.rows[1]["rejected"]) == (
        len(NODES) - rejected,
        rejected,
    )
    assert_states_equal(run.states[1], mean_delta(HONEST))
    assert run.rows[2]["clients"] == len(NODES)


# -- D: the plain path's num-examples --------------------------------------------------


@pytest.mark.parametrize(
    "count", [1e300, 1e12, 11, float("nan"), float("inf"), 0, -4, 0.5]
)
def test_a_num_examples_outside_one_to_max_weight_is_rejected_and_cannot_steer(
    count: float, caplog: pytest.LogCaptureFixture
) -> None:
    # Prepare: the attacker claims ``count`` examples (train.max-weight = 10)
    tamper = once(ATTACKER, "train", set_metric(keys.NUM_EXAMPLES, count))

    # Execute
    with caplog.at_level(logging.WARNING):
        run = run_synthetic(synthetic_config(), tamper)

    # Assert: the honest mean, not the attacker's delta nor NaN, is the new global
    assert_attacker_left_out(run)
    assert f"node {ATTACKER}: update rejected" in caplog.text
    assert "num-examples" in caplog.text
    assert all(np.isfinite(v).all() for state in run.states for v in state.values())


def test_a_huge_delta_with_an_honest_weight_is_rejected_by_the_default_norm_bound(
    caplog: pytest.LogCaptureFixture,
) -> None:
    # Prepare: the attacker's delta would move the mean by ~1e3 per value
    def enlarge(reply: Message) -> None:
        record = reply.content.array_records[keys.ADAPTER_RECORD]
        arrays = {k: v * 1e4 for k, v in from_array_record(record).items()}
        reply.content.array_records[keys.ADAPTER_RECORD] = to_array_record(arrays)

    # Execute: train.max-update-norm keeps its default
    with caplog.at_level(logging.WARNING):
        run = run_synthetic(synthetic_config(), once(ATTACKER, "train", enlarge))

    # Assert
    assert_attacker_left_out(run)
    assert "above train.max-update-norm = 100" in caplog.text


def test_a_non_finite_aggregate_skips_the_round_and_keeps_the_last_good_global(
    caplog: pytest.LogCaptureFixture,
) -> None:
    # Prepare: every delta is finite, but their float32 mean overflows to Inf
    app = site_app(
        lambda node: {
            k: np.full(v.shape, 3e38, np.float32) for k, v in REFERENCE.items()
        }
    )

    # Execute: no norm bound, so only the aggregate's check stands in the way
    with caplog.at_level(logging.WARNING):
        run = run_synthetic(
            synthetic_config(**{"train.max-update-norm": 0.0}),
            grid=synthetic_grid(app=app),
        )

    # Assert
    for state in run.states:
        assert_states_equal(state, REFERENCE)
    assert "aggregate holds NaN or Inf" in caplog.text


HEAD = {"head.weight": (2, 3), "head.bias": (2,)}


def head_delta(node: int) -> dict[str, np.ndarray]:
    return {k: np.full(shape, node / 100, np.float32) for k, shape in HEAD.items()}


def test_claimed_label_counts_pull_a_head_row_no_more_than_the_sites_weight() -> None:
    # Prepare: fedavg-per-label; honest sites hold two rows of each label, the
    # attacker claims 1e12 rows of label 0 (and its honest num-examples, 4)
    def with_counts(sender: int, reply: Message) -> Message:
        if replying_to("train")(reply):
            counts = [1e12, 0.0] if sender == ATTACKER else [2.0, 2.0]
            reply.content.array_records[keys.LABEL_COUNTS_RECORD] = to_array_record(
                {"counts": np.array(counts, np.float32)}
            )
        return reply

    config = synthetic_config(aggregation="fedavg-per-label")
    grid = synthetic_grid(tamper=with_counts, app=site_app(head_delta))
    initial = {k: np.zeros(shape, np.float32) for k, shape in HEAD.items()}

    # Execute
    run = run_synthetic(config, grid=grid, rule=build_rule(config), initial=initial)

    # Assert: its counts are rescaled to its weight, 4 rows all of label 0
    honest = sum(node / 100 for node in HONEST)
    row0 = (2 * honest + 4 * ATTACKER / 100) / (2 * len(HONEST) + 4)
    row1 = honest / len(HONEST)
    np.testing.assert_allclose(run.states[1]["head.bias"], [row0, row1], rtol=1e-6)


# -- E: the secure path's weight slot and delta coordinates ----------------------------


def add_to_upload(position: int, steps: int) -> Callable[[Message], None]:
    """Add ``steps`` (mod 2^32) at ``position`` of a masked upload: the masks are
    additive, so the encoded value at that position moves by exactly ``steps``."""

    def change(reply: Message) -> None:
        vector = from_array_record(reply.content.array_records[keys.MASKED_RECORD])
        update = vector["update"].copy()
        update[position] = np.uint32((int(update[position]) + steps) % 2**32)
        reply.content.array_records[keys.MASKED_RECORD] = to_array_record(
            {"update": update}
        )

    return change


SCALE = FixedPoint.for_clients(len(NODES), clip_norm=10.0, max_weight=10.0).scale


@pytest.mark.parametrize(
    ("case", "position", "steps"),
    [
        ("negative total weight", -1, 2**31),
        ("zero total weight", -1, -round(0.4 * SCALE * len(NODES))),
        ("weight far above the cohort", -1, round(100 * SCALE)),
        ("huge delta coordinate", 0, round(1e4 * SCALE)),
        ("delta just above cohort x clip", 3, round(0.4 * 10 * len(NODES) * 2 * SCALE)),
    ],
)
def test_a_forged_masked_vector_skips_the_round_and_the_run_goes_on(
    case: str, position: int, steps: int, caplog: pytest.LogCaptureFixture
) -> None:
    # Prepare
    tamper = once(ATTACKER, "train", add_to_upload(position, steps))

    # Execute
    with caplog.at_level(logging.WARNING):
        run = run_synthetic(synthetic_config(**SECURE), tamper)

    # Assert: round 1 changes nothing, round 2 takes every site's delta
    assert run.rows[1]["clients"] == 0, case
    assert_states_equal(run.states[1], REFERENCE)
    assert_states_equal(run.states[2], mean_delta(NODES))
    assert "no honest upload can cause" in caplog.text


def test_under_client_level_dp_any_forged_weight_slot_skips_the_round(
    caplog: pytest.LogCaptureFixture,
) -> None:
    # Prepare: every site weighs 1 under DP; the attacker takes off a tenth of a weight,
    # within [n / max-weight, n], which the general bound would let through
    summer = SecureSum(synthetic_config(**SECURE).secagg, 42, unit_weights=True)
    tamper = once(ATTACKER, "train", add_to_upload(-1, -round(0.1 * SCALE)))
    app = site_app(examples=10.0)  # = secagg.max-weight: weight 1, as under DP

    # Execute
    with caplog.at_level(logging.WARNING):
        run = run_synthetic(
            synthetic_config(**SECURE),
            grid=synthetic_grid(tamper=tamper, app=app),
            summer=summer,
        )

    # Assert
    assert run.rows[1]["clients"] == 0
    assert_states_equal(run.states[1], REFERENCE)
    assert_states_equal(run.states[2], mean_delta(NODES))
    assert "has total weight" in caplog.text


def test_oversized_honest_deltas_and_counts_are_clipped_and_capped_not_wrapped() -> (
    None
):
    # Prepare: every site's delta has norm ~1e6 and it claims 1e9 examples: each is
    # clipped to secagg.clip-norm and capped at secagg.max-weight before the ring
    huge = {k: np.full(v.shape, 1e5, np.float32) for k, v in REFERENCE.items()}
    app = site_app(lambda node: huge, examples=1e9)

    # Execute
    run = run_synthetic(
        synthetic_config(**SECURE),
        grid=synthetic_grid(app=app),
    )

    # Assert: no wrap-around: the mean is the clipped delta, 14 values of 10/sqrt(14)
    size = sum(v.size for v in REFERENCE.values())
    clipped = 10.0 / np.sqrt(size)
    for name, value in run.states[1].items():
        np.testing.assert_allclose(value, clipped, rtol=1e-6, err_msg=name)


# -- F: accusations -------------------------------------------------------------------


def accuse(grid: InProcessGrid, accused: Callable[[list[int]], list[str]]):  # type: ignore[no-untyped-def]
    """The attacker's first masked upload accuses ``accused(its peers)``."""

    def change(reply: Message) -> None:
        state = grid.contexts[ATTACKER].state.config_records[keys.SECAGG_STATE]
        peers = sorted(int(p) for p in state["peers"])  # type: ignore[union-attr]
        config_of(reply)[keys.SECAGG_BAD_SENDERS] = accused(peers)

    return once(ATTACKER, "train", change)


def test_an_accusation_removes_the_accuser_with_the_accused_and_says_so(
    caplog: pytest.LogCaptureFixture,
) -> None:
    # Prepare: the attacker claims an honest neighbour's shares failed
    grid = synthetic_grid()
    grid.tamper = accuse(grid, lambda peers: [str(peers[0])])

    # Execute
    with caplog.at_level(logging.WARNING):
        run = run_synthetic(synthetic_config(**SECURE), grid=grid)

    # Assert: neither is silently in or out: both are left out, the log names both
    victim = HONEST[0]
    assert (run.rows[1]["clients"], run.rows[1]["rejected"]) == (4, 2)
    assert sorted(int(n) for n in run.rows[1]["participants"]) == sorted(
        set(HONEST) - {victim}
    )
    assert_states_equal(
        run.states[1], mean_delta(tuple(sorted(set(HONEST) - {victim})))
    )
    for node in (victim, ATTACKER):
        assert f"node {node}: update rejected: node(s) [{ATTACKER}] report" in (
            caplog.text
        )


@pytest.mark.parametrize(
    ("case", "accused"),
    [
        (
            "a node that sent it nothing",
            lambda peers: [str(n) for n in HONEST if n not in peers][:1],
        ),
        ("not a node id", lambda peers: ["not-a-node"]),
        ("itself and every node", lambda peers: [str(n) for n in NODES]),
    ],
)
def test_an_accusation_beyond_the_accusers_senders_removes_only_the_accuser(
    case: str, accused: Callable[[list[int]], list[str]]
) -> None:
    # Prepare: a sparse graph (k = 4 of 5), so the attacker has a non-neighbour
    grid = synthetic_grid()
    grid.tamper = accuse(grid, accused)

    # Execute
    run = run_synthetic(
        synthetic_config(**SECURE, **{"secagg.neighbours": 4}), grid=grid
    )

    # Assert
    assert_attacker_left_out(run)


def flip_commitments(reply: Message) -> None:
    record = config_of(reply)
    record[keys.SECAGG_SEED_COMMITMENTS] = [
        bytes([c[0] ^ 1]) + c[1:]
        for c in record[keys.SECAGG_SEED_COMMITMENTS]  # type: ignore[union-attr]
    ]


def test_shares_that_break_their_commitments_remove_only_their_sender(
    caplog: pytest.LogCaptureFixture,
) -> None:
    # Prepare: the attacker's shares no longer match the commitments it publishes
    tamper = once(ATTACKER, keys.ACTION_SECAGG_SHARE, flip_commitments)

    # Execute
    with caplog.at_level(logging.WARNING):
        run = run_synthetic(synthetic_config(**SECURE), tamper)

    # Assert: all five holders report it, at least the threshold: they are believed
    assert_attacker_left_out(run)
    assert f"report that key shares from node {ATTACKER}" in caplog.text
    assert "enough to believe them" in caplog.text


def test_a_bogus_unmask_share_is_ignored_naming_its_holder_and_the_round_unmasks(
    caplog: pytest.LogCaptureFixture,
) -> None:
    # Prepare: the attacker returns a wrong (but well-formed) share of a seed;
    # unverified, Lagrange interpolation would rebuild a wrong seed and every
    # round would skip with nobody to blame
    def bogus(reply: Message) -> None:
        record = config_of(reply)
        shares = list(record[keys.SECAGG_SEED_SHARES])  # type: ignore[arg-type]
        shares[0] = crypto.share_to_bytes(crypto.share_from_bytes(shares[0]) ^ 1)
        record[keys.SECAGG_SEED_SHARES] = shares

    # Execute
    with caplog.at_level(logging.WARNING):
        run = run_synthetic(
            synthetic_config(**SECURE),
            once(ATTACKER, keys.ACTION_SECAGG_UNMASK, bogus),
        )

    # Assert
    assert run.rows[1]["clients"] == len(NODES)
    assert_states_equal(run.states[1], mean_delta(NODES))
    assert f"node {ATTACKER} returned a share of node" in caplog.text


# -- G: malformed records --------------------------------------------------------------


def replace_adapter_stype(reply: Message) -> None:
    record = reply.content.array_records[keys.ADAPTER_RECORD]
    name = next(iter(record))
    array = record[name]
    record[name] = Array(
        dtype=array.dtype, shape=array.shape, stype="torch.Tensor", data=array.data
    )


def replace_masked_stype(reply: Message) -> None:
    array = next(iter(reply.content.array_records[keys.MASKED_RECORD].values()))
    reply.content.array_records[keys.MASKED_RECORD] = ArrayRecord(
        {
            "update": Array(
                dtype=array.dtype, shape=array.shape, stype="x", data=array.data
            )
        }
    )


def drop_metrics(reply: Message) -> None:
    reply.content.metric_records[keys.METRICS_RECORD] = MetricRecord({})


@pytest.mark.parametrize("secure", [False, True])
@pytest.mark.parametrize(
    ("case", "change"),
    [
        ("a list metric", set_metric(keys.NUM_EXAMPLES, [4, 4])),
        ("a NaN metric", set_metric("train-loss", float("nan"))),
        ("an infinite metric", set_metric("train-loss", float("inf"))),
        ("no metrics", drop_metrics),
    ],
)
def test_a_malformed_metric_record_rejects_that_reply_alone(
    secure: bool, case: str, change: Callable[[Message], None]
) -> None:
    # Execute
    run = run_synthetic(
        synthetic_config(**{"secagg.enabled": secure}), once(ATTACKER, "train", change)
    )

    # Assert
    if case == "no metrics" and secure:  # nothing to reject: behind the masks the
        assert run.rows[1]["clients"] == len(NODES)  # weight rides in the vector
        return
    assert_attacker_left_out(run)


@pytest.mark.parametrize(
    ("secure", "change"),
    [(False, replace_adapter_stype), (True, replace_masked_stype)],
)
def test_an_array_of_another_stype_rejects_that_reply_alone(
    secure: bool, change: Callable[[Message], None], caplog: pytest.LogCaptureFixture
) -> None:
    # Execute
    with caplog.at_level(logging.WARNING):
        run = run_synthetic(
            synthetic_config(**{"secagg.enabled": secure}),
            once(ATTACKER, "train", change),
        )

    # Assert
    assert_attacker_left_out(run)
    assert f"node {ATTACKER}: update rejected" in caplog.text


# -- the key stages' parsers ----------------------------------------------------------

#: ``bytes(HUGE)`` would try to allocate 2^62 bytes: MemoryError or OverflowError.
HUGE = 2**62


def set_field(key: str, value: object) -> Callable[[Message], None]:
    def change(reply: Message) -> None:
        config_of(reply)[key] = value  # type: ignore[assignment]

    return change


@pytest.mark.parametrize(
    ("action", "key", "value"),
    [
        (keys.ACTION_SECAGG_ADVERTISE, keys.SECAGG_CIPHER_PK, HUGE),
        (keys.ACTION_SECAGG_ADVERTISE, keys.SECAGG_MASK_PK, [HUGE]),
        (keys.ACTION_SECAGG_SHARE, keys.SECAGG_SEALED, [HUGE] * (len(NODES) - 1)),
        (keys.ACTION_SECAGG_SHARE, keys.SECAGG_PEERS, HUGE),
    ],
)
def test_a_crafted_integer_in_a_key_stage_removes_its_sender_only(
    action: str, key: str, value: object, caplog: pytest.LogCaptureFixture
) -> None:
    # Execute
    with caplog.at_level(logging.WARNING):
        run = run_synthetic(
            synthetic_config(**SECURE), once(ATTACKER, action, set_field(key, value))
        )

    # Assert
    assert_attacker_left_out(run)
    assert f"node {ATTACKER}: update rejected: malformed" in caplog.text or (
        f"node {ATTACKER}: update rejected: bad key shares" in caplog.text
    )


@pytest.mark.parametrize(
    ("key", "value"),
    [
        (keys.SECAGG_SEED_SHARES, [HUGE] * (len(NODES) - 1)),
        (keys.SECAGG_SEED_OWNERS, HUGE),
    ],
)
def test_crafted_unmask_shares_are_ignored_and_the_others_unmask(
    key: str, value: object, caplog: pytest.LogCaptureFixture
) -> None:
    # Execute
    with caplog.at_level(logging.WARNING):
        run = run_synthetic(
            synthetic_config(**SECURE),
            once(ATTACKER, keys.ACTION_SECAGG_UNMASK, set_field(key, value)),
        )

    # Assert: the other five hold enough shares of every secret
    assert run.rows[1]["clients"] == len(NODES)
    assert_states_equal(run.states[1], mean_delta(NODES))
    assert f"node {ATTACKER} sent unusable unmask shares" in caplog.text
