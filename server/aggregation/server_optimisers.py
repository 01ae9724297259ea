"""Server optimisers (Reddi et al., ICLR 2021): the round's mean delta is a
pseudo-gradient that a stateful optimiser on the coordinator turns into the step.

The mean needs only the sum of the deltas, so these rules run behind secure
aggregation. Their moments are kept per tensor name and go into every checkpoint, so a
resumed run steps exactly as an uninterrupted one would.
"""

from __future__ import annotations

from collections.abc import Mapping

import numpy as np

from common.codec import AdapterState
from common.config import AGGREGATION_RULES
from server.aggregation.fedavg import FedAvg
from server.summation import RoundSum


class MomentState:
    """Named moment tensors (float32), created at their first use.

    Parameters
    ----------
    names : tuple[str, ...]
        The moments an optimiser keeps, e.g. ``("m", "v")``.
    """

    def __init__(self, names: tuple[str, ...]) -> None:
        self.names = names
        self.moments: dict[str, AdapterState] = {name: {} for name in names}

    def get(
        self, moment: str, tensor: str, like: np.ndarray, fill: float
    ) -> np.ndarray:
        """The ``moment`` of ``tensor``, starting at ``fill`` in the shape of
        ``like``."""
        table = self.moments[moment]
        if tensor not in table:
            table[tensor] = np.full(like.shape, fill, np.float32)
        return table[tensor]

    def as_arrays(self) -> AdapterState:
        """Every moment as ``"<moment>/<tensor>"`` arrays, for a checkpoint."""
        return {
            f"{moment}/{tensor}": value.copy()
            for moment, table in self.moments.items()
            for tensor, value in table.items()
        }

    def load_arrays(self, arrays: Mapping[str, np.ndarray]) -> None:
        """Restore what :meth:`as_arrays` wrote.

        Raises
        ------
        ValueError
            When an array belongs to a moment this optimiser does not keep.
        """
        self.moments = {name: {} for name in self.names}
        for key, value in arrays.items():
            moment, _, tensor = key.partition("/")
            if moment not in self.moments or not tensor:
                raise ValueError(
                    f"server optimiser state {key!r} is not one of the moments "
                    f"{self.names}; was the checkpoint written with another rule?"
                )
            self.moments[moment][tensor] = np.asarray(value, np.float32).copy()


class FedAvgM:
    """FedAvg with server momentum (Hsu et al. 2019; Reddi et al.'s FedAvgM).

    ``m = momentum * m + mean_delta``; step ``= server_lr * m``.
    """

    traits = AGGREGATION_RULES["fedavgm"]

    def __init__(self, server_lr: float, momentum: float) -> None:
        self.server_lr = server_lr
        self.momentum = momentum
        self.state = MomentState(("m",))

    def state_arrays(self) -> AdapterState:
        """The momentum, for a checkpoint."""
        return self.state.as_arrays()

    def load_state_arrays(self, arrays: Mapping[str, np.ndarray]) -> None:
        """Restore the momentum from a checkpoint."""
        self.state.load_arrays(arrays)

    def aggregate(self, summed: RoundSum) -> AdapterState:
        """The momentum step for this round's mean delta."""
        step = {}
        for name, mean in FedAvg().aggregate(summed).items():
            m = self.state.get("m", name, mean, 0.0)
            m[...] = self.momentum * m + mean
            step[name] = (self.server_lr * m).astype(np.float32)
        return step


class FedAdam:
    """Adam on the pseudo-gradient (Reddi et al. 2021, Algorithm 2, no bias
    correction).

    ``m = beta1 * m + (1 - beta1) * d``; ``v = beta2 * v + (1 - beta2) * d^2``;
    step ``= server_lr * m / (sqrt(v) + tau)``, with ``v`` starting at ``tau^2``.
    """

    traits = AGGREGATION_RULES["fedadam"]

    def __init__(
        self, server_lr: float, beta1: float, beta2: float, tau: float
    ) -> None:
        self.server_lr = server_lr
        self.beta1 = beta1
        self.beta2 = beta2
        self.tau = tau
        self.state = MomentState(("m", "v"))

    def state_arrays(self) -> AdapterState:
        """Both moments, for a checkpoint."""
        return self.state.as_arrays()

    def load_state_arrays(self, arrays: Mapping[str, np.ndarray]) -> None:
        """Restore both moments from a checkpoint."""
        self.state.load_arrays(arrays)

    def second_moment(self, v: np.ndarray, squared: np.ndarray) -> np.ndarray:
        """Adam's update of ``v`` from the squared pseudo-gradient."""
        return self.beta2 * v + (1 - self.beta2) * squared

    def aggregate(self, summed: RoundSum) -> AdapterState:
        """The adaptive step for this round's mean delta."""
        step = {}
        for name, mean in FedAvg().aggregate(summed).items():
            m = self.state.get("m", name, mean, 0.0)
            v = self.state.get("v", name, mean, self.tau**2)
            m[...] = self.beta1 * m + (1 - self.beta1) * mean
            v[...] = self.second_moment(v, np.square(mean))
            # A non-finite mean gives a non-finite step, which is never applied
            with np.errstate(invalid="ignore", over="ignore"):
                step[name] = (self.server_lr * m / (np.sqrt(v) + self.tau)).astype(
                    np.float32
                )
        return step


class FedYogi(FedAdam):
    """Yogi on the pseudo-gradient (Reddi et al. 2021): as :class:`FedAdam`, but
    ``v = v - (1 - beta2) * d^2 * sign(v - d^2)``, which grows ``v`` more slowly."""

    traits = AGGREGATION_RULES["fedyogi"]

    def second_moment(self, v: np.ndarray, squared: np.ndarray) -> np.ndarray:
        """Yogi's additive update of ``v``."""
        return v - (1 - self.beta2) * squared * np.sign(v - squared)
