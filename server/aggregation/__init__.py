"""Aggregation rules: one small module per rule, selected with
``aggregation = name``."""

from __future__ import annotations

from collections.abc import Callable

from common.config import RunConfig
from server.aggregation.fedavg import FedAvg
from server.aggregation.fedavg_per_label import FedAvgPerLabel
from server.aggregation.fedprox import FedProx
from server.aggregation.fedsa import FedSA
from server.aggregation.ffa import FederatedFrozenA
from server.aggregation.flexlora import FlexLoRA
from server.aggregation.median import CoordinateMedian
from server.aggregation.server_optimisers import FedAdam, FedAvgM, FedYogi
from server.aggregation.trimmed_mean import TrimmedMean
from server.strategy import AggregationRule


def build_rule(config: RunConfig) -> AggregationRule:
    """The rule named by ``aggregation`` (the config has checked the name)."""
    settings = config.aggregation
    server_lr = settings.effective_server_lr
    rules: dict[str, Callable[[], AggregationRule]] = {
        "fedavg": FedAvg,
        "fedprox": FedProx,
        "fedavgm": lambda: FedAvgM(server_lr, settings.momentum),
        "fedadam": lambda: FedAdam(
            server_lr, settings.beta1, settings.beta2, settings.tau
        ),
        "fedyogi": lambda: FedYogi(
            server_lr, settings.beta1, settings.beta2, settings.tau
        ),
        "ffa": FederatedFrozenA,
        "fedsa": FedSA,
        "flexlora": lambda: FlexLoRA(config.lora.r, config.lora.alpha),
        "fedavg-per-label": FedAvgPerLabel,
        "median": CoordinateMedian,
        "trimmed-mean": lambda: TrimmedMean(settings.trim_fraction),
    }
    return rules[settings.rule]()


__all__ = [
    "CoordinateMedian",
    "FedAdam",
    "FedAvg",
    "FedAvgM",
    "FedAvgPerLabel",
    "FedProx",
    "FedSA",
    "FedYogi",
    "FederatedFrozenA",
    "FlexLoRA",
    "TrimmedMean",
    "build_rule",
]
