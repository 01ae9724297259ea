"""The ``sim.*`` keys: local simulation settings (Flower's Simulation Engine)."""

from __future__ import annotations

from dataclasses import dataclass

from common.config.keys import above, at_least, setting


@dataclass(frozen=True)
class SimConfig:
    """Local simulation settings (``sim.*``)."""

    num_clients: int = setting(
        "sim.num-clients",
        4,
        "simulated clients (for `column:<name>`, the number of values)",
        check=at_least(1, "must be at least 1"),
    )
    cpus_per_client: float = setting(
        "sim.cpus-per-client",
        1.0,
        "Ray CPUs per virtual client",
        check=above(0, "must be > 0"),
    )
    gpus_per_client: float = setting(
        "sim.gpus-per-client",
        0.0,
        "Ray GPUs per virtual client",
        check=at_least(0, "must be >= 0"),
    )
    local_baseline: bool = setting(
        "sim.local-baseline",
        True,
        "after `simulate`, train each client alone for comparison (every `model.task`)",
    )
