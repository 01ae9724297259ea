"""Which nodes train in a round: the cohort.

Two samplers, one per kind of run::

    no client-level DP, or train.fraction = 1 -> SeededSampler: ceil(fraction * n)
        nodes (at least train.min-clients) without replacement, a pure function of
        the run's seed and the round (reproducible, and the participants are logged)
    client-level DP with train.fraction = q < 1 -> SecretPoissonSampler: every node
        independently with probability q, from HMAC-SHA256 keyed by a 256-bit
        secret drawn from the OS's CSPRNG

The second is exactly the event dp-accounting's ``PoissonSampledDpEvent(q, ...)``
models, so the amplification the coordinator's account claims is the sampling it
did. It holds only while the sample stays secret: the key is kept in
``<output.dir>/private/`` (owner-only), never in a metrics line, a checkpoint or the
summary, and the metrics lines then leave out the participants and the cohort's
size. A resumed run reads the same key and so draws the same cohorts. The
coordinator itself always knows whom it sampled: against it, each site's own
account must charge every round it trains at ``q = 1``.
"""

from __future__ import annotations

import math
import os
import secrets
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

import numpy as np
from cryptography.hazmat.primitives import hashes, hmac

#: The folder of a run's output folder that must not be published.
PRIVATE_DIR = "private"
#: The cohort sampler's key inside :data:`PRIVATE_DIR`.
COHORT_KEY_FILE = "cohort-sampling.key"
_KEY_BYTES = 32
_DOMAIN = b"fedgraft/cohort/v1"


@dataclass(frozen=True)
class Cohort:
    """One round's sample.

    Attributes
    ----------
    nodes : list[int]
        The sampled node ids, ascending.
    available : int
        How many nodes were online to sample from.
    sampling_rate : float
        The probability that a given node was in the sample (what the accountant
        charges).
    expected : float
        The expected cohort size ``q * available``: DP-FedAvg's fixed denominator.
    public : bool
        Whether the cohort may be written to the metrics lines.
    """

    nodes: list[int]
    available: int
    sampling_rate: float
    expected: float
    public: bool


class CohortSampler(Protocol):
    """Picks a round's cohort from the online nodes."""

    def sample(self, nodes: Sequence[int], server_round: int) -> Cohort:
        """The cohort of ``server_round`` among ``nodes`` (ascending ids)."""
        ...


@dataclass(frozen=True)
class SeededSampler:
    """``ceil(fraction * n)`` nodes (at least ``min_clients``, at most ``n``) without
    replacement, from the run's seed and the round."""

    seed: int
    fraction: float
    min_clients: int

    def sample(self, nodes: Sequence[int], server_round: int) -> Cohort:
        """See :class:`CohortSampler`."""
        count = min(
            len(nodes), max(self.min_clients, math.ceil(self.fraction * len(nodes)))
        )
        # Sample positions, not ids: node ids are uint64 and numpy would turn them to
        # floats.
        rng = np.random.default_rng([self.seed, server_round])
        chosen = rng.choice(len(nodes), size=count, replace=False)
        rate = count / len(nodes) if nodes else 0.0
        return Cohort(
            [nodes[int(i)] for i in sorted(chosen)], len(nodes), rate, count, True
        )


@dataclass(frozen=True)
class SecretPoissonSampler:
    """Each node independently with probability ``rate``, decided by a keyed PRF.

    Node ``i`` is in round ``t``'s cohort when the first 8 bytes of
    ``HMAC-SHA256(key, domain || t || i)``, read as an integer, fall below
    ``rate * 2^64``: independent fair draws for anyone without the key, the same
    draws for a resumed run that has it.
    """

    key: bytes
    rate: float

    def sample(self, nodes: Sequence[int], server_round: int) -> Cohort:
        """See :class:`CohortSampler`."""
        threshold = int(self.rate * 2**64)
        chosen = [node for node in nodes if self._draw(server_round, node) < threshold]
        return Cohort(
            sorted(chosen), len(nodes), self.rate, self.rate * len(nodes), False
        )

    def _draw(self, server_round: int, node: int) -> int:
        mac = hmac.HMAC(self.key, hashes.SHA256())
        mac.update(_DOMAIN + server_round.to_bytes(8, "big") + node.to_bytes(8, "big"))
        return int.from_bytes(mac.finalize()[:8], "big")


def cohort_key(output_dir: Path) -> bytes:
    """The run's secret sampling key: read from ``<output_dir>/private/``, or drawn
    from the OS's CSPRNG and written there (owner-only) on the first call.

    Raises
    ------
    ValueError
        When the key file exists but does not hold a key (the message names it).
    """
    path = output_dir / PRIVATE_DIR / COHORT_KEY_FILE
    if path.exists():
        key = path.read_bytes()
        if len(key) != _KEY_BYTES:
            raise ValueError(
                f"{path}: a cohort sampling key must be {_KEY_BYTES} bytes, found "
                f"{len(key)}; restore it from the run's backup or start a new "
                "output.dir (a new key samples different cohorts)"
            )
        return key
    path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
    key = secrets.token_bytes(_KEY_BYTES)
    handle = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(handle, "wb") as stream:
        stream.write(key)
        stream.flush()
        os.fsync(stream.fileno())
    return key


__all__ = [
    "COHORT_KEY_FILE",
    "PRIVATE_DIR",
    "Cohort",
    "CohortSampler",
    "SecretPoissonSampler",
    "SeededSampler",
    "cohort_key",
]
