"""Aggregation rules: one small module per rule, selected with
``aggregation = name``."""

from __future__ import annotations

from common.config import RunConfig
from server.aggregation.fedavg import FedAvg
from server.aggregation.fedavg_per_label import FedAvgPerLabel
from server.aggregation.median import CoordinateMedian
from server.aggregation.trimmed_mean import TrimmedMean
from server.strategy import AggregationRule


def build_rule(config: RunConfig) -> AggregationRule:
    """The rule named by ``aggregation`` (the config has checked the name)."""
    rules: dict[str, AggregationRule] = {
        "fedavg": FedAvg(),
        "fedavg-per-label": FedAvgPerLabel(),
        "median": CoordinateMedian(),
        "trimmed-mean": TrimmedMean(config.aggregation.trim_fraction),
    }
    return rules[config.aggregation.rule]


__all__ = ["CoordinateMedian", "FedAvg", "FedAvgPerLabel", "TrimmedMean", "build_rule"]
