"""A causal language model at a site (``model.task = causal-lm``): loaded once per
process, rows tokenised once (in memory, and on the site's disk for deployments,
where every message starts a fresh process), and trained on the tokens that carry
loss."""

from __future__ import annotations

import hashlib
import logging
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from flwr.app import Context
from torch import nn
from transformers import PreTrainedTokenizerBase

from client import private_training
from client.caches import BoundedCache
from client.finetune import FinetuneResult, LocalTraining, train_steps
from client.runtime import pick_device
from client.sites import SiteRequest
from common.codec import AdapterState
from common.config import LoraSettings, RunConfig
from common.data import Example
from common.evaluation import EvalResult
from common.tasks.causal_lm.data import (
    LmEncoded,
    encode_lm,
    load_lm_encoded,
    save_lm_encoded,
)
from common.tasks.causal_lm.model import (
    CausalLanguageModel,
    collate_lm,
    evaluate_lm,
    lm_adapter_state,
    load_causal_lm,
    load_lm_adapter_state,
    load_lm_tokenizer,
    sequence_losses,
    token_losses,
)

log = logging.getLogger(__name__)

_Loaded = tuple[CausalLanguageModel, PreTrainedTokenizerBase, int]


@dataclass
class LmCaches:
    """The causal LM's caches in one client process: the latest model only (by
    fingerprint, LoRA shape and precision), and tokenised rows by
    :func:`lm_rows_key`, bounded across many virtual clients."""

    models: BoundedCache[tuple[str, LoraSettings, str], _Loaded] = field(
        default_factory=lambda: BoundedCache(1)
    )
    rows: BoundedCache[str, LmEncoded] = field(
        default_factory=lambda: BoundedCache(32)
    )


def lm_rows_key(
    examples: list[Example], fingerprint: str, max_length: int, prompt_column: str
) -> str:
    """A digest of what the tokenised rows depend on."""
    digest = hashlib.sha256(f"lm|{fingerprint}|{max_length}|{prompt_column}".encode())
    for example in examples:
        prompt = example.extra.get(prompt_column, "") if prompt_column else ""
        digest.update(prompt.encode() + b"\0" + example.text.encode() + b"\n")
    return digest.hexdigest()


@dataclass
class CausalLMSite:
    """The site's causal LM, tokenizer and settings."""

    config: RunConfig
    model: CausalLanguageModel
    tokenizer: PreTrainedTokenizerBase
    pad_id: int
    fingerprint: str
    cache_dir: Path | None
    caches: LmCaches

    def encode(self, examples: list[Example]) -> LmEncoded:
        """Tokenise the rows once: from memory, from the site's disk, or afresh."""
        data, max_length = self.config.data, self.config.model.max_length
        key = lm_rows_key(examples, self.fingerprint, max_length, data.prompt_column)
        stored = (
            self.cache_dir / "tokens" / f"{key}.npz"
            if self.cache_dir is not None
            else None
        )

        def tokenised() -> LmEncoded:
            if stored is not None and stored.exists():
                return load_lm_encoded(stored)
            encoded = encode_lm(
                self.tokenizer, examples, data.prompt_column, max_length
            )
            if stored is not None:
                save_lm_encoded(encoded, stored)
            return encoded

        return self.caches.rows.get(key, tokenised)

    def load_state(self, state: AdapterState) -> None:
        load_lm_adapter_state(self.model, state)

    def train(
        self,
        rows: LmEncoded,
        plan: LocalTraining,
        phase: str,
        start: AdapterState,
        context: Context,
    ) -> tuple[FinetuneResult, float | None]:
        """Fine-tune the adapters; the loss is the mean over a batch's tokens that
        carry loss (config validation leaves ``phase = lora`` only).

        With ``dp.level = sample`` the adapters train with DP-SGD instead
        (:func:`client.private_training.dp_sgd_at_site`): one example is one
        sequence, its loss the mean over its tokens that carry loss; the site's
        epsilon comes back with the result.
        """
        del start  # no cached features for a language model
        if phase != "lora":
            raise ValueError(f"a causal language model trains LoRA only, not {phase}")
        if self.config.dp.sample_level:
            return self._train_private(rows, plan, context)
        device = next(self.model.parameters()).device

        def step_loss(batch_rows: list[int]) -> tuple[torch.Tensor, int]:
            batch = collate_lm(rows, batch_rows, self.pad_id)
            batch = {k: v.to(device, non_blocking=True) for k, v in batch.items()}
            logits = self.model(batch["input_ids"], batch["attention_mask"])
            summed, tokens, _ = token_losses(logits, batch["labels"])
            return summed / max(tokens, 1), tokens

        return train_steps(
            self.model, [len(ids) for ids in rows.ids], step_loss, plan
        ), None

    def _train_private(
        self, rows: LmEncoded, plan: LocalTraining, context: Context
    ) -> tuple[FinetuneResult, float]:
        if len(rows) == 0:
            raise ValueError("no training rows: this client has an empty partition")
        # Padded once to the site's longest row; each batch is cut to its own.
        batch = collate_lm(rows, list(range(len(rows))), self.pad_id)

        def batch_loss(private: nn.Module, tensors: list[torch.Tensor]) -> torch.Tensor:
            input_ids, attention, labels = tensors
            width = int(attention.sum(1).max().item())
            logits = private(input_ids[:, :width], attention[:, :width])
            return sequence_losses(logits, labels[:, :width]).mean()

        return private_training.dp_sgd_at_site(
            self.model,
            [batch["input_ids"], batch["attention_mask"], batch["labels"]],
            batch_loss,
            plan,
            self.config.dp,
            context,
        )

    def state(self) -> AdapterState:
        return lm_adapter_state(self.model)

    def evaluate(self, examples: list[Example]) -> EvalResult:
        """Loss, next-token accuracy and perplexity on ``examples``' tokens that
        carry loss.

        Raises
        ------
        ValueError
            When no row of ``examples`` has a token that carries loss.
        """
        return evaluate_lm(self.model, self.encode(examples), self.pad_id)

    def label_counts(self, rows: LmEncoded, num_labels: int) -> np.ndarray:
        raise ValueError("a causal language model has no labels to count")


def open_causal_lm_site(caches: LmCaches, request: SiteRequest) -> CausalLMSite:
    """The process's causal LM for this backbone, LoRA shape and precision
    (``model.quantize``), loaded once (only the latest is kept, to bound memory)."""
    config, fingerprint, lora = request.config, request.fingerprint, request.lora
    backbone_dir, quantize = request.backbone_dir, config.model.quantize

    def load() -> _Loaded:
        device = pick_device()
        model = load_causal_lm(backbone_dir, lora, config.seed, device, quantize)
        tokenizer, pad_id = load_lm_tokenizer(backbone_dir)
        log.info(
            "loaded causal LM %s on %s (quantize = %s)",
            fingerprint[:12],
            device,
            quantize,
        )
        return model, tokenizer, pad_id

    model, tokenizer, pad_id = caches.models.get((fingerprint, lora, quantize), load)
    return CausalLMSite(
        config, model, tokenizer, pad_id, fingerprint, request.cache_dir, caches
    )
