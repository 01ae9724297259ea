"""What each aggregation rule is, declared once as plain data.

The rule classes in ``server/aggregation/`` point at their :class:`RuleTraits`
(``traits = AGGREGATION_RULES["median"]``) and the configuration checks read the
same object, so no property of a rule lives in a list beside it. ``common`` cannot
import ``server``, hence the data lives here.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from types import MappingProxyType


@dataclass(frozen=True)
class RuleTraits:
    """The properties of one aggregation rule that the rest of the code reads.

    Attributes
    ----------
    name : str
        The value of the ``aggregation`` key.
    summary : str
        What it does, one line (the key reference's text).
    needs_individual_updates : bool
        It reads each client's update, so it cannot run behind secure aggregation
        or client-level DP (they reveal or bound only the sum).
    treats_lora_factors : bool
        It changes how the LoRA factors train and travel (pointless without LoRA
        training, ``train.mode = head``).
    server_optimiser_lr : float or None
        A server optimiser's default ``server.lr``; ``None`` for a plain mean.
    sends_factors : bool
        Sites send their LoRA factors rather than a delta: no update-norm bound
        applies, the codec must keep the factors' 2-D shapes.
    site_ranks : bool
        A site may train at its own LoRA rank (node config ``lora.r``, at most the
        run's ``lora.r``), so the coordinator accepts factors of any rank up to it.
    freezes_lora_a : bool
        Every ``lora_A`` stays at its seeded initialisation, the same on every
        party; it is neither trained nor sent.
    keeps_lora_b : bool
        Each site keeps its own ``lora_B`` between rounds; it never leaves the site.
    proximal_term : bool
        Clients add a proximal term to their loss (no per-example gradient, so not
        with DP-SGD).
    sends_label_counts : bool
        Sites send per-label counts with the head, in the clear or inside the
        masked vector (no labels: not for a causal LM; they leave a site without
        noise: not under DP; the 16-bit ring is too coarse for them).
    personalised : bool
        Sites keep tensors of their own, so each has a personalised model to score
        (``eval.where = auto`` then evaluates at the sites too).
    """

    name: str
    summary: str
    needs_individual_updates: bool = False
    treats_lora_factors: bool = False
    server_optimiser_lr: float | None = None
    sends_factors: bool = False
    site_ranks: bool = False
    freezes_lora_a: bool = False
    keeps_lora_b: bool = False
    proximal_term: bool = False
    sends_label_counts: bool = False
    personalised: bool = False


_DECLARED = (
    RuleTraits("fedavg", "example-weighted mean of the deltas"),
    RuleTraits(
        "fedprox",
        "fedavg; clients add `fedprox.mu/2 * ||theta - theta_global||^2`",
        proximal_term=True,
    ),
    RuleTraits(
        "fedavgm",
        "server momentum on the mean delta (`server.lr`, `server.momentum`)",
        server_optimiser_lr=1.0,
    ),
    RuleTraits(
        "fedadam",
        "Adam on the mean delta as a pseudo-gradient (Reddi et al. 2021)",
        server_optimiser_lr=0.01,
    ),
    RuleTraits(
        "fedyogi",
        "Yogi on the mean delta as a pseudo-gradient (Reddi et al. 2021)",
        server_optimiser_lr=0.01,
    ),
    RuleTraits(
        "ffa",
        "FFA-LoRA: A frozen at its seeded start, B averaged",
        treats_lora_factors=True,
        freezes_lora_a=True,
    ),
    RuleTraits(
        "fedsa",
        "FedSA-LoRA: A and head averaged, each site keeps its own B",
        treats_lora_factors=True,
        keeps_lora_b=True,
        personalised=True,
    ),
    RuleTraits(
        "flexlora",
        "sites of different ranks: mean of the products B·A, truncated SVD to rank",
        needs_individual_updates=True,
        treats_lora_factors=True,
        sends_factors=True,
        site_ranks=True,
    ),
    RuleTraits(
        "fedavg-per-label",
        "head rows averaged over the clients holding each label (behind secure "
        "aggregation: from each label's summed count and count-weighted rows)",
        sends_label_counts=True,
    ),
    RuleTraits(
        "median",
        "coordinate-wise median, robust to wild updates",
        needs_individual_updates=True,
    ),
    RuleTraits(
        "trimmed-mean",
        "coordinate-wise mean without `aggregation.trim-fraction` at each end",
        needs_individual_updates=True,
    ),
)

#: Every rule by name, in the order the key reference lists them.
AGGREGATION_RULES: Mapping[str, RuleTraits] = MappingProxyType(
    {traits.name: traits for traits in _DECLARED}
)
