"""Sample-level differential privacy at a site: DP-SGD through Opacus.

One round at a site, as data::

    the site's rows -> Poisson-sampled batches (each row with probability
    batch-size / rows) -> per-example gradients of the LoRA factors and the head
    (Opacus hooks) -> each clipped to dp.clip-norm -> summed, plus
    N(0, (sigma C)^2) -> AdamW step -> the site's accountant counts the step

Every task runs this one loop (:func:`dp_sgd_steps`) with its own loss: a text or
an image classifier's cross-entropy per row, a causal language model's mean loss
over each sequence's tokens that carry loss (one example = one sequence).

The result protects every single row of the site, whoever sees the update: the
coordinator, the other sites or the released model. The accountant (Opacus's RDP
accountant) is the site's own: its history (noise multiplier, sample rate, steps) is
kept in the site's Flower context state, mirrored in its state folder
(client.site_state) so that a resumed run continues it; epsilon grows over the
rounds the site trains, and the site reports it with its metrics as
``sample-epsilon``.
"""

from __future__ import annotations

import json
import math
import secrets
import time
from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING

import torch
from flwr.app import ConfigRecord, Context
from torch import nn
from torch.nn import functional as F

from client.finetune import FinetuneResult, LocalTraining
from client.site_state import DP_SGD_RECORD
from common import dp
from common.batching import Encoded, collate
from common.config import DpConfig
from common.dp import dp_sgd_sample_rate as sample_rate
from common.sharing import is_head
from common.tasks.text_classification.model import TextClassifier

if TYPE_CHECKING:  # opacus loads only when a site trains with DP-SGD
    from opacus.optimizers import DPOptimizer

History = list[tuple[float, float, int]]

#: ``batch_loss(private, batch)``: the mean over the batch's rows of each row's own
#: loss, computed by ``private`` (the model under Opacus's hooks) from the batch's
#: tensors (on the model's device). Opacus takes the mean as its loss reduction, so
#: the per-example gradients it clips are the rows' own: a row's loss must depend
#: on that row alone (one sequence of a language model, one image).
BatchLoss = Callable[[nn.Module, list[torch.Tensor]], torch.Tensor]


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
    """Train the text classifier like :func:`client.finetune.finetune`, with DP-SGD
    (:func:`dp_sgd_steps` on its rows, padded once to the site's longest).

    Returns
    -------
    tuple
        The training result, the accountant history after it, and the site's
        sample-level epsilon at ``settings.delta`` so far.
    """
    if len(encoded) == 0:
        raise ValueError("no training rows: this client has an empty partition")
    rows = collate(encoded, range(len(encoded)), pad_id)

    def batch_loss(private: nn.Module, batch: list[torch.Tensor]) -> torch.Tensor:
        input_ids, attention, labels = batch
        return F.cross_entropy(private(input_ids, attention).float(), labels)

    return dp_sgd_steps(
        model,
        [rows["input_ids"], rows["attention_mask"], rows["labels"]],
        batch_loss,
        plan,
        settings,
        history,
    )


