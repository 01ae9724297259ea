"""Client-level differential privacy: clipping, Gaussian noise and the accountant.

DP-FedAvg (McMahan et al., ICLR 2018) bounds each client's influence on a round by
clipping its delta to L2 norm ``C`` and hides it with Gaussian noise of standard
deviation ``sigma * C`` on the sum of the clipped deltas. Both sides use this module:
the client clips (and, in distributed mode, adds its share of the noise); the
coordinator adds the noise in central mode and keeps the account.

Adaptive clipping (Andrew et al., NeurIPS 2021) replaces the fixed ``C`` by one that
follows a quantile of the clients' update norms: each client reports the bit
``b_i = 1[||delta_i|| <= C]``, the coordinator estimates the unclipped share
``b = (sum b_i + N(0, sigma_b^2)) / m`` and moves ``C`` geometrically towards the target
quantile. The count costs privacy too, so the delta's noise multiplier is raised to
keep the round's total at the configured one (:func:`delta_noise_multiplier`).

Noise takes every one of its random bits from the operating system's CSPRNG
(:class:`SecureNormal`, through :mod:`secrets`): no generator state exists that
earlier draws could reveal, so the noise can be neither predicted nor replayed. The accountant is dp-accounting's RDP accountant; nothing here
computes a privacy loss by itself.
"""

from __future__ import annotations

import math
import secrets
from collections import Counter
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Protocol

import numpy as np

from common.codec import AdapterState, l2_norm

#: Metric keys of a DP round in ``metrics.jsonl`` (the accountant is rebuilt from them).
EPSILON = "epsilon"
SAMPLING_RATE = "dp_sampling_rate"
NOISE_MULTIPLIER = "dp_noise_multiplier"
NOISE_SHORTFALL = "dp_noise_shortfall"
#: Adaptive clipping: the round's C, the noisy unclipped share and sigma_b.
CLIP_NORM = "dp_clip_norm"
UNCLIPPED_FRACTION = "dp_unclipped_fraction"
COUNT_STDDEV = "dp_count_stddev"


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


class NormalSource(Protocol):
    """Where Gaussian noise comes from: :class:`SecureNormal`, or in tests a
    seeded ``numpy.random.Generator``."""

    def normal(self, loc: float = 0.0, scale: float = 1.0, size: Any = None) -> Any:
        """``N(loc, scale^2)`` draws of shape ``size`` (a float when ``None``)."""
        ...


class SecureNormal:
    """Gaussian draws from the OS's CSPRNG.

    Each pair of draws takes two 64-bit words from ``secrets.token_bytes``, turns
    their top 53 bits into uniforms in (0, 1) and those into two independent
    standard normals (the Box-Muller transform). Nothing is kept between calls.
    """

    def normal(self, loc: float = 0.0, scale: float = 1.0, size: Any = None) -> Any:
        """``N(loc, scale^2)`` draws of shape ``size`` (a float when ``None``)."""
        if size is None or isinstance(size, int | np.integer):
            shape: tuple[int, ...] = () if size is None else (int(size),)
        else:
            shape = tuple(int(n) for n in size)
        count = math.prod(shape)
        pairs = (count + 1) // 2
        words = np.frombuffer(secrets.token_bytes(16 * pairs), "<u8").reshape(2, -1)
        uniform = ((words >> np.uint64(11)).astype(np.float64) + 0.5) * 2.0**-53
        radius = np.sqrt(-2.0 * np.log(uniform[0]))  # (pairs,) float64
        angle = 2.0 * np.pi * uniform[1]
        draws = np.concatenate([radius * np.cos(angle), radius * np.sin(angle)])
        values = loc + scale * draws[:count].reshape(shape)
        return float(values) if size is None else values


def secure_generator() -> SecureNormal:
    """The noise source of every DP mechanism in a run: :class:`SecureNormal`."""
    return SecureNormal()


def gaussian_noise(
    shape: int | tuple[int, ...], std: float, rng: NormalSource
) -> np.ndarray:
    """``N(0, std^2)`` per coordinate, float64."""
    return rng.normal(0.0, std, size=shape)


