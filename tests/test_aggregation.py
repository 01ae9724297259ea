"""Aggregation rules against their formulas, and which combine with secure
aggregation."""

from __future__ import annotations

import numpy as np
import pytest

from common.config import AGGREGATION_RULES, ConfigError, RunConfig
from server.aggregation import CoordinateMedian, FedAvg, TrimmedMean, build_rule
from server.contribution import Contribution
from server.summation import RoundSum

VALUES = [
    np.array([1.0, -4.0], np.float32),
    np.array([3.0, 0.0], np.float32),
    np.array([100.0, 2.0], np.float32),
]
WEIGHTS = [1.0, 3.0, 1.0]


def round_sum() -> RoundSum:
    contributions = [
        Contribution(i, {"w": v}, w)
        for i, (v, w) in enumerate(zip(VALUES, WEIGHTS, strict=True))
    ]
    total = {"w": sum(w * v for v, w in zip(VALUES, WEIGHTS, strict=True))}
    return RoundSum(
        total=total, weight=sum(WEIGHTS), count=3, contributions=contributions
    )


def test_fedavg_is_the_example_weighted_mean() -> None:
    expected = (1 * VALUES[0] + 3 * VALUES[1] + 1 * VALUES[2]) / 5
    np.testing.assert_allclose(FedAvg().aggregate(round_sum())["w"], expected)


def test_median_is_the_coordinate_wise_median_and_ignores_one_outlier() -> None:
    np.testing.assert_allclose(
        CoordinateMedian().aggregate(round_sum())["w"], [3.0, 0.0]
    )


def test_trimmed_mean_drops_the_extremes_of_each_coordinate() -> None:
    # One value cut from each end of three: the middle value per coordinate.
    np.testing.assert_allclose(
        TrimmedMean(0.34).aggregate(round_sum())["w"], [3.0, 0.0]
    )
    np.testing.assert_allclose(
        TrimmedMean(0.0).aggregate(round_sum())["w"], np.mean(VALUES, axis=0)
    )


@pytest.mark.parametrize("name", list(AGGREGATION_RULES))
def test_each_declared_rule_builds_the_class_that_points_at_its_traits(
    name: str,
) -> None:
    # Prepare
    config = RunConfig.from_flat({"aggregation": name})

    # Execute
    rule = build_rule(config)

    # Assert
    assert rule.traits is AGGREGATION_RULES[name]
    assert rule.traits.name == name


def test_the_rules_needing_updates_are_exactly_those_that_read_them() -> None:
    # Prepare / Execute
    needing = {
        name
        for name, traits in AGGREGATION_RULES.items()
        if traits.needs_individual_updates
    }

    # Assert
    assert needing == {"flexlora", "median", "trimmed-mean"}


@pytest.mark.parametrize("rule", ["median", "trimmed-mean"])
def test_a_rule_needing_individual_updates_is_refused_with_secure_aggregation(
    rule: str,
) -> None:
    with pytest.raises(
        ConfigError,
        match=f"aggregation = {rule} needs each client's update.*secagg.enabled",
    ):
        RunConfig.from_flat({"aggregation": rule, "secagg.enabled": True})


def test_fedavg_per_label_averages_each_head_row_over_its_label_holders() -> None:
    # Prepare: label 0 only at client 0, label 1 only at client 1, label 2 at both
    from server.aggregation import FedAvgPerLabel

    head_a = np.array([[1.0, 1.0], [9.0, 9.0], [2.0, 0.0]], np.float32)
    head_b = np.array([[7.0, 7.0], [3.0, 3.0], [4.0, 6.0]], np.float32)
    lora_a, lora_b = np.array([1.0], np.float32), np.array([4.0], np.float32)
    contributions = [
        Contribution(
            1,
            {"head.weight": head_a, "head.bias": head_a[:, 0], "lora": lora_a},
            2.0,
            label_counts=np.array([2.0, 0.0, 1.0]),
        ),
        Contribution(
            2,
            {"head.weight": head_b, "head.bias": head_b[:, 0], "lora": lora_b},
            4.0,
            label_counts=np.array([0.0, 3.0, 1.0]),
        ),
    ]
    total = {
        k: 2.0 * contributions[0].change[k] + 4.0 * contributions[1].change[k]
        for k in contributions[0].change
    }
    summed = RoundSum(total=total, weight=6.0, count=2, contributions=contributions)

    # Execute
    mean = FedAvgPerLabel().aggregate(summed)

    # Assert: rows follow their owners; the shared label is the count-weighted mean
    np.testing.assert_allclose(
        mean["head.weight"], [[1.0, 1.0], [3.0, 3.0], [3.0, 3.0]]
    )
    np.testing.assert_allclose(mean["head.bias"], [1.0, 3.0, 3.0])
    np.testing.assert_allclose(mean["lora"], [(2.0 * 1.0 + 4.0 * 4.0) / 6.0])