def dp_sgd_steps(
    model: nn.Module,
    rows: Sequence[torch.Tensor],
    batch_loss: BatchLoss,
    plan: LocalTraining,
    settings: DpConfig,
    history: History,
) -> tuple[FinetuneResult, History, float]:
    """Train the trainable parameters of any task's model with DP-SGD.

    Parameters
    ----------
    model : nn.Module
        The site's model; only its trainable tensors (LoRA factors, a head) get
        per-example gradients. Frozen batch norms stay in evaluation mode, so no
        row's output depends on another's.
    rows : Sequence[torch.Tensor]
        The site's rows, one tensor per field, each ``(rows, ...)`` on the CPU.
    batch_loss : BatchLoss
        The mean over a batch's rows of each row's own loss (see
        :data:`BatchLoss`).
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
        The training result (``train_loss``: the mean of the rows' losses), the
        accountant history after it, and the site's sample-level epsilon at
        ``settings.delta`` so far.
    """
    from opacus import PrivacyEngine

    count = len(rows[0])
    if count == 0:
        raise ValueError("no training rows: this client has an empty partition")
    named = [
        (n, p)
        for n, p in model.named_parameters()
        if p.requires_grad and not (plan.frozen and plan.frozen in n)
    ]
    device = named[0][1].device
    torch.manual_seed(plan.seed)
    frozen = [
        p for n, p in model.named_parameters() if plan.frozen and plan.frozen in n
    ]
    start = time.perf_counter()
    total_loss, samples, steps = 0.0, 0, 0
    private: nn.Module | None = None
    # Everything that alters the shared model happens inside the try, so that a
    # failure (in Opacus's checks, say) still gives it back as it was.
    for parameter in frozen:
        parameter.requires_grad_(False)
    try:
        groups = [
            {"params": [p for n, p in named if not is_head(n)]},
            {"params": [p for n, p in named if is_head(n)], "lr": plan.head_lr},
        ]
        optimiser = torch.optim.AdamW(
            [group for group in groups if group["params"]],
            lr=plan.lr,
            weight_decay=plan.weight_decay,
        )
        # Opacus replaces the sampler with Poisson sampling at rate batch-size / rows,
        # drawn from this loader's generator. Its seed is secret: the accountant assumes
        # nobody can tell which rows a batch holds, and plan.seed (dropout, this
        # function's torch.manual_seed) is derivable from the run's seed.
        sampling = torch.Generator()
        sampling.manual_seed(secrets.randbits(63))
        loader = torch.utils.data.DataLoader(
            torch.utils.data.TensorDataset(*rows),
            batch_size=min(plan.batch_size, count),
            generator=sampling,
        )
        model.train()  # Opacus refuses a module in eval mode
        for module in model.modules():
            if isinstance(module, nn.modules.batchnorm._BatchNorm):
                # In training mode a batch norm mixes the rows of a batch (and drifts
                # from the backbone every party shares).
                module.eval()
        engine = PrivacyEngine(accountant="rdp")
        engine.accountant.history = list(history)
        private, optimiser, loader = engine.make_private(
            module=model,
            optimizer=optimiser,
            data_loader=loader,
            noise_multiplier=settings.noise_multiplier,
            max_grad_norm=settings.clip_norm,
        )
        draw_noise_from_the_csprng(optimiser)
        steps_wanted = math.ceil(plan.epochs * len(loader))
        if plan.max_steps:
            steps_wanted = min(steps_wanted, plan.max_steps)
        while steps < steps_wanted:
            for batch in loader:
                optimiser.zero_grad(set_to_none=True)
                size = len(batch[0])
                if size:
                    loss = batch_loss(private, [t.to(device) for t in batch])
                    loss.backward()
                    total_loss += loss.item() * size
                    samples += size
                else:
                    # An empty Poisson batch still takes its noise-only step (the
                    # backbone cannot run on zero rows).
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
        if private is not None:
            private._close()  # type: ignore[operator]
        for parameter in frozen:
            parameter.requires_grad_(True)
        model.eval()
    history = [tuple(step) for step in engine.accountant.history]  # type: ignore[misc]
    epsilon = float(engine.accountant.get_epsilon(delta=settings.delta))
    result = FinetuneResult(
        num_examples=count,
        train_loss=total_loss / max(samples, 1),
        steps=steps,
        samples=samples,
        seconds=time.perf_counter() - start,
        device=device.type,
    )
    return result, history, epsilon


def draw_noise_from_the_csprng(optimiser: DPOptimizer) -> None:
    """Make ``optimiser`` draw its Gaussian noise from the OS's CSPRNG
    (:class:`common.dp.SecureNormal`) instead of a torch generator.

    Opacus's ``secure_mode`` needs ``torchcsprng``, which no longer builds against
    current torch; this replaces, on this one optimiser, the step that adds
    ``N(0, (sigma C)^2)`` to each summed clipped gradient, with the same std.
    """
    from opacus.optimizers.optimizer import (
        _check_processed_flag,
        _mark_as_processed,
    )

    source = dp.secure_generator()

    def add_noise() -> None:
        std = optimiser.noise_multiplier * optimiser.max_grad_norm
        for parameter in optimiser.params:
            summed = parameter.summed_grad
            _check_processed_flag(summed)
            noise = torch.from_numpy(source.normal(0.0, std, size=tuple(summed.shape)))
            parameter.grad = (summed + noise.to(summed)).view_as(parameter)
            _mark_as_processed(summed)

    optimiser.add_noise = add_noise  # type: ignore[method-assign]


def dp_sgd_at_site(
    model: nn.Module,
    rows: Sequence[torch.Tensor],
    batch_loss: BatchLoss,
    plan: LocalTraining,
    settings: DpConfig,
    context: Context,
) -> tuple[FinetuneResult, float]:
    """:func:`dp_sgd_steps` with the site's accountant history read from and kept
    in its Flower context state; the result and the site's epsilon so far."""
    result, history, epsilon = dp_sgd_steps(
        model, rows, batch_loss, plan, settings, load_history(context)
    )
    save_history(context, history)
    return result, epsilon


__all__ = [
    "DP_SGD_RECORD",
    "BatchLoss",
    "dp_sgd",
    "dp_sgd_at_site",
    "dp_sgd_steps",
    "draw_noise_from_the_csprng",
    "load_history",
    "sample_rate",
    "save_history",
]
