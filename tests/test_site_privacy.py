"""A site's own DP limits and ledger hold whatever the coordinator sends."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
from flwr.app import MessageType

from client.site_privacy import (
    LEDGER_FILE,
    SAMPLE_LEDGER_FILE,
    SiteLedger,
    SiteLimits,
    SiteRefusal,
    round_noise_multiplier,
)
from client.site_state import site_folder
from common import dp
from common.config import RunConfig
from tests.test_dp import federate, reference_epsilon


def run_config(**overrides: Any) -> RunConfig:
    return RunConfig.from_flat(
        {
            "model.name": "unused",
            "dp.enabled": True,
            "dp.mode": "distributed",
            "secagg.enabled": True,
            **overrides,
        }
    )


def refusals(grid: Any) -> list[str]:
    """The error reasons of the training replies."""
    return [
        reply.error.reason
        for reply in grid.received
        if reply.metadata.message_type == MessageType.TRAIN and reply.has_error()
    ]


# -- limits --------------------------------------------------------------------------


@pytest.mark.parametrize("value", ["-1", "nan", "lots", "inf"])
def test_a_bad_limit_in_the_node_config_is_refused_naming_the_key(value: str) -> None:
    with pytest.raises(SiteRefusal, match="dp-max-epsilon"):
        SiteLimits.from_node_config({"dp-max-epsilon": value})


LIMITS = SiteLimits(min_noise_multiplier=1.0, max_clip_norm=2.0)


@pytest.mark.parametrize(
    ("overrides", "sigma", "clip", "why"),
    [
        ({"dp.enabled": False, "secagg.enabled": False}, 1.0, 1.0, "dp.enabled"),
        ({"dp.mode": "central"}, 1.0, 1.0, "'central'"),
        ({}, 0.5, 1.0, "dp-min-noise-multiplier"),
        ({}, 1.0, 3.0, "dp-max-clip-norm"),
        ({"dp.level": "sample", "secagg.enabled": False}, 0.9, 1.0, "0.9"),
    ],
)
def test_a_round_below_the_sites_floors_is_refused_saying_which(
    overrides: dict[str, Any], sigma: float, clip: float, why: str
) -> None:
    with pytest.raises(SiteRefusal, match=why):
        LIMITS.check(run_config(**overrides), sigma, clip)


def test_a_round_within_the_floors_is_admitted() -> None:
    LIMITS.check(run_config(), 1.0, 2.0)
    SiteLimits().check(run_config(**{"dp.mode": "central"}), 0.1, 50.0)


@pytest.mark.parametrize(("z", "count_stddev"), [(1.0, 2.0), (0.7, 0.5)])
def test_the_site_rebuilds_the_rounds_noise_multiplier_under_adaptive_clipping(
    z: float, count_stddev: float
) -> None:
    raised = dp.delta_noise_multiplier(z, count_stddev)
    assert round_noise_multiplier(raised, count_stddev, True) == pytest.approx(z)
    assert round_noise_multiplier(1.3, count_stddev, False) == 1.3


# -- the ledger ----------------------------------------------------------------------


def test_the_ledger_charges_each_round_at_q_one_and_refuses_past_the_budget(
    tmp_path: Path,
) -> None:
    # Prepare: a budget between two and three rounds at q = 1, sigma = 2
    charge = dp.RoundCharge(1.0, 2.0)
    two, three = (reference_epsilon(r, 1.0, 2.0, 1e-5) for r in (2, 3))
    ledger = SiteLedger(tmp_path, 1e-5)

    # Execute
    for _ in range(2):
        ledger.admit(charge, (two + three) / 2)
        ledger.record(charge)

    # Assert: kept on disk; the third round is refused
    again = SiteLedger(tmp_path, 1e-5)
    assert again.epsilon() == pytest.approx(two, rel=1e-12)
    with pytest.raises(SiteRefusal, match="dp-max-epsilon"):
        again.admit(charge, (two + three) / 2)
    again.admit(charge, 0.0)  # 0 = no budget


def test_a_damaged_ledger_stops_the_site_naming_the_file(tmp_path: Path) -> None:
    (tmp_path / LEDGER_FILE).write_text("{not json")
    with pytest.raises(SiteRefusal, match=LEDGER_FILE):
        SiteLedger(tmp_path, 1e-5).epsilon()


# -- runs ----------------------------------------------------------------------------


def test_sites_stop_at_their_own_budget_across_runs(
    tiny_backbone: Path, small_jsonl: Path, tmp_path: Path, monkeypatch: Any
) -> None:
    # Prepare: the sites' budget affords two rounds at q = 1 and sigma = 2
    import tests.test_dp as helpers

    two, three = (reference_epsilon(r, 1.0, 2.0, 1e-5) for r in (2, 3))
    original = helpers.InProcessGrid

    def with_budget(app: Any, nodes: dict[int, dict[str, Any]]) -> Any:
        budget = {"dp-max-epsilon": (two + three) / 2}
        return original(app, {n: {**c, **budget} for n, c in nodes.items()})

    monkeypatch.setattr(helpers, "InProcessGrid", with_budget)
    settings = {"dp.noise-multiplier": 2.0}

    # Execute: three rounds, then a fresh run (a new output folder) on the same sites
    grid, rows = federate(
        tiny_backbone, small_jsonl, tmp_path / "first", clients=2,
        **{**settings, "num-server-rounds": 3},
    )  # fmt: skip
    again, _ = federate(
        tiny_backbone, small_jsonl, tmp_path / "second", clients=2, **settings
    )

    # Assert: both sites refuse round 3, saying why, and refuse the new run too
    assert [row["clients"] for row in rows[1:]] == [2, 2, 0]
    assert len(refusals(grid)) == 2
    assert all("dp-max-epsilon" in reason for reason in refusals(grid))
    assert len(refusals(again)) == 2
    folder = site_folder(grid.contexts[100].node_config, tmp_path / "cache")
    assert SiteLedger(folder, 1e-5).epsilon() == pytest.approx(two, rel=1e-12)


def test_a_dp_sgd_site_charges_its_steps_and_stops_at_its_own_budget(
    tiny_backbone: Path, small_jsonl: Path, tmp_path: Path, monkeypatch: Any
) -> None:
    # Prepare: one sample-level round with no budget fills the sites' ledgers
    import tests.test_dp as helpers

    settings = {"dp.level": "sample", "aggregation": "median"}
    grid, _ = federate(tiny_backbone, small_jsonl, tmp_path / "first", 2, **settings)
    folder = site_folder(grid.contexts[100].node_config, tmp_path / "cache")
    ledger = SiteLedger(folder, 1e-5, SAMPLE_LEDGER_FILE)
    charges = ledger.charges()
    one, two = ledger.epsilon(), ledger.epsilon(tuple(charges))
    original = helpers.InProcessGrid

    def with_budget(app: Any, nodes: dict[int, dict[str, Any]]) -> Any:
        budget = {"dp-max-epsilon": (one + two) / 2}
        return original(
            app, {n: c | (budget if n == 100 else {}) for n, c in nodes.items()}
        )

    monkeypatch.setattr(helpers, "InProcessGrid", with_budget)

    # Execute: a fresh run on the same sites, site 100 with a budget below 2 rounds
    again, _ = federate(tiny_backbone, small_jsonl, tmp_path / "second", 2, **settings)

    # Assert: every step was charged at the site's Poisson rate, as dp-accounting
    # composes it; site 100 refuses the second round, site 101 trains
    (charge,) = set(charges)
    assert charge.noise_multiplier == 1.0 and 0 < charge.sampling_rate <= 1
    assert one == pytest.approx(
        reference_epsilon(len(charges), charge.sampling_rate, 1.0, 1e-5), rel=1e-12
    )
    assert len(refusals(again)) == 1
    assert "dp-max-epsilon" in refusals(again)[0]
    assert SiteLedger(folder, 1e-5, SAMPLE_LEDGER_FILE).epsilon() == one
