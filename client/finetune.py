"""Local fine-tuning: an explicit torch loop over length-bucketed, dynamically padded
batches (no HF Trainer), with bf16 autocast on CUDA."""

from __future__ import annotations

import math
import time
from dataclasses import dataclass

import numpy as np
import torch
from torch.nn import functional as F

from common.batching import Encoded, bucketed_order, collate
from common.model import TextClassifier


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
    seed : int
        Seeds the batch order and dropout.
    """

    epochs: float
    max_steps: int
    batch_size: int
    lr: float
    weight_decay: float
    seed: int


@dataclass(frozen=True)
class FinetuneResult:
    """What one local training produced (the model is changed in place)."""

    num_examples: int
    train_loss: float
    steps: int
    samples: int
    seconds: float
    device: str


def _batches(
    encoded: Encoded, plan: LocalTraining, rng: np.random.Generator
) -> list[list[int]]:
    lengths = [len(ids) for ids in encoded.ids]
    wanted = math.ceil(plan.epochs * len(encoded))
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
    model: TextClassifier, encoded: Encoded, pad_id: int, plan: LocalTraining
) -> FinetuneResult:
    """Train the trainable parameters of ``model`` (LoRA and head) on ``encoded``.

    A fresh AdamW is made on every call, so no optimiser state outlives a round.
    """
    if len(encoded) == 0:
        raise ValueError("no training rows: this client has an empty partition")
    device = next(model.head.parameters()).device
    rng = np.random.default_rng(plan.seed)
    torch.manual_seed(plan.seed)
    parameters = [p for p in model.parameters() if p.requires_grad]
    optimiser = torch.optim.AdamW(
        parameters, lr=plan.lr, weight_decay=plan.weight_decay
    )
    model.train()
    start = time.perf_counter()
    total_loss, samples, steps = 0.0, 0, 0
    for rows in _batches(encoded, plan, rng):
        batch = collate(encoded, rows, pad_id)
        batch = {k: v.to(device, non_blocking=True) for k, v in batch.items()}
        with torch.autocast(
            device.type, dtype=torch.bfloat16, enabled=device.type == "cuda"
        ):
            logits = model(batch["input_ids"], batch["attention_mask"])
        loss = F.cross_entropy(logits.float(), batch["labels"])
        optimiser.zero_grad(set_to_none=True)
        loss.backward()
        optimiser.step()
        total_loss += loss.item() * len(rows)
        samples += len(rows)
        steps += 1
    model.eval()
    return FinetuneResult(
        num_examples=len(encoded),
        train_loss=total_loss / max(samples, 1),
        steps=steps,
        samples=samples,
        seconds=time.perf_counter() - start,
        device=device.type,
    )
