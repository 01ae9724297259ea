"""The coordinator's DP-FedAvg step, between the sum and the rule.

One round, as data::

    sample m of n nodes -> budget check (stop before a round that would exceed
    dp.target-epsilon) -> ... -> sum of the survivors' clipped deltas -> (central: add
    N(0, (sigma C)^2)) -> divide by m, not by the survivors' weights -> the rule ->
    charge the round to the accountant -> epsilon in the metrics line

Every client weighs 1 and the mean divides by ``m``, the number sampled, whoever
survives (McMahan et al. 2018's fixed-denominator estimator): the sensitivity of the
mean is then ``C / m`` whatever the clients' example counts. With a plain sum the
coordinator sees each delta, so it clips them itself as well; behind secure
aggregation each client clips its own delta and sends weight 1.

In distributed mode the secure sum already carries the noise, ``m`` shares of variance
``(sigma C)^2 / m``; when only ``k < m`` clients survive, a share ``1 - k / m`` of the
variance is missing (``dp_noise_shortfall``) and the round is charged at the noise
multiplier it really had, ``sigma * sqrt(k / m)``.

Each round is charged as Poisson sampling at ``q = m / n`` (the rate it really
sampled at; the coordinator samples a fixed number without replacement, for which
Poisson sampling is the usual approximation). A round is charged as soon as its
clients are sampled, also when it is later skipped, so the account never runs behind.
The charges go into the metrics lines, which every checkpoint holds, so a resumed run
rebuilds the same account.
"""

from __future__ import annotations

import dataclasses
import logging
import math
from collections.abc import Mapping, Sequence
from typing import Any, Protocol

import numpy as np

from common import dp
from common.codec import AdapterState
from common.config import DpConfig
from server.summation import RoundSum

log = logging.getLogger(__name__)


class BudgetExhausted(Exception):
    """One more round would take epsilon above ``dp.target-epsilon``."""


class PrivacyStats(Protocol):
    """Where the round's privacy metrics go (the strategy's round report)."""

    privacy: dict[str, float]


