"""The ``dp.*`` keys: differential privacy, per site (DP-FedAvg) or per row
(DP-SGD)."""

from __future__ import annotations

from dataclasses import dataclass

from common.config.errors import Refusal, refuse_if
from common.config.keys import above, at_least, one_of, satisfies, setting

#: Where DP noise is added: by the coordinator, or split among the clients.
DP_MODES = ("central", "distributed")
#: What DP protects: a whole site (DP-FedAvg) or each of its rows (DP-SGD).
DP_LEVELS = ("client", "sample")


@dataclass(frozen=True)
class DpConfig:
    """Differential privacy (``dp.*``): DP-FedAvg (McMahan et al. 2018) protects
    each site, DP-SGD (Opacus) each of its rows."""

    enabled: bool = setting(
        "dp.enabled",
        False,
        "differential privacy at `dp.level`: clip, weigh clients alike, add Gaussian "
        'noise and account for epsilon; see README\'s "Differential privacy"',
    )
    level: str = setting(
        "dp.level",
        "client",
        "`client`: DP-FedAvg protects each site as a whole; `sample`: each site "
        "trains with DP-SGD (Opacus) and protects each of its rows, and the `dp.*` "
        "keys act on per-example gradients (one example: a text, an image, or a "
        "causal LM's sequence with its mean loss over its tokens), each site keeping "
        "its own accountant",
        check=one_of(DP_LEVELS),
    )
    mode: str = setting(
        "dp.mode",
        "central",
        "`central`: the coordinator adds `N(0, (sigma C)^2)` to the sum; "
        "`distributed`: each of the m sampled clients adds `N(0, (sigma C)^2 / m)` "
        "before secure aggregation masks it (needs `secagg.enabled = true`)",
        check=one_of(DP_MODES),
    )
    clip_norm: float = setting(
        "dp.clip-norm",
        1.0,
        "C, the L2 bound of each client's delta (with secure aggregation, "
        "`secagg.clip-norm` must be at least this)",
        check=above(0, "must be > 0, e.g. 1.0"),
    )
    noise_multiplier: float = setting(
        "dp.noise-multiplier",
        1.0,
        "sigma: the noise on the sum has standard deviation sigma * C",
        check=above(0, "must be > 0, e.g. 1.0"),
    )
    delta: float = setting(
        "dp.delta",
        1e-5,
        "the delta epsilon is reported at",
        check=satisfies(lambda d: 0.0 < d < 1.0, "must be in (0, 1), e.g. 1e-5"),
    )
    target_epsilon: float = setting(
        "dp.target-epsilon",
        0.0,
        "stop before a round that would take epsilon above this; 0 = no budget "
        "(a resume may change it: the accountant is rebuilt from the rounds spent)",
        check=at_least(0, "must be >= 0 (0 = no budget)"),
        resumable=True,
    )
    adaptive_clip: bool = setting(
        "dp.adaptive-clip",
        False,
        "adapt C every round towards a quantile of the clients' update norms "
        "(Andrew et al. 2021); `dp.clip-norm` is the first round's C",
    )
    target_quantile: float = setting(
        "dp.target-quantile",
        0.5,
        "gamma: the share of clients whose update should fit within C",
        check=satisfies(
            lambda q: 0.0 <= q <= 1.0, "must be in [0, 1], e.g. 0.5 (the median norm)"
        ),
    )
    clip_lr: float = setting(
        "dp.clip-lr",
        0.2,
        "eta_C of the geometric update C <- C exp(-eta_C (b - gamma))",
        check=above(0, "must be > 0, e.g. 0.2"),
    )
    clipped_count_stddev: float = setting(
        "dp.clipped-count-stddev",
        0.0,
        "sigma_b, the noise on the count of unclipped clients; 0 = m / 20 for the m "
        "clients of the first round; must exceed `dp.noise-multiplier` / 2",
        check=at_least(0, "must be >= 0 (0 = the clients sampled per round / 20)"),
    )

    @property
    def client_level(self) -> bool:
        """DP-FedAvg is on: clip, weigh alike and noise each site's delta."""
        return self.enabled and self.level == "client"

    @property
    def sample_level(self) -> bool:
        """DP-SGD is on at every site."""
        return self.enabled and self.level == "sample"


def adaptive_clip_needs_dp(dp: DpConfig) -> Refusal | None:
    """Adaptive clipping adapts the clip norm of client-level DP, which must be on."""
    return refuse_if(
        dp.adaptive_clip and not dp.enabled,
        "dp.adaptive-clip",
        "adapts the clip norm of client-level DP, which is off; set "
        "dp.enabled = true or dp.adaptive-clip = false",
    )


def no_adaptive_clip_per_sample(dp: DpConfig) -> Refusal | None:
    """DP-SGD keeps its per-example clip norm fixed."""
    return refuse_if(
        dp.sample_level and dp.adaptive_clip,
        "dp.adaptive-clip",
        "adapts the clip norm of client-level DP; with dp.level = sample "
        "the per-example clip norm stays dp.clip-norm, so set "
        "dp.adaptive-clip = false",
    )


def count_noise_leaves_budget(dp: DpConfig) -> Refusal | None:
    """The count's noise ``sigma_b`` must exceed half the noise multiplier.

    Andrew et al. 2021, Thm 1: the delta's noise multiplier is raised to
    (z^-2 - (2 sigma_b)^-2)^-1/2, finite only when 2 sigma_b > z. The default
    sigma_b = m / 20 depends on the round's sample: checked at the first round.
    """
    stddev, z = dp.clipped_count_stddev, dp.noise_multiplier
    return refuse_if(
        dp.client_level and dp.adaptive_clip and stddev > 0 and 2 * stddev <= z,
        "dp.clipped-count-stddev",
        f"must be above dp.noise-multiplier / 2 = {z / 2:g} "
        f"(got {stddev:g}) with dp.adaptive-clip = true, or "
        "the count of unclipped clients alone would spend the whole "
        "dp.noise-multiplier budget; raise it or lower dp.noise-multiplier",
    )


RULES = (adaptive_clip_needs_dp, no_adaptive_clip_per_sample, count_noise_leaves_budget)
