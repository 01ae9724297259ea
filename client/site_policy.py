"""What a site demands of the coordinator before it masks: its own floors, its own
roster, and one masking per round, all from the site's node config and disk.

A coordinator chooses the threshold, the neighbourhoods and the cohort of every
round. A site that took them on trust could be asked for ``t = 1`` and have its
update unmasked (attack A of issue 19), or be sent the training message twice and
mask two updates under the same masks (attack C). The site therefore refuses, and
says why in its log, when a round falls below its floors, and records each masking
in its state folder before the masked vector leaves, so a second one is refused even
after a SuperNode restart.

With distributed DP the site adds ``1 / m`` of the round's noise, ``m`` as the
coordinator says; it refuses an ``m`` above the cohort announced for the masked
input or the sites on its roster, and helps unmask only a sum of at least ``m``
survivors (in malicious mode, each a distinct roster site that signed the set).

Node config keys (``--node-config``), all optional:

``state-dir``
    The site's state folder (default ``<cache-dir>/site-state``, as
    ``client.site_state``); maskings are recorded under ``secagg/``.
``secagg-min-threshold`` (default 2), ``secagg-min-neighbours`` (default 2),
``secagg-min-cohort`` (default 3)
    The least threshold, number of live neighbours and number of clients in a round
    this site takes part in. Two-site federations must lower them knowingly.
``secagg-roster``, ``secagg-signing-key``
    A roster of the sites' Ed25519 public keys and this site's private key: with a
    roster the site takes part only in ``secagg.mode = malicious`` rounds.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from common.backbone import default_cache_dir
from common.secagg.identity import Roster, load_signing_key
from common.secagg.protocol import (
    MALICIOUS,
    SECAGG_MODES,
    ProtocolViolation,
)

log = logging.getLogger(__name__)

#: Node config key -> default floor.
FLOOR_DEFAULTS = {
    "secagg-min-threshold": 2,
    "secagg-min-neighbours": 2,
    "secagg-min-cohort": 3,
}


class SiteRefusal(ProtocolViolation):
    """The site will not take part in this round; the message says why and which
    node config key would change it."""


def state_dir(node_config: Mapping[str, object]) -> Path:
    """The site's state folder: node config ``state-dir``, else
    ``<cache-dir>/site-state``."""
    configured = str(node_config.get("state-dir", ""))
    if configured:
        return Path(configured).expanduser()
    cache = str(node_config.get("cache-dir", ""))
    return (Path(cache).expanduser() if cache else default_cache_dir()) / "site-state"


def _floor(node_config: Mapping[str, object], key: str) -> int:
    value = node_config.get(key, FLOOR_DEFAULTS[key])
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise SiteRefusal(f"node config {key} = {value!r} must be an integer >= 1")
    return value


@dataclass(frozen=True)
class SitePolicy:
    """A site's demands on secure-aggregation rounds (see the module docstring)."""

    min_threshold: int
    min_neighbours: int
    min_cohort: int
    state: Path
    roster: Roster | None = None
    signing_key: Ed25519PrivateKey | None = None

    @classmethod
    def from_node_config(cls, node_config: Mapping[str, object]) -> SitePolicy:
        """Read the floors, state folder, roster and signing key.

        Raises
        ------
        SiteRefusal
            For a bad floor, or a roster without a signing key (or the reverse).
        """
        roster_path = str(node_config.get("secagg-roster", ""))
        key_path = str(node_config.get("secagg-signing-key", ""))
        if bool(roster_path) != bool(key_path):
            raise SiteRefusal(
                "node config secagg-roster and secagg-signing-key go together: "
                "set both (malicious-secure) or neither (honest-but-curious)"
            )
        return cls(
            min_threshold=_floor(node_config, "secagg-min-threshold"),
            min_neighbours=_floor(node_config, "secagg-min-neighbours"),
            min_cohort=_floor(node_config, "secagg-min-cohort"),
            state=state_dir(node_config),
            roster=Roster.load(Path(roster_path).expanduser()) if roster_path else None,
            signing_key=(
                load_signing_key(Path(key_path).expanduser()) if key_path else None
            ),
        )

    def check_mode(self, mode: str) -> None:
        """Refuse a mode this site does not accept (a site with a roster accepts only
        ``malicious``; one without cannot verify signatures)."""
        if mode not in SECAGG_MODES:
            raise SiteRefusal(f"unknown secure-aggregation mode {mode!r}")
        if self.roster is not None and mode != MALICIOUS:
            raise SiteRefusal(
                f"the coordinator asks for secagg.mode = {mode}, but this site holds "
                "a roster (node config secagg-roster) and masks only in "
                "secagg.mode = malicious rounds"
            )
        if self.roster is None and mode == MALICIOUS:
            raise SiteRefusal(
                "the coordinator asks for secagg.mode = malicious, but this site has "
                "no roster to verify its peers with: set node config secagg-roster "
                "and secagg-signing-key"
            )

    def check_threshold(self, threshold: int) -> None:
        """Refuse a threshold below ``secagg-min-threshold``."""
        if threshold < self.min_threshold:
            raise SiteRefusal(
                f"the coordinator asks for threshold {threshold}, below this site's "
                f"secagg-min-threshold = {self.min_threshold}: that few shares would "
                "rebuild this site's secrets"
            )

    def check_neighbours(self, threshold: int, neighbours: int) -> None:
        """Refuse fewer live neighbours than ``secagg-min-neighbours``, or a threshold
        at most half of them (two disjoint groups could then each rebuild one of
        this site's two secrets)."""
        if neighbours < self.min_neighbours:
            raise SiteRefusal(
                f"the coordinator gives this site {neighbours} live neighbour(s), "
                f"below its secagg-min-neighbours = {self.min_neighbours}"
            )
        if 2 * threshold <= neighbours:
            raise SiteRefusal(
                f"threshold {threshold} is not above half of this site's "
                f"{neighbours} neighbours"
            )

    def check_cohort(self, cohort: int) -> None:
        """Refuse a round with fewer clients than ``secagg-min-cohort``."""
        if cohort < self.min_cohort:
            raise SiteRefusal(
                f"the round has {cohort} client(s), below this site's "
                f"secagg-min-cohort = {self.min_cohort}: the sum would say too much "
                "about each of them"
            )

    def check_noise_shares(self, shares: int, cohort: int) -> None:
        """Distributed DP: refuse to add ``1 / shares`` of the round's noise when
        the site can see that fewer than ``shares`` sites take part (the cohort
        the coordinator announced for the masked input, and with a roster the
        sites on it). A coordinator that inflated ``m`` would otherwise have every
        site add too little noise.

        Raises
        ------
        SiteRefusal
            Naming ``m`` and the bound it exceeds.
        """
        if shares < 1:
            raise SiteRefusal(
                f"the coordinator asks for distributed DP noise shared among "
                f"m = {shares} sites; m must be at least 1"
            )
        if shares > cohort:
            raise SiteRefusal(
                f"the coordinator asks this site to add 1/{shares} of the round's DP "
                f"noise but announces a cohort of {cohort}: fewer than m = {shares} "
                "shares would leave the sum with too little noise"
            )
        if self.roster is not None and shares > len(self.roster):
            raise SiteRefusal(
                f"the coordinator asks this site to add 1/{shares} of the round's DP "
                f"noise, but its roster (secagg-roster) lists only "
                f"{len(self.roster)} sites"
            )

    def check_noise_survivors(self, shares: int, survivors: int) -> None:
        """Distributed DP, before unmasking: refuse a sum of fewer than ``shares``
        survivors (in malicious mode each one a distinct site of the roster that
        signed the survivor set), since it would carry less noise than the
        ``1 / shares`` this site added assumed.

        Raises
        ------
        SiteRefusal
            Naming both counts.
        """
        if shares and survivors < shares:
            raise SiteRefusal(
                f"this site added 1/{shares} of the round's DP noise, but the sum to "
                f"unmask holds only {survivors} survivors' shares: it would carry "
                "too little noise; refusing to unmask"
            )

    def claim_masking(self, run_id: int, node: int, server_round: int) -> None:
        """Record, durably, that this site masks an update for ``server_round``.

        Raises
        ------
        SiteRefusal
            When it already did in this run (two maskings under the same masks
            would reveal the difference of the two updates).
        """
        folder = self.state / "secagg" / f"run-{run_id}" / f"node-{node}"
        folder.mkdir(parents=True, exist_ok=True)
        marker = folder / f"masked-round-{server_round}"
        try:
            descriptor = os.open(marker, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        except FileExistsError:
            raise SiteRefusal(
                f"this site already masked an update for round {server_round} of run "
                f"{run_id} ({marker}); a second one would reveal the difference of "
                "the two"
            ) from None
        _sync_and_close(descriptor)
        _sync_and_close(os.open(folder, os.O_RDONLY))  # the new name, too


def _sync_and_close(descriptor: int) -> None:
    try:
        os.fsync(descriptor)
    finally:
        os.close(descriptor)
