"""A causal language model with LoRA adapters: loading, the loss on the tokens that
carry it, perplexity, the adapter state that travels, and the merged export.

The model has no head of its own: the backbone's language-model head predicts every
next token, so the adapter state is the LoRA factors alone (PEFT's names, none
starting with ``head.``). Every party builds the same initial adapter from the seed.
"""

from __future__ import annotations

import copy
import math
from collections.abc import Mapping
from pathlib import Path

import numpy as np
import torch
from peft import PeftModel
from peft.utils import get_peft_model_state_dict, set_peft_model_state_dict
from torch import nn
from torch.nn import functional as F
from transformers import AutoModelForCausalLM, AutoTokenizer, PreTrainedTokenizerBase

from common.batching import sequential_batches
from common.codec import AdapterState
from common.config import LoraSettings
from common.evaluation import EvalResult
from common.lora_targets import require_same_tensors, wrap_with_lora
from common.quantised import load_frozen
from common.tasks.base import write_task_file
from common.tasks.causal_lm import CAUSAL_LM
from common.tasks.causal_lm.data import LmEncoded

IGNORE = -100  # the label of tokens without loss (PyTorch's ignore_index)


class CausalLanguageModel(nn.Module):
    """A causal LM wrapped by PEFT: ``forward`` gives next-token logits.

    Parameters
    ----------
    lm : PeftModel
        The backbone (``AutoModelForCausalLM``) with LoRA adapters.
    """

    def __init__(self, lm: PeftModel) -> None:
        super().__init__()
        self.lm = lm

    def forward(
        self, input_ids: torch.Tensor, attention_mask: torch.Tensor
    ) -> torch.Tensor:
        """Logits ``(batch, seq, vocab)``."""
        return self.lm(input_ids=input_ids, attention_mask=attention_mask).logits


def load_causal_lm(
    backbone_dir: Path,
    settings: LoraSettings,
    seed: int,
    device: torch.device | str = "cpu",
    quantize: str = "none",
) -> CausalLanguageModel:
    """Load the frozen backbone and wrap it with seeded LoRA adapters.

    ``quantize`` (``model.quantize``) loads the backbone's linear layers in 4 or 8
    bits (:func:`common.quantised.load_frozen`); the adapters stay float32.
    """
    backbone = load_frozen(AutoModelForCausalLM, backbone_dir, device, quantize)
    # PEFT puts each adapter on its base layer's device.
    return CausalLanguageModel(
        wrap_with_lora(backbone, settings, seed, task_type="CAUSAL_LM")
    )


def load_lm_tokenizer(backbone_dir: Path) -> tuple[PreTrainedTokenizerBase, int]:
    """The backbone's tokenizer and the id that pads its batches (the pad token, or
    end-of-sequence for tokenizers without one, such as GPT-2's)."""
    tokenizer = AutoTokenizer.from_pretrained(str(backbone_dir))
    for candidate in (tokenizer.pad_token_id, tokenizer.eos_token_id, 0):
        if candidate is not None:
            return tokenizer, int(candidate)
    raise AssertionError("unreachable")


def lm_adapter_state(model: CausalLanguageModel) -> AdapterState:
    """The LoRA factors, as float32 numpy in PEFT's names."""
    return {
        k: v.detach().to("cpu", torch.float32).numpy().copy()
        for k, v in get_peft_model_state_dict(model.lm).items()
    }


def load_lm_adapter_state(
    model: CausalLanguageModel, state: Mapping[str, np.ndarray]
) -> None:
    """Overwrite every LoRA factor of ``model`` with ``state``.

    Raises
    ------
    KeyError
        When ``state`` lacks a factor of the model or holds one it does not have.
    """
    expected = set(get_peft_model_state_dict(model.lm))
    require_same_tensors(expected, state)
    set_peft_model_state_dict(
        model.lm, {k: torch.from_numpy(np.asarray(v)) for k, v in state.items()}
    )


def collate_lm(
    encoded: LmEncoded, rows: list[int], pad_id: int
) -> dict[str, torch.Tensor]:
    """Right-pad the chosen rows to their longest; ``labels`` repeat the tokens that
    carry loss and hold :data:`IGNORE` elsewhere (the prompt, the padding)."""
    width = max(len(encoded.ids[r]) for r in rows)
    input_ids = torch.full((len(rows), width), pad_id, dtype=torch.long)
    attention = torch.zeros((len(rows), width), dtype=torch.long)
    labels = torch.full((len(rows), width), IGNORE, dtype=torch.long)
    for line, row in enumerate(rows):
        tokens = torch.tensor(encoded.ids[row])  # (length,)
        input_ids[line, : len(tokens)] = tokens
        attention[line, : len(tokens)] = 1
        start = int(encoded.loss_from[row])
        labels[line, start : len(tokens)] = tokens[start:]
    return {"input_ids": input_ids, "attention_mask": attention, "labels": labels}


