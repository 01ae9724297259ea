"""Sample-level differential privacy at a site: DP-SGD through Opacus.

One round at a site, as data::

    the site's rows -> Poisson-sampled batches (each row with probability
    batch-size / rows) -> per-example gradients of the LoRA factors and the head
    (Opacus hooks) -> each clipped to dp.clip-norm -> summed, plus
    N(0, (sigma C)^2) -> AdamW step -> the site's accountant counts the step

The result protects every single row of the site, whoever sees the update: the
coordinator, the other sites or the released model. The accountant (Opacus's RDP
accountant) is the site's own: its history (noise multiplier, sample rate, steps) is
kept in the site's Flower context state, so epsilon grows over the rounds the site
trains, and the site reports it with its metrics as ``sample-epsilon``.
"""

from __future__ import annotations

import json
import math
import secrets
import time

import torch
from flwr.app import ConfigRecord, Context
from torch.nn import functional as F

from client.finetune import FinetuneResult, LocalTraining
from common.batching import Encoded, collate
from common.config import DpConfig
from common.model import TextClassifier
from common.sharing import is_head

#: The Flower context-state record holding the site's DP-SGD accountant history.
DP_SGD_RECORD = "fedgraft-dp-sgd"

History = list[tuple[float, float, int]]


def load_history(context: Context) -> History:
    """The site's accountant history so far (empty before its first DP round)."""
    if DP_SGD_RECORD not in context.state.config_records:
        return []
    record = context.state.config_records[DP_SGD_RECORD]
    return [tuple(step) for step in json.loads(str(record["history"]))]  # type: ignore[misc]


def save_history(context: Context, history: History) -> None:
    """Keep the accountant history in the site's context state."""
    context.state[DP_SGD_RECORD] = ConfigRecord({"history": json.dumps(history)})


def dp_sgd(
    model: TextClassifier,
    encoded: Encoded,
    pad_id: int,
    plan: LocalTraining,
    settings: DpConfig,
    history: History,
) -> tuple[FinetuneResult, History, float]:
    """Train like :func:`client.finetune.finetune`, with DP-SGD.

    Parameters
    ----------
    plan : LocalTraining
        Epochs, step cap, batch size (the expected Poisson batch), learning rates.
    settings : DpConfig
        ``clip_norm`` bounds each example's gradient; ``noise_multiplier`` is sigma;
        ``delta`` is where epsilon is read.
    history : list
        The site's accountant history before this round.

    Returns
    -------
    tuple
        The training result, the accountant history after it, and the site's
        sample-level epsilon at ``settings.delta`` so far.
    """
    from opacus import PrivacyEngine

    if len(encoded) == 0:
        raise ValueError("no training rows: this client has an empty partition")
    device = next(model.head.parameters()).device
    torch.manual_seed(plan.seed)
    named = [
        (n, p)
        for n, p in model.named_parameters()
        if p.requires_grad and not (plan.frozen and plan.frozen in n)
    ]
    frozen = [
        p for n, p in model.named_parameters() if plan.frozen and plan.frozen in n
    ]
    for parameter in frozen:
        parameter.requires_grad_(False)
    optimiser = torch.optim.AdamW(
        [
            {"params": [p for n, p in named if not is_head(n)]},
            {"params": [p for n, p in named if is_head(n)], "lr": plan.head_lr},
        ],
        lr=plan.lr,
        weight_decay=plan.weight_decay,
    )
    # Rows padded once to the site's longest; Opacus replaces the sampler with
    # Poisson sampling at rate batch-size / rows.
    rows = collate(encoded, range(len(encoded)), pad_id)
    loader = torch.utils.data.DataLoader(
        torch.utils.data.TensorDataset(
            rows["input_ids"], rows["attention_mask"], rows["labels"]
        ),
        batch_size=min(plan.batch_size, len(encoded)),
    )
    model.train()  # Opacus refuses a module in eval mode
    engine = PrivacyEngine(accountant="rdp")
    engine.accountant.history = list(history)
    noise = torch.Generator(device=device)
    noise.manual_seed(secrets.randbits(63))
    private, optimiser, loader = engine.make_private(
        module=model,
        optimizer=optimiser,
        data_loader=loader,
        noise_multiplier=settings.noise_multiplier,
        max_grad_norm=settings.clip_norm,
        noise_generator=noise,
    )
    steps_wanted = math.ceil(plan.epochs * len(loader))
    if plan.max_steps:
        steps_wanted = min(steps_wanted, plan.max_steps)
    start = time.perf_counter()
    total_loss, samples, steps = 0.0, 0, 0
    try:
        while steps < steps_wanted:
            for input_ids, attention, labels in loader:
                optimiser.zero_grad(set_to_none=True)
                if len(labels):
                    logits = private(input_ids.to(device), attention.to(device))
                    loss = F.cross_entropy(logits.float(), labels.to(device))
                    loss.backward()
                    total_loss += loss.item() * len(labels)
                    samples += len(labels)
                else:
                    # An empty Poisson batch still takes its noise-only step (the
                    # encoder cannot run on zero rows).
                    for _, parameter in named:
                        parameter.grad_sample = parameter.new_zeros(
                            (0, *parameter.shape)
                        )
                optimiser.step()
                steps += 1
                if steps >= steps_wanted:
                    break
    finally:
        # The model is shared by the clients of a process: take the hooks off and
        # give frozen factors back.
        private._close()
        for parameter in frozen:
            parameter.requires_grad_(True)
        model.eval()
    history = [tuple(step) for step in engine.accountant.history]  # type: ignore[misc]
    epsilon = float(engine.accountant.get_epsilon(delta=settings.delta))
    result = FinetuneResult(
        num_examples=len(encoded),
        train_loss=total_loss / max(samples, 1),
        steps=steps,
        samples=samples,
        seconds=time.perf_counter() - start,
        device=device.type,
    )
    return result, history, epsilon


def sample_rate(num_rows: int, batch_size: int) -> float:
    """The Poisson sampling rate DP-SGD uses for a site of ``num_rows`` rows."""
    return 1 / math.ceil(num_rows / min(batch_size, num_rows))


__all__ = ["DP_SGD_RECORD", "dp_sgd", "load_history", "sample_rate", "save_history"]
