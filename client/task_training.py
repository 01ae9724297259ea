"""Local training of the causal language model and the image classifier: one explicit
torch loop (no HF Trainer) over seeded batches, for any model whose step loss a task
supplies.

It keeps the text classifier's training contract (:mod:`client.finetune`): a fresh
AdamW every round (the head, where there is one, at ``head_lr``), FedProx's proximal
term, FFA-LoRA's frozen ``lora_A``, bf16 autocast on CUDA, and a
:class:`~client.finetune.FinetuneResult`.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Sequence

import numpy as np
import torch
from torch import nn

from client.finetune import FinetuneResult, LocalTraining
from common.batching import bucketed_order
from common.sharing import is_head

#: A step's mean loss and what the mean is over (rows, or tokens with loss).
StepLoss = Callable[[list[int]], tuple[torch.Tensor, int]]


def planned_batches(
    lengths: Sequence[int], plan: LocalTraining, rng: np.random.Generator
) -> list[list[int]]:
    """``plan.epochs`` passes of length-bucketed batches, cut at ``plan.max_steps``
    (the batch order of :mod:`client.finetune`)."""
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
    return batches[: plan.max_steps] if plan.max_steps else batches


def train_steps(
    model: nn.Module,
    lengths: Sequence[int],
    step_loss: StepLoss,
    plan: LocalTraining,
) -> FinetuneResult:
    """Train the trainable parameters of ``model`` on rows of ``lengths``.

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
        ``train_loss`` is the weighted mean of the step losses (per token for a
        language model).

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
    frozen = [
        p for n, p in model.named_parameters() if plan.frozen and plan.frozen in n
    ]
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
    anchors = [(p, p.detach().clone()) for _, p in named] if plan.proximal_mu else []
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
        for rows in planned_batches(lengths, plan, rng):
            with torch.autocast(
                device.type, dtype=torch.bfloat16, enabled=device.type == "cuda"
            ):
                loss, weight = step_loss(rows)
            if weight == 0:
                continue
            objective = loss
            if anchors:  # FedProx: mu / 2 * ||theta - theta_start||^2
                objective = loss + (plan.proximal_mu / 2) * sum(
                    (p - anchor).pow(2).sum() for p, anchor in anchors
                )
            optimiser.zero_grad(set_to_none=True)
            objective.backward()
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
