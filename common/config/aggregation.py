"""The ``aggregation``, ``fedprox.*`` and ``server.*`` keys: which rule turns a
round's updates into one delta, and its settings."""

from __future__ import annotations

from dataclasses import dataclass

from common.config.aggregation_rules import AGGREGATION_RULES
from common.config.keys import above, one_of, satisfies, setting

_IN_UNIT = "must be in [0, 1)"


def _moment(value: float) -> bool:
    return 0.0 <= value < 1.0


@dataclass(frozen=True)
class AggregationConfig:
    """Which rule turns a round's updates into one delta (``aggregation``).

    The server optimisers (Reddi et al. 2021): ``fedavgm`` uses ``server_lr`` and
    ``momentum``; ``fedadam`` and ``fedyogi`` use ``server_lr``, ``beta1``,
    ``beta2`` and ``tau``.
    """

    rule: str = setting(
        "aggregation",
        "fedavg",
        "the rule: "
        + "; ".join(f"`{t.name}`: {t.summary}" for t in AGGREGATION_RULES.values())
        + ' (README\'s "Aggregation rules")',
        check=one_of(tuple(AGGREGATION_RULES)),
    )
    trim_fraction: float = setting(
        "aggregation.trim-fraction",
        0.1,
        "share cut from each end by `trimmed-mean`",
        check=satisfies(lambda share: 0.0 <= share < 0.5, "must be in [0, 0.5)"),
    )
    proximal_mu: float = setting(
        "fedprox.mu",
        0.01,
        "`fedprox`: weight of the client's proximal term "
        "`mu/2 * ||theta - theta_global||^2` (Li et al. 2020)",
        check=satisfies(lambda mu: mu >= 0, "must be >= 0"),
    )
    server_lr: float = setting(
        "server.lr",
        0.0,
        "server optimiser step size; 0 = the rule's default ("
        + ", ".join(
            f"`{t.name}` {t.server_optimiser_lr}"
            for t in AGGREGATION_RULES.values()
            if t.server_optimiser_lr is not None
        )
        + ")",
        check=satisfies(lambda lr: lr >= 0, "must be >= 0 (0 = rule default)"),
    )
    beta1: float = setting(
        "server.beta1",
        0.9,
        "`fedadam` / `fedyogi` first-moment decay",
        check=satisfies(_moment, _IN_UNIT),
    )
    beta2: float = setting(
        "server.beta2",
        0.99,
        "`fedadam` / `fedyogi` second-moment decay",
        check=satisfies(_moment, _IN_UNIT),
    )
    tau: float = setting(
        "server.tau",
        0.001,
        "`fedadam` / `fedyogi` adaptivity (added to the root of the second moment)",
        check=above(0, "must be > 0"),
    )
    momentum: float = setting(
        "server.momentum",
        0.9,
        "`fedavgm` server momentum",
        check=satisfies(_moment, _IN_UNIT),
    )

    @property
    def effective_server_lr(self) -> float:
        """``server_lr``, or the rule's default when it is 0."""
        default = AGGREGATION_RULES[self.rule].server_optimiser_lr
        return self.server_lr or (1.0 if default is None else default)
