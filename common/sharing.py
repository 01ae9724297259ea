"""Which adapter tensors a round trains, freezes, shares and keeps on the site.

Phases and rules split the adapter state (LoRA factors in PEFT's names and the
``head.*`` tensors) differently, as each rule's traits declare
(:data:`common.config.AGGREGATION_RULES`):

- a ``head`` round (feature extraction, lp-ft's first rounds) trains and shares the
  head alone;
- ``ffa`` (FFA-LoRA) freezes every ``lora_A`` at its seeded initialisation, the same
  on every party, and shares ``lora_B`` and the head;
- ``fedsa`` (FedSA-LoRA) shares ``lora_A`` and the head; each site keeps its own
  ``lora_B`` between rounds;
- every other rule trains and shares everything.

Everything shared goes up as a delta and is averaged by the rule; what a site keeps
never leaves it.
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterable, Mapping

import numpy as np

from common.config.aggregation_rules import AGGREGATION_RULES

HEAD_PREFIX = "head."
LORA_A = ".lora_A."
LORA_B = ".lora_B."


def is_head(name: str) -> bool:
    """Whether ``name`` is a tensor of the classification head."""
    return name.startswith(HEAD_PREFIX)


def frozen_factor(rule: str) -> str | None:
    """The LoRA factor a rule freezes (``lora_A`` for ``ffa``), or ``None``."""
    return LORA_A if AGGREGATION_RULES[rule].freezes_lora_a else None


def local_factor(rule: str) -> str | None:
    """The LoRA factor a site keeps to itself (``lora_B`` for ``fedsa``), or
    ``None``."""
    return LORA_B if AGGREGATION_RULES[rule].keeps_lora_b else None


def is_shared(name: str, phase: str, rule: str) -> bool:
    """Whether tensor ``name`` goes up (as a delta) in a round of ``phase``."""
    if phase == "head":
        return is_head(name)
    if phase != "lora":
        raise ValueError(f"unknown training phase {phase!r}; expected head or lora")
    withheld = [f for f in (frozen_factor(rule), local_factor(rule)) if f]
    return not any(factor in name for factor in withheld)


def shared_subset(
    state: Mapping[str, np.ndarray], phase: str, rule: str
) -> dict[str, np.ndarray]:
    """The tensors of ``state`` a round of ``phase`` under ``rule`` shares."""
    return {k: v for k, v in state.items() if is_shared(k, phase, rule)}


def kept_local(names: Iterable[str], rule: str) -> list[str]:
    """The tensors among ``names`` a site keeps between rounds under ``rule``."""
    factor = local_factor(rule)
    return [name for name in names if factor and factor in name]


def encoder_digest(state: Mapping[str, np.ndarray]) -> str:
    """A digest of every tensor that shapes the pooled features (all but the head).

    Equal digests mean equal features, so features cached under one digest can be
    reused while only the head changes.
    """
    digest = hashlib.sha256()
    for name in sorted(state):
        if not name.startswith(HEAD_PREFIX):
            array = np.ascontiguousarray(state[name], dtype=np.float32)
            digest.update(name.encode() + b"\0" + str(array.shape).encode())
            digest.update(array.tobytes())
    return digest.hexdigest()