def token_losses(
    logits: torch.Tensor, labels: torch.Tensor
) -> tuple[torch.Tensor, int, int]:
    """Summed next-token cross-entropy over the tokens that carry loss.

    Parameters
    ----------
    logits : torch.Tensor
        ``(batch, seq, vocab)``: position ``t`` predicts token ``t + 1``.
    labels : torch.Tensor
        ``(batch, seq)``, :data:`IGNORE` where a token carries no loss.

    Returns
    -------
    tuple
        The summed loss (a tensor with gradient), the number of tokens it covers and
        how many of them the argmax predicts.
    """
    predicted = logits[:, :-1].float()  # (batch, seq - 1, vocab)
    targets = labels[:, 1:]  # (batch, seq - 1)
    mask = targets != IGNORE
    total = F.cross_entropy(
        predicted.reshape(-1, predicted.shape[-1]),
        targets.reshape(-1),
        ignore_index=IGNORE,
        reduction="sum",
    )
    correct = int(((predicted.argmax(-1) == targets) & mask).sum().item())
    return total, int(mask.sum().item()), correct


def sequence_losses(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Each sequence's mean next-token cross-entropy over its tokens that carry loss:
    ``(batch,)``, 0 for a sequence without any.

    A row's loss depends on that row alone, so the gradient of one entry is that
    sequence's own: DP-SGD clips per sequence (``dp.level = sample``).
    """
    predicted = logits[:, :-1].float()  # (batch, seq - 1, vocab)
    targets = labels[:, 1:]  # (batch, seq - 1)
    per_token = F.cross_entropy(
        predicted.transpose(1, 2), targets, ignore_index=IGNORE, reduction="none"
    )  # (batch, seq - 1), 0 where ignored
    counts = (targets != IGNORE).sum(1).clamp(min=1)  # (batch,)
    return per_token.sum(1) / counts


@torch.no_grad()
def evaluate_lm(
    model: CausalLanguageModel, encoded: LmEncoded, pad_id: int, batch_size: int = 16
) -> EvalResult:
    """Per-token loss, next-token accuracy and perplexity on every row (eval mode).

    Raises
    ------
    ValueError
        When no row has a token that carries loss.
    """
    device = next(model.parameters()).device
    was_training = model.training
    model.eval()
    total, count, correct = 0.0, 0, 0
    lengths = [len(ids) for ids in encoded.ids]
    for rows in sequential_batches(lengths, batch_size):
        batch = {k: v.to(device) for k, v in collate_lm(encoded, rows, pad_id).items()}
        with torch.autocast(
            device.type, dtype=torch.bfloat16, enabled=device.type == "cuda"
        ):
            logits = model(batch["input_ids"], batch["attention_mask"])
        summed, tokens, hits = token_losses(logits, batch["labels"])
        total, count, correct = total + summed.item(), count + tokens, correct + hits
    model.train(was_training)
    if count == 0:
        raise ValueError(
            "the evaluation rows hold no token that carries loss; give longer rows "
            "or a larger model.max-length"
        )
    loss = total / count
    return EvalResult(
        loss=loss,
        accuracy=correct / count,
        num_examples=len(encoded),
        perplexity=math.exp(min(loss, 700.0)),  # exp(709) is float64's limit
        tokens=count,
    )


def save_lm_adapter(model: CausalLanguageModel, directory: Path) -> None:
    """The adapter in PEFT format (``PeftModel.from_pretrained(backbone, dir)``)."""
    model.lm.save_pretrained(str(directory))
    write_task_file(directory, CAUSAL_LM.name)


def save_merged_lm(
    model: CausalLanguageModel, tokenizer: PreTrainedTokenizerBase, directory: Path
) -> None:
    """The backbone with the adapter merged (``AutoModelForCausalLM`` loads it) and
    the tokenizer; the model in memory keeps its adapter."""
    merged = copy.deepcopy(model.lm).merge_and_unload()
    merged.save_pretrained(str(directory))
    tokenizer.save_pretrained(str(directory))
    write_task_file(directory, CAUSAL_LM.name)


@torch.no_grad()
def generate(directory: Path, prompt: str, max_new_tokens: int = 32) -> str:
    """Greedy continuation of ``prompt`` by a merged causal LM folder.

    Raises
    ------
    FileNotFoundError
        When ``directory`` holds no model, naming it.
    """
    if not (directory / "config.json").exists():
        raise FileNotFoundError(
            f"{directory}: no config.json; point at a causal-lm run's merged/ folder "
            "or its export"
        )
    tokenizer, pad_id = load_lm_tokenizer(directory)
    model = AutoModelForCausalLM.from_pretrained(str(directory))
    model.eval()
    batch = tokenizer(prompt, return_tensors="pt")
    output = model.generate(
        **batch,
        max_new_tokens=max_new_tokens,
        do_sample=False,
        pad_token_id=pad_id,
    )  # (1, prompt + new)
    new = output[0, batch["input_ids"].shape[1] :]
    return str(tokenizer.decode(new, skip_special_tokens=True))
