"""Client-level differential privacy: clipping, Gaussian noise and the accountant.

DP-FedAvg (McMahan et al., ICLR 2018) bounds each client's influence on a round by
clipping its delta to L2 norm ``C`` and hides it with Gaussian noise of standard
deviation ``sigma * C`` on the sum of the clipped deltas. Both sides use this module:
the client clips (and, in distributed mode, adds its share of the noise); the
coordinator adds the noise in central mode and keeps the account.

Noise comes from numpy's PCG64 seeded with 256 bits from the operating system's
CSPRNG (:func:`secure_generator`): the seed cannot be guessed or replayed, so neither
can the noise. The accountant is dp-accounting's RDP accountant; nothing here
computes a privacy loss by itself.
"""

from __future__ import annotations

import math
import secrets
from collections import Counter
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from common.codec import AdapterState, l2_norm

#: Metric keys of a DP round in ``metrics.jsonl`` (the accountant is rebuilt from them).
EPSILON = "epsilon"
SAMPLING_RATE = "dp_sampling_rate"
NOISE_MULTIPLIER = "dp_noise_multiplier"
NOISE_SHORTFALL = "dp_noise_shortfall"


def clip_to_norm(delta: Mapping[str, np.ndarray], clip_norm: float) -> AdapterState:
    """Scale ``delta`` so that its global L2 norm is at most ``clip_norm``.

    Parameters
    ----------
    delta : Mapping[str, np.ndarray]
        Named float32 tensors (one client's update).
    clip_norm : float
        The bound ``C`` (> 0).

    Returns
    -------
    AdapterState
        ``delta * min(1, C / ||delta||)`` as float32; unchanged (copied) when already
        within the bound. The scale carries a 1e-6 margin, so float32 rounding never
        leaves the result above ``C``.
    """
    if clip_norm <= 0:
        raise ValueError(f"clip norm must be > 0, got {clip_norm}")
    norm = l2_norm(delta)
    factor = clip_norm / norm * (1.0 - 1e-6) if norm > clip_norm else 1.0
    return {
        k: (np.asarray(v, np.float32) * np.float32(factor)) for k, v in delta.items()
    }


def secure_generator() -> np.random.Generator:
    """A fresh generator seeded with 256 bits from the OS's CSPRNG (``secrets``)."""
    return np.random.Generator(np.random.PCG64(secrets.randbits(256)))


def gaussian_noise(
    shape: int | tuple[int, ...], std: float, rng: np.random.Generator
) -> np.ndarray:
    """``N(0, std^2)`` per coordinate, float64."""
    return rng.normal(0.0, std, size=shape)


def add_noise(
    state: Mapping[str, np.ndarray], std: float, rng: np.random.Generator
) -> AdapterState:
    """``state`` plus independent ``N(0, std^2)`` on every coordinate (float32).

    Tensors are visited in sorted-name order, so one generator gives one draw per
    coordinate whatever order ``state`` was built in.
    """
    return {
        name: (
            np.asarray(state[name], np.float64)
            + gaussian_noise(np.shape(state[name]), std, rng)
        ).astype(np.float32)
        for name in sorted(state)
    }


def distributed_noise_std(
    noise_multiplier: float, clip_norm: float, expected_clients: int
) -> float:
    """Each client's noise std in distributed mode: ``sigma * C / sqrt(m)``.

    The sum of ``m`` such independent draws has std ``sigma * C``, the central
    mechanism's.

    Raises
    ------
    ValueError
        When ``expected_clients`` is below 1.
    """
    if expected_clients < 1:
        raise ValueError(
            f"distributed DP needs the expected number of clients m >= 1, got "
            f"{expected_clients}"
        )
    return noise_multiplier * clip_norm / math.sqrt(expected_clients)


def noise_shortfall(survivors: int, expected_clients: int) -> float:
    """Share of the intended noise variance missing from a distributed-DP sum when
    only ``survivors`` of the ``expected_clients`` noise shares arrived."""
    if expected_clients < 1:
        return 0.0
    return max(0.0, 1.0 - survivors / expected_clients)


@dataclass(frozen=True)
class RoundCharge:
    """One round as a mechanism: Poisson sampling at ``sampling_rate`` of a Gaussian
    mechanism with ``noise_multiplier`` (std over sensitivity)."""

    sampling_rate: float
    noise_multiplier: float


