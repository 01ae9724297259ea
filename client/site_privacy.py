"""A site's own limits on client-level DP, and its own account.

The coordinator sends sigma, C and the run config; a site need not take them on
trust. Before it trains, a site with limits in its node config checks the round::

    instructions -> the round's noise multiplier z (adaptive clipping: the delta's
    and the count's combined, Andrew et al. 2021 Theorem 1) and C -> floors
    (dp-min-noise-multiplier, dp-max-clip-norm; with either set, DP must be on and
    client-level DP distributed, or the coordinator would see the delta unnoised)
    -> the site's ledger: would this round take its epsilon above dp-max-epsilon?
    -> train -> charge the round to the ledger

The ledger holds every client-level round the site has trained, in every run, in
``privacy-ledger.json`` of its state folder (client.site_state.site_folder), so a
coordinator can reset it neither by resuming nor by starting a new run. Each round
is charged at ``q = 1``: the coordinator knows whom it sampled, so against it no
amplification by sampling holds. Epsilon is dp-accounting's (common.dp's
accountant) at the node config ``dp-delta``, not at the run's.

With ``dp.level = sample`` the site keeps a second ledger,
``privacy-ledger-sample.json`` (per-row epsilon, another guarantee): every DP-SGD
step it takes at its Poisson rate, checked against the same ``dp-max-epsilon``
with the round's planned steps before it trains.

In distributed mode the noise is the sum of ``m`` sites' shares; the account assumes
they are added, not that the coordinator is honest about sigma, C or ``m``: the site
refuses an ``m`` above the cohort it can see and unmasks only a sum of at least ``m``
survivors (client.site_policy, ``check_noise_shares`` and ``check_noise_survivors``).
"""

from __future__ import annotations

import json
import logging
import math
import os
import tempfile
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

from common import dp
from common.config import RunConfig

log = logging.getLogger(__name__)

MIN_NOISE_KEY = "dp-min-noise-multiplier"
MAX_CLIP_KEY = "dp-max-clip-norm"
MAX_EPSILON_KEY = "dp-max-epsilon"
DELTA_KEY = "dp-delta"
LEDGER_FILE = "privacy-ledger.json"
#: DP-SGD's ledger: per-row epsilon, a different guarantee, so a separate account.
SAMPLE_LEDGER_FILE = "privacy-ledger-sample.json"


class SiteRefusal(RuntimeError):
    """The site will not train this round; the message names the node config key."""


def _float_key(node_config: Mapping[str, object], key: str, default: float) -> float:
    value = node_config.get(key, default)
    try:
        number = float(str(value))
    except ValueError:
        number = math.nan
    if not (math.isfinite(number) and number >= 0):
        raise SiteRefusal(
            f"node config {key} = {value!r} must be a finite number >= 0 "
            "(0 = no limit); fix --node-config"
        )
    return number


@dataclass(frozen=True)
class SiteLimits:
    """The node config's limits (0 = none).

    Attributes
    ----------
    min_noise_multiplier : float
        The least noise multiplier a round may have.
    max_clip_norm : float
        The largest clip norm a round may have.
    max_epsilon : float
        The site's own budget, over every run.
    delta : float
        Where the site reads its epsilon.
    """

    min_noise_multiplier: float = 0.0
    max_clip_norm: float = 0.0
    max_epsilon: float = 0.0
    delta: float = 1e-5

    @classmethod
    def from_node_config(cls, node_config: Mapping[str, object]) -> SiteLimits:
        """Read and check the keys.

        Raises
        ------
        SiteRefusal
            Naming a key whose value is not a finite number >= 0 (or a delta
            outside (0, 1)).
        """
        limits = cls(
            _float_key(node_config, MIN_NOISE_KEY, 0.0),
            _float_key(node_config, MAX_CLIP_KEY, 0.0),
            _float_key(node_config, MAX_EPSILON_KEY, 0.0),
            _float_key(node_config, DELTA_KEY, 1e-5),
        )
        if not 0 < limits.delta < 1:
            raise SiteRefusal(f"node config {DELTA_KEY} must be in (0, 1)")
        return limits

    @property
    def demands_dp(self) -> bool:
        """A floor or ceiling is set: the site trains only under DP it can check."""
        return self.min_noise_multiplier > 0 or self.max_clip_norm > 0

    def check(self, config: RunConfig, noise_multiplier: float, clip: float) -> None:
        """Refuse a round below the floors.

        Raises
        ------
        SiteRefusal
            Saying which limit the coordinator's round breaks.
        """
        dp_on = config.dp.enabled
        if self.demands_dp and not dp_on:
            raise SiteRefusal(
                f"node config {MIN_NOISE_KEY} / {MAX_CLIP_KEY} set: this site trains "
                "only under DP, and the coordinator sent dp.enabled = false"
            )
        if (
            self.demands_dp
            and config.dp.client_level
            and config.dp.mode != "distributed"
        ):
            raise SiteRefusal(
                f"node config {MIN_NOISE_KEY} / {MAX_CLIP_KEY} set: client-level DP "
                f"must be dp.mode = distributed (the coordinator asked for "
                f"{config.dp.mode!r}, in which it sees this site's delta unnoised)"
            )
        if dp_on and noise_multiplier < self.min_noise_multiplier:
            raise SiteRefusal(
                f"the coordinator's noise multiplier {noise_multiplier:g} is below "
                f"node config {MIN_NOISE_KEY} = {self.min_noise_multiplier:g}"
            )
        if dp_on and self.max_clip_norm and clip > self.max_clip_norm:
            raise SiteRefusal(
                f"the coordinator's clip norm {clip:g} is above node config "
                f"{MAX_CLIP_KEY} = {self.max_clip_norm:g}"
            )


