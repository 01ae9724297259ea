"""The ``train.*`` keys: round participation and the client's optimiser."""

from __future__ import annotations

from dataclasses import dataclass

from common.config.keys import above, at_least, one_of, setting, share

TRAIN_MODES = ("lora", "head", "lp-ft")


@dataclass(frozen=True)
class TrainConfig:
    """Round participation and the client's optimiser settings (``train.*``)."""

    fraction: float = setting(
        "train.fraction",
        1.0,
        "share of clients sampled per round",
        check=share(),
    )
    min_clients: int = setting(
        "train.min-clients",
        1,
        "a round with fewer useful replies is skipped",
        check=at_least(1, "must be at least 1"),
    )
    local_epochs: int = setting(
        "train.local-epochs",
        1,
        "local passes per round",
        check=at_least(1, "must be at least 1"),
    )
    max_steps: int = setting(
        "train.max-steps",
        0,
        "cap on local optimiser steps per round (0 = none)",
        check=at_least(0, "must be >= 0 (0 = no cap)"),
    )
    batch_size: int = setting(
        "train.batch-size",
        16,
        "local AdamW batch size",
        check=at_least(1, "must be at least 1"),
    )
    lr: float = setting(
        "train.lr", 0.002, "local AdamW learning rate", check=above(0, "must be > 0")
    )
    weight_decay: float = setting(
        "train.weight-decay",
        0.0,
        "local AdamW weight decay",
        check=at_least(0, "must be >= 0"),
    )
    timeout: float = setting(
        "train.timeout",
        600.0,
        "seconds to wait for replies (and for enough nodes)",
        check=above(0, "must be > 0 seconds"),
        resumable=True,
    )
    max_update_norm: float = setting(
        "train.max-update-norm",
        100.0,
        "a plain sum rejects a delta whose L2 norm exceeds this (0 = no bound; on by "
        "default, as `secagg.clip-norm` bounds each delta behind secure aggregation, "
        "so no single site can take over the global adapter; honest MiniLM deltas on "
        "CLINC150 measured about 10 for a LoRA epoch and 24-31 for a head-only "
        "round, see docs/BENCHMARKS.md). Not applied with `aggregation = "
        "flexlora` (sites send factors, not deltas) nor to a plain sum under "
        "`dp.adaptive-clip` (the coordinator clips each delta to the round's C)",
        check=at_least(0, "must be >= 0 (0 = no bound)"),
    )
    max_weight: float = setting(
        "train.max-weight",
        10000.0,
        "a site's weight in a plain sum: it sends its example count capped at this, "
        "and the coordinator rejects a `num-examples` outside `[1, train.max-weight]` "
        "(behind secure aggregation `secagg.max-weight` plays this part)",
        check=at_least(
            1, "must be a finite count >= 1 (a site's largest weight in a plain sum)"
        ),
    )
    mode: str = setting(
        "train.mode",
        "lora",
        "`lora`: adapters and head every round; `head`: feature extraction, the head "
        "alone on pooled features each client computes once; `lp-ft`: `head` for "
        "the first `train.lp-rounds` rounds, then `lora`",
        check=one_of(TRAIN_MODES),
    )
    lp_rounds: int = setting(
        "train.lp-rounds",
        1,
        "head-only rounds of `lp-ft` (below `num-server-rounds`)",
    )
    head_lr: float = setting(
        "train.head-lr",
        0.0,
        "the head's learning rate in rounds that train the adapters; 0 = `train.lr`",
        check=at_least(0, "must be >= 0 (0 = train.lr)"),
    )
    lp_lr: float = setting(
        "train.lp-lr",
        0.0,
        "the head's learning rate in head-only rounds; 0 = `train.head-lr`",
        check=at_least(0, "must be >= 0 (0 = train.head-lr)"),
    )

    def phase(self, server_round: int) -> str:
        """What round ``server_round`` trains: ``head`` (the backbone and adapters
        frozen) or ``lora`` (adapters and head).

        ``lp-ft`` spends its first ``lp_rounds`` rounds on the head alone (a linear
        probe), then fine-tunes the adapters (Kumar et al., ICLR 2022).
        """
        if self.mode == "head" or (
            self.mode == "lp-ft" and server_round <= self.lp_rounds
        ):
            return "head"
        return "lora"

    def head_lr_in(self, phase: str) -> float:
        """The head's learning rate in a round of ``phase``.

        Head-only rounds use ``lp_lr``; rounds that train the adapters use
        ``head_lr``. A rate of 0 falls back to the next: ``lp_lr`` -> ``head_lr``
        -> ``lr``.
        """
        head_lr = self.head_lr or self.lr
        return (self.lp_lr or head_lr) if phase == "head" else head_lr