def add_noise(
    state: Mapping[str, np.ndarray], std: float, rng: NormalSource
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


def is_unclipped(delta: Mapping[str, np.ndarray], clip_norm: float) -> bool:
    """``b_i``: whether ``delta`` fits within ``clip_norm`` unscaled (Andrew et al.
    2021 count the clients at or below the bound)."""
    return l2_norm(delta) <= clip_norm


def centred_bit(unclipped: bool) -> float:
    """``b_i - 1/2``: what is summed and noised. One client changes a sum of centred
    bits by 1/2, the sensitivity Theorem 1 of Andrew et al. 2021 assumes."""
    return 0.5 if unclipped else -0.5


def default_count_stddev(expected_clients: int) -> float:
    """The paper's ``sigma_b = m / 20`` for ``m`` expected clients per round."""
    return expected_clients / 20


def delta_noise_multiplier(noise_multiplier: float, count_stddev: float) -> float:
    """The delta's noise multiplier that keeps a round with adaptive clipping at
    ``noise_multiplier`` in total.

    Releasing the clipped sum with noise multiplier ``sigma_delta`` and the count of
    unclipped clients (sensitivity 1/2 once centred) with std ``sigma_b`` is as
    private as one Gaussian mechanism with ``z^-2 = sigma_delta^-2 + (2 sigma_b)^-2``
    (Andrew et al. 2021, Theorem 1), so ``sigma_delta = (z^-2 - (2 sigma_b)^-2)^-1/2``.

    Raises
    ------
    ValueError
        When ``2 sigma_b <= z``: the count alone would spend the whole budget.
    """
    if noise_multiplier <= 0 or 2 * count_stddev <= noise_multiplier:
        raise ValueError(
            f"the clipped-count noise sigma_b = {count_stddev:g} must be above half "
            f"the noise multiplier z / 2 = {noise_multiplier / 2:g}"
        )
    return float((noise_multiplier**-2 - (2 * count_stddev) ** -2) ** -0.5)


def noisy_unclipped_fraction(
    centred_count: float, expected_clients: float, std: float, rng: NormalSource
) -> float:
    """``(sum(b_i - 1/2) + N(0, std^2)) / m + 1/2``: the released estimate of the
    unclipped share, from the sum of centred bits (``std = 0`` adds nothing;
    distributed mode passes the already noised sum)."""
    noise = float(rng.normal(0.0, std)) if std > 0 else 0.0
    return (centred_count + noise) / max(expected_clients, 1.0) + 0.5


def next_clip_norm(
    clip_norm: float, unclipped_fraction: float, target_quantile: float, lr: float
) -> float:
    """The geometric update ``C exp(-eta_C (b - gamma))`` (Andrew et al. 2021, eq. 3).

    More clients within the bound than the target (``b > gamma``) shrink ``C``; fewer
    grow it. (flwr's adaptive-clipping wrappers count the *clipped* clients under the
    same formula; here ``b`` counts the unclipped ones, as in the paper.)
    """
    return clip_norm * math.exp(-lr * (unclipped_fraction - target_quantile))


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


def dp_sgd_sample_rate(num_rows: int, batch_size: int) -> float:
    """The Poisson sampling rate DP-SGD (Opacus) uses for a site of ``num_rows``
    rows: one over the number of batches of ``batch_size``."""
    return 1 / math.ceil(num_rows / min(batch_size, num_rows))


def dp_sgd_round_steps(
    num_rows: int, batch_size: int, epochs: float, max_steps: int
) -> int:
    """The DP-SGD steps a site takes in a round: ``epochs`` passes of
    ``1 / q`` batches, at most ``max_steps`` (0 = no cap)."""
    steps = math.ceil(epochs * math.ceil(num_rows / min(batch_size, num_rows)))
    return min(steps, max_steps) if max_steps else steps


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


def clip_norm_from_rows(
    rows: Iterable[Mapping[str, Any]],
    initial: float,
    target_quantile: float,
    lr: float,
    ceiling: float = math.inf,
) -> float:
    """The clip norm of the round after ``rows`` (a resumed adaptive run): the last
    round's ``C`` moved by its released unclipped share, exactly as the coordinator
    moved it; ``initial`` before any."""
    clip = initial
    for row in rows:
        if row.get(CLIP_NORM) is None:
            continue
        clip = float(row[CLIP_NORM])
        if row.get(UNCLIPPED_FRACTION) is not None:
            clip = min(
                ceiling,
                next_clip_norm(
                    clip, float(row[UNCLIPPED_FRACTION]), target_quantile, lr
                ),
            )
    return clip


def count_stddev_from_rows(rows: Iterable[Mapping[str, Any]]) -> float | None:
    """The ``sigma_b`` a resumed adaptive run fixed in its first round, if any."""
    for row in rows:
        if row.get(COUNT_STDDEV) is not None:
            return float(row[COUNT_STDDEV])
    return None


def charges_from_rows(rows: Iterable[Mapping[str, Any]]) -> list[RoundCharge]:
    """The rounds a run has spent, from its metrics lines (a checkpoint's rows)."""
    return [
        RoundCharge(float(row[SAMPLING_RATE]), float(row[NOISE_MULTIPLIER]))
        for row in rows
        if row.get(SAMPLING_RATE) is not None and row.get(NOISE_MULTIPLIER) is not None
    ]


__all__ = [
    "CLIP_NORM",
    "COUNT_STDDEV",
    "EPSILON",
    "NOISE_MULTIPLIER",
    "NOISE_SHORTFALL",
    "SAMPLING_RATE",
    "UNCLIPPED_FRACTION",
    "NormalSource",
    "PrivacyAccountant",
    "RoundCharge",
    "SecureNormal",
    "add_noise",
    "charges_from_rows",
    "clip_norm_from_rows",
    "clip_to_norm",
    "count_stddev_from_rows",
    "default_count_stddev",
    "delta_noise_multiplier",
    "distributed_noise_std",
    "dp_sgd_sample_rate",
    "dp_sgd_round_steps",
    "gaussian_noise",
    "is_unclipped",
    "next_clip_norm",
    "noise_multiplier_for",
    "noise_shortfall",
    "noisy_unclipped_fraction",
    "secure_generator",
]