class PrivacyAccountant:
    """The (epsilon, delta) of a run so far, from dp-accounting's RDP accountant.

    Each round is a ``PoissonSampledDpEvent(q, GaussianDpEvent(sigma))``; the run is
    their composition under add-or-remove-one-client adjacency.

    Parameters
    ----------
    delta : float
        The delta epsilon is reported at.
    charges : Iterable[RoundCharge], optional
        Rounds already spent (a resumed run).
    """

    def __init__(self, delta: float, charges: Iterable[RoundCharge] = ()) -> None:
        self.delta = delta
        self.charges: list[RoundCharge] = list(charges)

    def record(self, charge: RoundCharge) -> None:
        """Add one round."""
        self.charges.append(charge)

    def epsilon(self, extra: Sequence[RoundCharge] = ()) -> float:
        """Epsilon at :attr:`delta` of the recorded rounds (plus ``extra``); 0 before
        any."""
        charges = [*self.charges, *extra]
        if not charges:
            return 0.0
        from dp_accounting import GaussianDpEvent, PoissonSampledDpEvent
        from dp_accounting.rdp import RdpAccountant

        accountant = RdpAccountant()
        # RDP adds up over rounds: compose each distinct mechanism once, times count.
        for charge, count in sorted(Counter(charges).items(), key=_charge_order):
            event = PoissonSampledDpEvent(
                charge.sampling_rate, GaussianDpEvent(charge.noise_multiplier)
            )
            accountant.compose(event, count)
        return float(accountant.get_epsilon(self.delta))

    def would_exceed(self, target_epsilon: float, charge: RoundCharge) -> bool:
        """Whether one more round ``charge`` would take epsilon above
        ``target_epsilon`` (never, when the target is 0: no budget)."""
        return target_epsilon > 0 and self.epsilon([charge]) > target_epsilon


def noise_multiplier_for(
    target_epsilon: float, delta: float, rounds: int, sampling_rate: float
) -> float:
    """The smallest noise multiplier whose ``rounds`` rounds at ``sampling_rate``
    stay within ``target_epsilon`` at ``delta`` (dp-accounting's calibration, over the
    same RDP accountant as :class:`PrivacyAccountant`).

    Raises
    ------
    ValueError
        When the target, delta, rounds or rate are out of range.
    """
    if target_epsilon <= 0 or not 0 < delta < 1 or rounds < 1:
        raise ValueError(
            "need target_epsilon > 0, 0 < delta < 1 and rounds >= 1, got "
            f"{target_epsilon}, {delta}, {rounds}"
        )
    if not 0 < sampling_rate <= 1:
        raise ValueError(f"sampling rate must be in (0, 1], got {sampling_rate}")
    import dp_accounting
    from dp_accounting.rdp import RdpAccountant

    def event(sigma: float) -> dp_accounting.DpEvent:
        return dp_accounting.SelfComposedDpEvent(
            dp_accounting.PoissonSampledDpEvent(
                sampling_rate, dp_accounting.GaussianDpEvent(sigma)
            ),
            rounds,
        )

    sigma = dp_accounting.calibrate_dp_mechanism(
        RdpAccountant,
        event,
        target_epsilon,
        delta,
        dp_accounting.LowerEndpointAndGuess(1e-3, 1.0),
        tol=1e-4,
    )
    return float(sigma)


def _charge_order(item: tuple[RoundCharge, int]) -> tuple[float, float]:
    return item[0].sampling_rate, item[0].noise_multiplier


def charges_from_rows(rows: Iterable[Mapping[str, Any]]) -> list[RoundCharge]:
    """The rounds a run has spent, from its metrics lines (a checkpoint's rows)."""
    return [
        RoundCharge(float(row[SAMPLING_RATE]), float(row[NOISE_MULTIPLIER]))
        for row in rows
        if row.get(SAMPLING_RATE) is not None and row.get(NOISE_MULTIPLIER) is not None
    ]


__all__ = [
    "EPSILON",
    "NOISE_MULTIPLIER",
    "NOISE_SHORTFALL",
    "SAMPLING_RATE",
    "PrivacyAccountant",
    "RoundCharge",
    "add_noise",
    "charges_from_rows",
    "clip_to_norm",
    "distributed_noise_std",
    "gaussian_noise",
    "noise_multiplier_for",
    "noise_shortfall",
    "secure_generator",
]
