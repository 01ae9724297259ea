"""Cohort sampling under client-level DP: a secret Poisson sample, charged at its rate.

The accountant charges ``PoissonSampledDpEvent(q, ...)``; these tests check that the
coordinator really samples that way, keeps the sample out of its outputs, draws the
same cohorts after a resume, and charges a round that the sample made it skip.
"""

from __future__ import annotations

import json
import stat
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from flwr.app import MessageType

from common import dp, keys
from server.sampling import (
    COHORT_KEY_FILE,
    PRIVATE_DIR,
    SecretPoissonSampler,
    SeededSampler,
    cohort_key,
)
from tests.test_dp import federate, reference_epsilon

NODES = [100, 101, 102, 103]
SIGMA = 1.5


def write_key(output: Path, key: bytes) -> None:
    """Give a run's output folder a known sampling key before it starts."""
    (output / PRIVATE_DIR).mkdir(parents=True)
    (output / PRIVATE_DIR / COHORT_KEY_FILE).write_bytes(key)


def trained_cohorts(grid: object) -> dict[int, list[int]]:
    """Round -> the nodes the coordinator sent a train message (a site that first
    asked for the backbone gets two)."""
    cohorts: dict[int, set[int]] = {}
    for message in grid.sent:  # type: ignore[attr-defined]
        if message.metadata.message_type == MessageType.TRAIN:
            record = message.content.config_records[keys.CONFIG_RECORD]
            cohorts.setdefault(int(record[keys.CFG_ROUND]), set()).add(
                message.metadata.dst_node_id
            )
    return {r: sorted(nodes) for r, nodes in cohorts.items()}


def secret_run(
    backbone: Path, data: Path, output: Path, rounds: int, **overrides: object
) -> tuple[Any, list[dict[str, Any]]]:
    """A client-level DP run of four sites at q = 0.5 and sigma = SIGMA."""
    return federate(
        backbone,
        data,
        output,
        clients=4,
        **{
            "num-server-rounds": rounds,
            "train.fraction": 0.5,
            "dp.noise-multiplier": SIGMA,
            **overrides,
        },
    )


def key_where(wanted: dict[int, bool], rate: float) -> bytes:
    """The first key ``bytes([i]) * 32`` whose cohorts of the rounds in ``wanted``
    are (True) or are not (False) at least 3 nodes: a chosen, reproducible draw."""
    for i in range(256):
        sampler = SecretPoissonSampler(bytes([i]) * 32, rate)
        sizes = {r: len(sampler.sample(NODES, r).nodes) for r in wanted}
        if all((sizes[r] >= 3) == big for r, big in wanted.items()):
            return bytes([i]) * 32
    raise AssertionError("no key gives that draw")


# -- the samplers ---------------------------------------------------------------------


@pytest.mark.parametrize("rate", [0.05, 0.3, 0.8])
def test_the_secret_sampler_takes_each_node_independently_at_rate_q(
    rate: float,
) -> None:
    # Prepare
    sampler = SecretPoissonSampler(bytes(range(32)), rate)
    nodes = list(range(1, 401))

    # Execute: 50 rounds of 400 nodes = 20,000 independent draws
    cohorts = [set(sampler.sample(nodes, r).nodes) for r in range(50)]
    taken = np.array([[node in cohort for node in nodes] for cohort in cohorts])

    # Assert: the share is q within 4 binomial standard deviations, and the rounds
    # and nodes are not tied together (any node's rate, round to round, is q too)
    spread = 4 * np.sqrt(rate * (1 - rate) / taken.size)
    assert abs(taken.mean() - rate) < spread
    assert abs(taken[:, :10].mean() - rate) < 4 * np.sqrt(rate * (1 - rate) / 500)
    cohort = sampler.sample(nodes, 7)
    assert cohort.sampling_rate == rate
    assert cohort.expected == pytest.approx(rate * 400)
    assert not cohort.public


def test_the_secret_sample_follows_the_key_and_the_round() -> None:
    # Prepare
    nodes = list(range(1, 101))
    first, other = (SecretPoissonSampler(k * 32, 0.5) for k in (b"a", b"b"))

    # Execute / Assert: the same key and round give the same cohort; another key or
    # round another one
    assert first.sample(nodes, 3).nodes == first.sample(nodes, 3).nodes
    assert first.sample(nodes, 3).nodes != other.sample(nodes, 3).nodes
    assert first.sample(nodes, 3).nodes != first.sample(nodes, 4).nodes


