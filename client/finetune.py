"""Local training: one explicit torch loop (no HF Trainer) for every task
(:func:`train_steps`), over length-bucketed, dynamically padded batches with bf16
autocast on CUDA, given a task's step loss. The text classifier's step
(:func:`finetune`) starts from the cached output of the frozen layers when only the
top layers adapt; head-only rounds train over pooled features computed once
(:func:`train_head`)."""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import numpy as np
import torch
from torch import nn
from torch.nn import functional as F

from common.batching import Encoded, bucketed_order, collate
from common.config import AGGREGATION_RULES, RunConfig
from common.sharing import frozen_factor, is_head
from common.tasks.text_classification.frozen_prefix import PrefixStates, prefix_states
from common.tasks.text_classification.model import TextClassifier


@dataclass(frozen=True)
class LocalTraining:
    """How one client trains in one round.

    Attributes
    ----------
    epochs : float
        Passes over the local rows (fractions allowed: the centralised baseline uses
        them to match the federated sample count).
    max_steps : int
        Cap on optimiser steps; 0 means no cap.
    batch_size, lr, weight_decay : as in the run config.
    head_lr : float
        Learning rate of the head (the adapters use ``lr``).
    seed : int
        Seeds the batch order and dropout.
    proximal_mu : float
        FedProx: adds ``mu / 2 * ||theta - theta_start||^2`` over the trained
        parameters to the loss; 0 turns it off.
    frozen : str or None
        Parameters whose name contains this (``.lora_A.`` for FFA-LoRA) stay fixed.
    """

    epochs: float
    max_steps: int
    batch_size: int
    lr: float
    head_lr: float
    weight_decay: float
    seed: int
    proximal_mu: float = 0.0
    frozen: str | None = None

    @classmethod
    def from_config(
        cls,
        config: RunConfig,
        phase: str,
        seed: int,
        epochs: float | None = None,
        max_steps: int | None = None,
    ) -> LocalTraining:
        """The plan of ``config`` for a round of ``phase``, with ``epochs`` or
        ``max_steps`` replaced when given."""
        train, rule = config.train, config.aggregation.rule
        proximal = AGGREGATION_RULES[rule].proximal_term
        return cls(
            epochs=train.local_epochs if epochs is None else epochs,
            max_steps=train.max_steps if max_steps is None else max_steps,
            batch_size=train.batch_size,
            lr=train.lr,
            head_lr=train.head_lr_in(phase),
            weight_decay=train.weight_decay,
            seed=seed,
            proximal_mu=config.aggregation.proximal_mu if proximal else 0.0,
            frozen=frozen_factor(rule),
        )


@dataclass(frozen=True)
class FinetuneResult:
    """What one local training produced (the model is changed in place)."""

    num_examples: int
    train_loss: float
    steps: int
    samples: int
    seconds: float
    device: str


class _ProximalTerm:
    """FedProx's ``mu / 2 * ||theta - theta_start||^2`` over ``parameters``, with
    ``theta_start`` their values when the round's training began."""

    def __init__(self, parameters: list[torch.Tensor], mu: float) -> None:
        self.mu = mu
        self.pairs = [(p, p.detach().clone()) for p in parameters] if mu > 0 else []

    def __call__(self) -> torch.Tensor | float:
        if not self.pairs:
            return 0.0
        return (self.mu / 2) * sum((p - start).pow(2).sum() for p, start in self.pairs)


def to_device(tensor: torch.Tensor, device: torch.device) -> torch.Tensor:
    """Move a CPU batch tensor to ``device``; through pinned memory on CUDA, so the
    copy runs asynchronously with the previous step's kernels."""
    if device.type != "cuda":
        return tensor
    return tensor.pin_memory().to(device, non_blocking=True)


def _batches(
    lengths: Sequence[int], plan: LocalTraining, rng: np.random.Generator
) -> list[list[int]]:
    """``plan.epochs`` passes of length-bucketed batches, cut at ``plan.max_steps``."""
    wanted = math.ceil(plan.epochs * len(lengths))
    batches: list[list[int]] = []
    taken = 0
    while taken < wanted:
        for rows in bucketed_order(lengths, plan.batch_size, rng):
            rows = rows[: wanted - taken]
            batches.append(rows)
            taken += len(rows)
            if taken >= wanted:
                break
    if plan.max_steps:
        batches = batches[: plan.max_steps]
    return batches


def finetune(
    model: TextClassifier,
    encoded: Encoded,
    pad_id: int,
    plan: LocalTraining,
    prefix: Callable[[], PrefixStates] | None = None,
) -> FinetuneResult:
    """Train the text classifier's trainable parameters on ``encoded``: its step
    loss (cross-entropy of a batch) in :func:`train_steps`.

    Parameters
    ----------
    prefix : callable, optional
        When the model adapts only its top layers (``model.prefix_depth > 0``), gives
        the cached output of the frozen layers for ``encoded`` (the caller keeps it
        across rounds); by default it is computed once for this call.
    """
    states = None
    if model.prefix_depth and len(encoded):
        states = (
            prefix()
            if prefix is not None
            else prefix_states(model.encoder, model.prefix_depth, encoded, pad_id)
        )
    device = next(model.head.parameters()).device

    def step_loss(rows: list[int]) -> tuple[torch.Tensor, int]:
        batch = {
            k: to_device(v, device) for k, v in collate(encoded, rows, pad_id).items()
        }
        if states is not None:
            logits = model.logits_from_prefix(*states.collate(rows))
        else:
            logits = model(batch["input_ids"], batch["attention_mask"])
        return F.cross_entropy(logits.float(), batch["labels"]), len(rows)

    return train_steps(model, [len(ids) for ids in encoded.ids], step_loss, plan)


