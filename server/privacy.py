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

Each round is charged as ``PoissonSampledDpEvent(q, GaussianDpEvent(z))`` at the
probability ``q`` with which the sampler (server.sampling) took each node: with
``train.fraction < 1`` a secret Poisson sample at ``q = train.fraction`` (whose
members and size stay out of the metrics lines), else every node (``q = 1``). The
mean then divides by the expected cohort ``q n``, McMahan et al.'s fixed
denominator. A round is charged as soon as its clients are sampled, also when it is
later skipped (a Poisson sample below ``train.min-clients``, too few replies), so
the account never runs behind.
The charges go into the metrics lines, which every checkpoint holds, so a resumed run
rebuilds the same account.

Adaptive clipping (``dp.adaptive-clip``, Andrew et al. 2021)::

    round t: C_t in the instructions -> each client: b_i = 1[||delta_i|| <= C_t],
    clip to C_t -> count = sum b_i (+ N(0, sigma_b^2)) -> b = count / m ->
    C_(t+1) = C_t exp(-eta_C (b - gamma))

With a plain sum the coordinator sees each delta (clients send it unclipped), so it
measures the bits itself, clips, and adds the count's noise. Behind secure
aggregation each client appends its bit to the masked vector (after the weight), so
the coordinator learns only the sum: in central mode it adds ``N(0, sigma_b^2)`` to
it; in distributed mode each client adds ``N(0, sigma_b^2 / m)`` to its bit before
masking, like the delta's noise, so the exact count is never seen (and a dropout's
missing share is in the same ``dp_noise_shortfall``). There ``C`` is capped at
``secagg.clip-norm``, the bound the fixed-point range is sized for. The delta's noise
multiplier is raised to ``(z^-2 - (2 sigma_b)^-2)^-1/2`` so that each round still
costs ``z`` = ``dp.noise-multiplier``, which the accountant charges as before.
``sigma_b`` (``dp.clipped-count-stddev``, or ``m / 20`` for the first round's ``m``)
is fixed for the run. Each round's ``C`` and released share go into its metrics
line, from which a resumed run recomputes the next ``C``.
"""

from __future__ import annotations

import dataclasses
import logging
import math
from collections.abc import Mapping, Sequence
from typing import Any, Protocol

import numpy as np

from common import dp, keys
from common.codec import AdapterState
from common.config import ConfigError, DpConfig
from server.sampling import Cohort
from server.secagg import RingExtras
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
    rng : common.dp.NormalSource, optional
        Source of the central noise; the OS's CSPRNG by default.
    clip_ceiling : float, optional
        The largest clip norm adaptive clipping may reach (``secagg.clip-norm``
        behind secure aggregation).

    Attributes
    ----------
    clip_norm : float
        ``C`` of the current (or next) round.
    count_stddev : float or None
        ``sigma_b`` of adaptive clipping, once fixed (``None`` before the first round
        when it defaults to ``m / 20``).
    """

    def __init__(
        self,
        settings: DpConfig,
        rows: Sequence[Mapping[str, Any]] = (),
        rng: dp.NormalSource | None = None,
        clip_ceiling: float = math.inf,
    ) -> None:
        self.settings = settings
        self.accountant = dp.PrivacyAccountant(
            settings.delta, dp.charges_from_rows(rows)
        )
        self.rng = rng or dp.secure_generator()
        self.clip_ceiling = clip_ceiling
        self.clip_norm = settings.clip_norm
        self.count_stddev: float | None = None
        if settings.adaptive_clip:
            self.clip_norm = dp.clip_norm_from_rows(
                rows,
                settings.clip_norm,
                settings.target_quantile,
                settings.clip_lr,
                clip_ceiling,
            )
            self.count_stddev = (
                settings.clipped_count_stddev or dp.count_stddev_from_rows(rows)
            )
        self._charge: dp.RoundCharge | None = None
        # The round's cohort: the clients sent a training message (m, the noise
        # shares) and its expected size q n (the mean's denominator and the
        # unclipped share's).
        self._shares = 0
        self._expected = 0.0
        self._epsilon = self.accountant.epsilon()

    @property
    def adaptive(self) -> bool:
        """Adaptive clipping is on."""
        return self.settings.adaptive_clip

    @property
    def delta_noise_multiplier(self) -> float:
        """The noise multiplier of the delta: ``dp.noise-multiplier``, raised under
        adaptive clipping so that the count's release fits in the same budget."""
        if not self.adaptive or self.count_stddev is None:
            return self.settings.noise_multiplier
        return dp.delta_noise_multiplier(
            self.settings.noise_multiplier, self.count_stddev
        )

    def instructions(self) -> dict[str, float]:
        """What the clients need this round: ``C``, the delta's noise multiplier and
        ``sigma_b`` (they clip, count and, in distributed mode, add their shares)."""
        return {
            keys.CFG_DP_CLIP_NORM: self.clip_norm,
            keys.CFG_DP_NOISE_MULTIPLIER: self.delta_noise_multiplier,
            keys.CFG_DP_COUNT_STDDEV: self.count_stddev or 0.0,
        }

    def ring_extras(self) -> RingExtras:
        """What the clients add inside a secure sum: the delta's noise (distributed
        mode, ``sigma_delta C`` summed), the unclipped bit (adaptive clipping) and its
        noise (distributed mode, ``sigma_b`` summed)."""
        distributed = self.settings.mode == "distributed"
        return RingExtras(
            noise_std=(
                self.delta_noise_multiplier * self.clip_norm if distributed else 0.0
            ),
            tail=1 if self.adaptive else 0,
            tail_noise_std=(
                (self.count_stddev or 0.0) if distributed and self.adaptive else 0.0
            ),
        )

    @property
    def epsilon(self) -> float:
        """Epsilon at ``dp.delta`` of the rounds charged so far."""
        return self._epsilon

    def begin_round(self, cohort: Cohort) -> None:
        """Take note of the round's cohort and check the budget (and, in the first
        round of adaptive clipping, fix ``sigma_b``).

        Raises
        ------
        BudgetExhausted
            When this round would take epsilon above ``dp.target-epsilon``; nothing
            has been sent yet.
        ConfigError
            When the default ``sigma_b = m / 20`` is too small for
            ``dp.noise-multiplier``; nothing has been sent yet.
        """
        self._shares, self._expected = len(cohort.nodes), cohort.expected
        self._charge = None
        if cohort.available < 1:
            return
        if self.adaptive and self.count_stddev is None:
            self._fix_count_stddev(max(1, round(cohort.expected)))
        charge = dp.RoundCharge(cohort.sampling_rate, self.settings.noise_multiplier)
        if self.accountant.would_exceed(self.settings.target_epsilon, charge):
            raise BudgetExhausted(
                f"one more round would take epsilon from {self._epsilon:.4g} to "
                f"{self.accountant.epsilon([charge]):.4g}, above dp.target-epsilon = "
                f"{self.settings.target_epsilon:g} (delta = {self.settings.delta:g})"
            )
        self._charge = charge

    def expect_shares(self, count: int) -> None:
        """The round's training message goes to ``count`` clients (after secure
        aggregation's key stages, which may leave some sampled nodes out): the
        ``m`` they are told, each adding ``1 / m`` of the noise in distributed
        mode, and against which a shortfall of survivors is measured."""
        self._shares = count

    def release(self, summed: RoundSum | None, stats: PrivacyStats) -> RoundSum | None:
        """Charge the round and turn its sum into what the rule may see: clipped,
        unweighted, noised (central mode) and with weight ``m``.

        Returns ``None`` when nothing was summed.
        """
        if self._charge is None:
            # No node was online (or begin_round was skipped): release nothing.
            return None
        survivors = summed.count if summed is not None else 0
        shortfall = 0.0
        charge = self._charge
        if self.settings.mode == "distributed":
            shortfall = dp.noise_shortfall(survivors, self._shares)
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
                    self._shares,
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
        if self.adaptive:
            stats.privacy[dp.CLIP_NORM] = self.clip_norm
            stats.privacy[dp.COUNT_STDDEV] = self.count_stddev or 0.0
        if summed is None:
            return None
        total, unclipped = self._clipped_sum(summed)
        if self.settings.mode == "central":
            total = dp.add_noise(
                total, self.delta_noise_multiplier * self.clip_norm, self.rng
            )
        fraction = self._adapt(unclipped) if self.adaptive else None
        if fraction is not None:
            stats.privacy[dp.UNCLIPPED_FRACTION] = fraction
        # The rule sees only the noised sum: no individual update goes past here.
        return dataclasses.replace(
            summed, total=total, weight=float(self._expected), contributions=[]
        )

    def metrics(self) -> dict[str, float]:
        """The account so far, for a metrics line outside a round (round 0)."""
        if self.adaptive:
            return {dp.EPSILON: self._epsilon, dp.CLIP_NORM: self.clip_norm}
        return {dp.EPSILON: self._epsilon}

    def summary(self) -> dict[str, Any]:
        """What ``summary.json`` records about privacy."""
        summary = {
            "level": "client",
            "epsilon": self._epsilon,
            "delta": self.settings.delta,
            "mode": self.settings.mode,
            "clip_norm": self.settings.clip_norm,
            "noise_multiplier": self.settings.noise_multiplier,
            "target_epsilon": self.settings.target_epsilon,
            "rounds_charged": len(self.accountant.charges),
        }
        if self.adaptive:
            summary |= {
                "adaptive_clip": True,
                "next_clip_norm": self.clip_norm,
                "count_stddev": self.count_stddev,
                "delta_noise_multiplier": self.delta_noise_multiplier,
            }
        return summary

    def _fix_count_stddev(self, sampled: int) -> None:
        """Fix ``sigma_b = m / 20`` from the first round's sample, or refuse.

        Raises
        ------
        ConfigError
            When ``m / 10`` does not exceed ``dp.noise-multiplier``; nothing has been
            sent yet.
        """
        count_stddev = dp.default_count_stddev(sampled)
        z = self.settings.noise_multiplier
        if 2 * count_stddev <= z:
            raise ConfigError(
                f"config key 'dp.clipped-count-stddev': its default m / 20 = "
                f"{count_stddev:g} for m = {sampled} clients per round must be above "
                f"dp.noise-multiplier / 2 = {z / 2:g} with dp.adaptive-clip = true; "
                f"set dp.clipped-count-stddev above {z / 2:g}, sample more than "
                f"{10 * z:g} clients per round, or lower dp.noise-multiplier"
            )
        self.count_stddev = count_stddev

    def _adapt(self, unclipped: float | None) -> float | None:
        """Release the unclipped share and move ``C`` for the next round.

        ``unclipped`` is the exact sum of centred bits ``b_i - 1/2`` (central mode:
        the noise is added here) or the clients' noised one (distributed mode).
        Returns the released share, or ``None`` when the sum carried no count (``C``
        then stays).
        """
        if unclipped is None:
            log.warning("adaptive clipping: no unclipped count this round; C stays")
            return None
        central = self.settings.mode == "central"
        fraction = dp.noisy_unclipped_fraction(
            unclipped,
            self._expected,
            (self.count_stddev or 0.0) if central else 0.0,
            self.rng,
        )
        self.clip_norm = min(
            self.clip_ceiling,
            dp.next_clip_norm(
                self.clip_norm,
                fraction,
                self.settings.target_quantile,
                self.settings.clip_lr,
            ),
        )
        return fraction

    def _clipped_sum(self, summed: RoundSum) -> tuple[AdapterState, float | None]:
        """The unweighted sum of the clipped deltas, and the sum of the centred bits
        ``b_i - 1/2`` (``b_i = 1`` within ``C``).

        A plain sum keeps the individual deltas: clip each here (the coordinator need
        not trust the clients' clipping), count those within ``C`` and add them with
        weight 1. A secure sum is already that (clients clip and send weight 1, and
        under adaptive clipping their summed centred bits).
        """
        if not summed.contributions:
            return dict(summed.total), summed.unclipped
        clip = self.clip_norm
        total = {k: np.zeros(v.shape, np.float64) for k, v in summed.total.items()}
        unclipped = 0.0
        for contribution in summed.contributions:
            unclipped += dp.centred_bit(dp.is_unclipped(contribution.change, clip))
            clipped = dp.clip_to_norm(contribution.change, clip)
            for name in total:
                total[name] += clipped[name]
        return {k: v.astype(np.float32) for k, v in total.items()}, float(unclipped)


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