class ClientLevelDP:
    """Clipping, noise and accounting of DP-FedAvg on the coordinator.

    Parameters
    ----------
    settings : DpConfig
        Mode, clip norm, noise multiplier, delta and budget.
    rows : Sequence[Mapping], optional
        The metrics lines of the rounds already run (a resumed run).
    rng : numpy.random.Generator, optional
        Source of the central noise; a CSPRNG-seeded one by default.
    """

    def __init__(
        self,
        settings: DpConfig,
        rows: Sequence[Mapping[str, Any]] = (),
        rng: np.random.Generator | None = None,
    ) -> None:
        self.settings = settings
        self.accountant = dp.PrivacyAccountant(
            settings.delta, dp.charges_from_rows(rows)
        )
        self.rng = rng or dp.secure_generator()
        self._charge: dp.RoundCharge | None = None
        self._expected = 0
        self._epsilon = self.accountant.epsilon()

    @property
    def epsilon(self) -> float:
        """Epsilon at ``dp.delta`` of the rounds charged so far."""
        return self._epsilon

    def begin_round(self, sampled: int, available: int) -> None:
        """Take note of the round's sample and check the budget.

        Raises
        ------
        BudgetExhausted
            When this round would take epsilon above ``dp.target-epsilon``; nothing
            has been sent yet.
        """
        self._expected = sampled
        self._charge = None
        if sampled < 1:
            return
        charge = dp.RoundCharge(sampled / available, self.settings.noise_multiplier)
        if self.accountant.would_exceed(self.settings.target_epsilon, charge):
            raise BudgetExhausted(
                f"one more round would take epsilon from {self._epsilon:.4g} to "
                f"{self.accountant.epsilon([charge]):.4g}, above dp.target-epsilon = "
                f"{self.settings.target_epsilon:g} (delta = {self.settings.delta:g})"
            )
        self._charge = charge

    def release(self, summed: RoundSum | None, stats: PrivacyStats) -> RoundSum | None:
        """Charge the round and turn its sum into what the rule may see: clipped,
        unweighted, noised (central mode) and with weight ``m``.

        Returns ``None`` when nothing was summed.
        """
        if self._charge is None:
            # No client was sampled (or begin_round was skipped): release nothing.
            return None
        survivors = summed.count if summed is not None else 0
        shortfall = 0.0
        charge = self._charge
        if self.settings.mode == "distributed":
            shortfall = dp.noise_shortfall(survivors, self._expected)
            # With no survivor nothing is released: the nominal charge stands.
            if 0 < shortfall < 1:
                charge = dataclasses.replace(
                    charge,
                    noise_multiplier=charge.noise_multiplier * math.sqrt(1 - shortfall),
                )
                log.warning(
                    "distributed DP: %d of %d clients survived, so %.0f%% of the "
                    "noise variance is missing; the round is charged at noise "
                    "multiplier %.3g",
                    survivors,
                    self._expected,
                    100 * shortfall,
                    charge.noise_multiplier,
                )
        self.accountant.record(charge)
        self._epsilon = self.accountant.epsilon()
        self._charge = None
        stats.privacy = {
            dp.EPSILON: self._epsilon,
            dp.SAMPLING_RATE: charge.sampling_rate,
            dp.NOISE_MULTIPLIER: charge.noise_multiplier,
            dp.NOISE_SHORTFALL: shortfall,
        }
        if summed is None:
            return None
        total = self._clipped_sum(summed)
        if self.settings.mode == "central":
            total = dp.add_noise(
                total,
                self.settings.noise_multiplier * self.settings.clip_norm,
                self.rng,
            )
        # The rule sees only the noised sum: no individual update goes past here.
        return dataclasses.replace(
            summed, total=total, weight=float(self._expected), contributions=[]
        )

    def metrics(self) -> dict[str, float]:
        """The account so far, for a metrics line outside a round (round 0)."""
        return {dp.EPSILON: self._epsilon}

    def summary(self) -> dict[str, Any]:
        """What ``summary.json`` records about privacy."""
        return {
            "level": "client",
            "epsilon": self._epsilon,
            "delta": self.settings.delta,
            "mode": self.settings.mode,
            "clip_norm": self.settings.clip_norm,
            "noise_multiplier": self.settings.noise_multiplier,
            "target_epsilon": self.settings.target_epsilon,
            "rounds_charged": len(self.accountant.charges),
        }

    def _clipped_sum(self, summed: RoundSum) -> AdapterState:
        """The unweighted sum of the clipped deltas.

        A plain sum keeps the individual deltas: clip each here (the coordinator need
        not trust the clients' clipping) and add them with weight 1. A secure sum is
        already that (clients clip and send weight 1).
        """
        if not summed.contributions:
            return dict(summed.total)
        clip = self.settings.clip_norm
        total = {k: np.zeros(v.shape, np.float64) for k, v in summed.total.items()}
        for contribution in summed.contributions:
            clipped = dp.clip_to_norm(contribution.change, clip)
            for name in total:
                total[name] += clipped[name]
        return {k: v.astype(np.float32) for k, v in total.items()}


def privacy_summary(
    settings: DpConfig,
    privacy: ClientLevelDP | None,
    rows: Sequence[Mapping[str, Any]],
) -> dict[str, Any]:
    """``summary.json``'s ``privacy``: the coordinator's account (client level), or
    the largest epsilon any site reported (sample level: each site keeps its own)."""
    if privacy is not None:
        return privacy.summary()
    return {
        "level": settings.level,
        "delta": settings.delta,
        "sample_epsilon_max": max(
            (row.get("sample_epsilon_max", 0.0) for row in rows), default=0.0
        ),
    }


__all__ = ["BudgetExhausted", "ClientLevelDP", "privacy_summary"]