#: A step's mean loss and what the mean is over (rows, or tokens with loss).
StepLoss = Callable[[list[int]], tuple[torch.Tensor, int]]


def train_steps(
    model: nn.Module,
    lengths: Sequence[int],
    step_loss: StepLoss,
    plan: LocalTraining,
) -> FinetuneResult:
    """The training loop of every task: train the trainable parameters of ``model``
    (LoRA at ``lr``, a head at ``head_lr``) on rows of ``lengths``.

    A fresh AdamW is made on every call, so no optimiser state outlives a round;
    FedProx's proximal term, FFA-LoRA's frozen ``lora_A`` (``plan.frozen``) and bf16
    autocast on CUDA apply to every task.

    Parameters
    ----------
    lengths : Sequence[int]
        One entry per row (its token count; 1 for images): batches group rows of
        similar length.
    step_loss : StepLoss
        The mean loss of a batch of rows and its weight; a batch of weight 0 (no
        token with loss) is skipped.

    Returns
    -------
    FinetuneResult
        ``train_loss`` is the weighted mean of the step losses (per row for a
        classifier, per token for a language model).

    Raises
    ------
    ValueError
        When there are no rows.
    """
    if not lengths:
        raise ValueError("no training rows: this client has an empty partition")
    device = next(model.parameters()).device
    rng = np.random.default_rng(plan.seed)
    torch.manual_seed(plan.seed)
    named = [
        (n, p)
        for n, p in model.named_parameters()
        if p.requires_grad and not (plan.frozen and plan.frozen in n)
    ]
    groups = [
        {"params": [p for n, p in named if not is_head(n)]},
        {"params": [p for n, p in named if is_head(n)], "lr": plan.head_lr},
    ]
    optimiser = torch.optim.AdamW(
        [group for group in groups if group["params"]],
        lr=plan.lr,
        weight_decay=plan.weight_decay,
    )
    proximal = _ProximalTerm([p for _, p in named], plan.proximal_mu)
    frozen = [
        p for n, p in model.named_parameters() if plan.frozen and plan.frozen in n
    ]
    for parameter in frozen:
        parameter.requires_grad_(False)
    model.train()
    # The backbone is frozen, batch-norm statistics included: in training mode they
    # would drift at each site away from the backbone every party shares.
    for module in model.modules():
        if isinstance(module, nn.modules.batchnorm._BatchNorm):
            module.eval()
    start = time.perf_counter()
    total, weight_seen, samples, steps = 0.0, 0, 0, 0
    try:
        for rows in _batches(lengths, plan, rng):
            with torch.autocast(
                device.type, dtype=torch.bfloat16, enabled=device.type == "cuda"
            ):
                loss, weight = step_loss(rows)
            if weight == 0:
                continue
            optimiser.zero_grad(set_to_none=True)
            (loss + proximal()).backward()
            optimiser.step()
            total += loss.item() * weight
            weight_seen += weight
            samples += len(rows)
            steps += 1
    finally:
        # The model is shared by the clients of a process: give frozen factors back.
        for parameter in frozen:
            parameter.requires_grad_(True)
        model.eval()
    return FinetuneResult(
        num_examples=len(lengths),
        train_loss=total / max(weight_seen, 1),
        steps=steps,
        samples=samples,
        seconds=time.perf_counter() - start,
        device=device.type,
    )


def train_head(
    head: nn.Linear, features: torch.Tensor, labels: np.ndarray, plan: LocalTraining
) -> FinetuneResult:
    """Train ``head`` alone on pooled ``features`` ``(n, hidden)`` at ``head_lr``.

    This is feature extraction: the backbone and adapters are frozen, so their
    features were computed once and each step costs one small matrix product.
    """
    if len(labels) == 0:
        raise ValueError("no training rows: this client has an empty partition")
    rng = np.random.default_rng(plan.seed)
    targets = torch.from_numpy(labels).to(features.device)
    optimiser = torch.optim.AdamW(
        head.parameters(), lr=plan.head_lr, weight_decay=plan.weight_decay
    )
    proximal = _ProximalTerm(list(head.parameters()), plan.proximal_mu)
    start = time.perf_counter()
    total_loss, samples, steps = 0.0, 0, 0
    # Rows of one length bucket all have length 1: plain shuffled batches.
    for rows in _batches([1] * len(labels), plan, rng):
        index = torch.as_tensor(rows, device=features.device)
        logits = head(features[index].to(head.weight.dtype))
        loss = F.cross_entropy(logits.float(), targets[index])
        optimiser.zero_grad(set_to_none=True)
        (loss + proximal()).backward()
        optimiser.step()
        total_loss += loss.item() * len(rows)
        samples += len(rows)
        steps += 1
    return FinetuneResult(
        num_examples=len(labels),
        train_loss=total_loss / max(samples, 1),
        steps=steps,
        samples=samples,
        seconds=time.perf_counter() - start,
        device=features.device.type,
    )


def train_phase(
    model: TextClassifier,
    encoded: Encoded,
    pad_id: int,
    plan: LocalTraining,
    phase: str,
    features: Callable[[], torch.Tensor],
    prefix: Callable[[], PrefixStates] | None = None,
) -> FinetuneResult:
    """One round of local training in ``phase``.

    Parameters
    ----------
    phase : str
        ``head``: train the head on ``features()`` (the caller caches them);
        ``lora``: fine-tune adapters and head end to end.
    prefix : callable, optional
        The cached output of the frozen layers, as for ``finetune``.
    """
    if phase == "head":
        return train_head(model.head, features(), encoded.labels, plan)
    return finetune(model, encoded, pad_id, plan, prefix)