def round_noise_multiplier(
    delta_noise_multiplier: float, count_stddev: float, adaptive: bool
) -> float:
    """The round's noise multiplier from what the site is told: the delta's, or
    with adaptive clipping the delta's and the count's combined,
    ``(sigma_delta^-2 + (2 sigma_b)^-2)^-1/2``."""
    if not adaptive or count_stddev <= 0:
        return delta_noise_multiplier
    return float((delta_noise_multiplier**-2 + (2 * count_stddev) ** -2) ** -0.5)


class SiteLedger:
    """Every client-level round a site has trained, on its disk.

    Parameters
    ----------
    folder : Path
        The site's state folder (every run).
    delta : float
        Where epsilon is read.
    """

    def __init__(self, folder: Path, delta: float, name: str = LEDGER_FILE) -> None:
        self.path = folder / name
        self.delta = delta

    def charges(self) -> list[dp.RoundCharge]:
        """The rounds charged so far."""
        if not self.path.exists():
            return []
        try:
            rows = json.loads(self.path.read_text())
            return [
                dp.RoundCharge(float(row["sampling_rate"]), float(row["noise"]))
                for row in rows
                for _ in range(int(row.get("count", 1)))
            ]
        except (ValueError, KeyError, TypeError) as error:
            raise SiteRefusal(
                f"{self.path}: unreadable privacy ledger ({error}); this site will "
                "not train until it is restored (deleting it forgets spent privacy)"
            ) from None

    def epsilon(self, extra: tuple[dp.RoundCharge, ...] = ()) -> float:
        """The site's epsilon at :attr:`delta` (with ``extra`` rounds)."""
        return dp.PrivacyAccountant(self.delta, self.charges()).epsilon(extra)

    def admit(self, charge: dp.RoundCharge, max_epsilon: float, count: int = 1) -> None:
        """Refuse the round (``count`` times ``charge``) when it would take the
        site above ``max_epsilon``.

        Raises
        ------
        SiteRefusal
            Naming ``dp-max-epsilon`` and the epsilon the round would reach.
        """
        if max_epsilon <= 0:
            return
        after = self.epsilon((charge,) * count)
        if after > max_epsilon:
            raise SiteRefusal(
                f"this round would take the site's epsilon from "
                f"{self.epsilon():.4g} to {after:.4g} (delta = {self.delta:g}), "
                f"above node config {MAX_EPSILON_KEY} = {max_epsilon:g}"
            )

    def record(self, charge: dp.RoundCharge, count: int = 1) -> None:
        """Add one round of ``count`` times ``charge`` (written to a temporary
        name, synced, renamed)."""
        rows = json.loads(self.path.read_text()) if self.path.exists() else []
        self.charges()  # refuses a damaged ledger rather than overwrite it
        rows.append(
            {
                "sampling_rate": charge.sampling_rate,
                "noise": charge.noise_multiplier,
                "count": count,
            }
        )
        self.path.parent.mkdir(parents=True, exist_ok=True)
        handle, staging = tempfile.mkstemp(prefix=".ledger.", dir=self.path.parent)
        with os.fdopen(handle, "w") as stream:
            json.dump(rows, stream)
            stream.flush()
            os.fsync(stream.fileno())
        os.replace(staging, self.path)


def admit_round(
    config: RunConfig,
    node_config: Mapping[str, object],
    folder: Path,
    noise_multiplier: float,
    clip: float,
) -> tuple[SiteLedger, dp.RoundCharge] | None:
    """Check a client-level round against the site's limits and ledger before it
    trains; returns the ledger and the charge to record once it has trained (none
    for a round without client-level DP).

    Raises
    ------
    SiteRefusal
        When a limit refuses the round (the site logs why).
    """
    limits = SiteLimits.from_node_config(node_config)
    try:
        limits.check(config, noise_multiplier, clip)
        if not config.dp.client_level:
            return None
        ledger = SiteLedger(folder, limits.delta)
        charge = dp.RoundCharge(1.0, noise_multiplier)
        ledger.admit(charge, limits.max_epsilon)
    except SiteRefusal as refusal:
        log.warning("refusing the round: %s", refusal)
        raise
    return ledger, charge


def admit_sample_round(
    config: RunConfig,
    node_config: Mapping[str, object],
    folder: Path,
    num_rows: int,
    batch_size: int,
    steps: int,
) -> tuple[SiteLedger, dp.RoundCharge] | None:
    """Check a DP-SGD round of ``steps`` steps at the Poisson rate of
    ``batch_size`` over ``num_rows`` rows against the
    site's ``dp-max-epsilon`` (its sample-level ledger, every run); returns the
    ledger and the per-step charge to record once it has trained (none without
    ``dp.level = sample``).

    Raises
    ------
    SiteRefusal
        When the round would take the site's sample-level epsilon above its budget.
    """
    if not config.dp.sample_level or num_rows < 1:
        return None
    limits = SiteLimits.from_node_config(node_config)
    ledger = SiteLedger(folder, limits.delta, SAMPLE_LEDGER_FILE)
    charge = dp.RoundCharge(
        dp.dp_sgd_sample_rate(num_rows, batch_size),
        config.dp.noise_multiplier,
    )
    try:
        ledger.admit(charge, limits.max_epsilon, steps)
    except SiteRefusal as refusal:
        log.warning("refusing the round: %s", refusal)
        raise
    return ledger, charge


__all__ = [
    "DELTA_KEY",
    "LEDGER_FILE",
    "MAX_CLIP_KEY",
    "MAX_EPSILON_KEY",
    "MIN_NOISE_KEY",
    "SAMPLE_LEDGER_FILE",
    "SiteLedger",
    "SiteLimits",
    "SiteRefusal",
    "admit_round",
    "admit_sample_round",
    "round_noise_multiplier",
]
