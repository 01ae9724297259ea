"""The ``secagg.*`` keys: secure aggregation (SecAgg+)."""

from __future__ import annotations

from dataclasses import dataclass

from common.config.errors import Refusal, refuse_if
from common.config.keys import above, at_least, one_of, setting
from common.secagg.protocol import SECAGG_MODES


@dataclass(frozen=True)
class SecAggConfig:
    """Secure aggregation (SecAgg+) settings (``secagg.*``)."""

    enabled: bool = setting(
        "secagg.enabled",
        False,
        "secure aggregation: the coordinator learns only the sum of the deltas",
    )
    neighbours: int = setting(
        "secagg.neighbours",
        0,
        "SecAgg+ neighbourhood size k; 0 = about 2 log2(n)",
        check=at_least(0, "must be >= 0 (0 = about 2 log2 n)"),
    )
    threshold: int = setting(
        "secagg.threshold",
        0,
        "shares needed to unmask; 0 = k // 2 + 1 (must exceed k / 2)",
        check=at_least(0, "must be >= 0 (0 = k // 2 + 1)"),
    )
    clip_norm: float = setting(
        "secagg.clip-norm",
        10.0,
        "L2 bound on each delta before fixed-point encoding",
        check=above(0, "must be > 0"),
    )
    max_weight: float = setting(
        "secagg.max-weight",
        10000.0,
        "example counts are divided by this (and capped at it) inside the masked "
        "vector",
        check=at_least(1, "must be >= 1"),
    )
    timeout: float = setting(
        "secagg.timeout",
        120.0,
        "seconds each key or unmask stage waits for replies",
        check=above(0, "must be > 0 seconds"),
        resumable=True,
    )
    mode: str = setting(
        "secagg.mode",
        "honest-but-curious",
        "`honest-but-curious`: keys relayed as sent, safe while the coordinator "
        "follows the protocol; `malicious`: sites sign their keys, verify their "
        "peers' against a roster (node config `secagg-roster`) and sign the survivor "
        "set and model hash before unmasking (docs/SECURE_DEPLOYMENT.md, threat "
        "model)",
        check=one_of(SECAGG_MODES),
        resumable=True,
    )


def threshold_within_neighbourhood(secagg: SecAggConfig) -> Refusal | None:
    """An explicit threshold is a majority of an explicit neighbourhood."""
    k, t = secagg.neighbours, secagg.threshold
    return refuse_if(
        k > 0 and t > 0 and not k / 2 < t <= k,
        "secagg.threshold",
        f"must be above secagg.neighbours / 2 and at most secagg.neighbours ({k})",
    )


RULES = (threshold_within_neighbourhood,)