def test_the_seeded_sampler_keeps_todays_fixed_size_public_sample() -> None:
    cohort = SeededSampler(seed=1, fraction=0.5, min_clients=3).sample(NODES, 1)
    assert len(cohort.nodes) == 3 and cohort.public
    assert cohort.sampling_rate == 0.75 and cohort.expected == 3


def test_the_cohort_key_is_drawn_once_owner_only_and_reread(tmp_path: Path) -> None:
    # Execute
    key = cohort_key(tmp_path)
    again = cohort_key(tmp_path)

    # Assert
    path = tmp_path / PRIVATE_DIR / COHORT_KEY_FILE
    assert key == again and len(key) == 32
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    assert stat.S_IMODE(path.parent.stat().st_mode) == 0o700
    assert cohort_key(tmp_path / "other") != key


def test_a_damaged_cohort_key_is_refused_naming_the_file(tmp_path: Path) -> None:
    write_key(tmp_path, b"short")
    with pytest.raises(ValueError, match=COHORT_KEY_FILE) as refusal:
        cohort_key(tmp_path)
    assert "32 bytes" in str(refusal.value)


# -- runs -----------------------------------------------------------------------------


def test_a_dp_run_below_fraction_one_samples_in_secret_and_charges_q(
    tiny_backbone: Path, small_jsonl: Path, tmp_path: Path
) -> None:
    # Prepare: a known key, four sites, q = 0.5
    output = tmp_path / "secret"
    key = bytes(range(32))
    write_key(output, key)
    expected = {r: SecretPoissonSampler(key, 0.5).sample(NODES, r) for r in (1, 2)}

    # Execute
    grid, rows = secret_run(tiny_backbone, small_jsonl, output, 2)

    # Assert: the sites that trained are the secret Poisson sample; each round is
    # charged at q = 0.5 and epsilon is dp-accounting's for that q
    sent = trained_cohorts(grid)
    for r, cohort in expected.items():
        assert sent.get(r, []) == cohort.nodes
    for row in rows[1:]:
        assert row[dp.SAMPLING_RATE] == 0.5
        assert row[dp.EPSILON] == pytest.approx(
            reference_epsilon(row["round"], 0.5, SIGMA, 1e-5), rel=1e-9
        )
        assert row["participants"] is None
        assert row["sampled"] is None and row["clients"] is None
    published = [output / "metrics.jsonl", output / "summary.json"]
    published += [output / "checkpoint.safetensors"]
    for path in published:
        assert key.hex() not in path.read_bytes().hex()


def test_a_resumed_dp_run_draws_the_same_cohorts(
    tiny_backbone: Path, small_jsonl: Path, tmp_path: Path
) -> None:
    # Prepare: one round, the key drawn by the run itself
    output = tmp_path / "resumed"
    secret_run(tiny_backbone, small_jsonl, output, 1)
    key = (output / PRIVATE_DIR / COHORT_KEY_FILE).read_bytes()

    # Execute: resume for rounds 2 and 3
    grid, rows = secret_run(tiny_backbone, small_jsonl, output, 3, resume=True)

    # Assert: the key is the same, and so are the cohorts an uninterrupted run draws
    assert (output / PRIVATE_DIR / COHORT_KEY_FILE).read_bytes() == key
    sent = trained_cohorts(grid)
    sampler = SecretPoissonSampler(key, 0.5)
    for r in (2, 3):
        assert sent.get(r, []) == sampler.sample(NODES, r).nodes
    assert [row["round"] for row in rows] == [0, 1, 2, 3]
    assert rows[-1][dp.EPSILON] == pytest.approx(
        reference_epsilon(3, 0.5, SIGMA, 1e-5), rel=1e-9
    )


def test_a_round_is_charged_even_when_its_sample_makes_it_skip(
    tiny_backbone: Path, small_jsonl: Path, tmp_path: Path
) -> None:
    # Prepare: a key whose round 1 samples fewer than train.min-clients = 3 sites
    # and whose round 2 samples enough
    output = tmp_path / "skipped"
    write_key(output, key_where({1: False, 2: True}, 0.5))

    # Execute
    grid, rows = secret_run(
        tiny_backbone, small_jsonl, output, 2, **{"train.min-clients": 3}
    )

    # Assert: round 1 sent nothing and left the adapter as it was, yet cost a round
    sent = trained_cohorts(grid)
    assert 1 not in sent and len(sent[2]) >= 3
    assert rows[1]["train_loss"] is None
    for row in rows[1:]:
        assert row[dp.EPSILON] == pytest.approx(
            reference_epsilon(row["round"], 0.5, SIGMA, 1e-5), rel=1e-9
        )
    summary = json.loads((output / "summary.json").read_text())
    assert summary["privacy"]["rounds_charged"] == 2
