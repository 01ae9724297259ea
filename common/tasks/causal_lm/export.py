"""The causal language model's ONNX export plan (no KV cache)."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from common.tasks.export import (
    CHECK_TEXTS,
    TRACE_TEXTS,
    ExportError,
    OnnxPlan,
    logits_of,
)

if TYPE_CHECKING:
    from torch import nn


def _next_token_logits(lm: nn.Module) -> nn.Module:
    """``lm`` called without a KV cache, returning the logits alone (the ONNX graph's
    one output)."""
    import torch
    from torch import nn

    class NextTokenLogits(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.lm = lm

        def forward(
            self, input_ids: torch.Tensor, attention_mask: torch.Tensor
        ) -> torch.Tensor:
            """Logits ``(batch, seq, vocab)``."""
            output = self.lm(
                input_ids=input_ids, attention_mask=attention_mask, use_cache=False
            )
            return output.logits

    return NextTokenLogits().eval()


def onnx_plan(source: Path) -> OnnxPlan:
    """A causal LM: ``input_ids, attention_mask -> logits (batch, seq, vocab)``."""
    import torch
    from transformers import AutoModelForCausalLM

    from common.tasks.causal_lm.model import load_lm_tokenizer

    if not (source / "config.json").exists():
        raise ExportError(
            f"{source}: no config.json; a causal-lm merged/ folder holds the merged "
            "AutoModelForCausalLM"
        )
    tokenizer, pad_id = load_lm_tokenizer(source)

    def batch(texts: list[str]) -> dict[str, np.ndarray]:
        # Right-padded with the pad id the runs use: tokenizers without a pad token
        # (GPT-2's) cannot pad by themselves.
        rows = [tokenizer(text)["input_ids"] for text in texts]
        width = max(len(row) for row in rows)
        input_ids = np.full((len(rows), width), pad_id, dtype=np.int64)
        attention_mask = np.zeros((len(rows), width), dtype=np.int64)
        for line, row in enumerate(rows):
            input_ids[line, : len(row)] = row
            attention_mask[line, : len(row)] = 1
        return {"input_ids": input_ids, "attention_mask": attention_mask}

    check = batch(CHECK_TEXTS)
    # The reference loads as `fedgraft generate` loads it (the default attention).
    reference = AutoModelForCausalLM.from_pretrained(str(source), dtype=torch.float32)
    expected = logits_of(_next_token_logits(reference), check)
    del reference
    traced = AutoModelForCausalLM.from_pretrained(
        str(source), attn_implementation="eager", dtype=torch.float32
    )
    axes = {0: "batch", 1: "sequence"}
    return OnnxPlan(
        traced=_next_token_logits(traced),
        trace_inputs=batch(TRACE_TEXTS),
        check_inputs=check,
        expected=expected,
        dynamic_axes={"input_ids": axes, "attention_mask": axes, "logits": axes},
        write_files=lambda out: tokenizer.save_pretrained(str(out)),
        model_type=str(traced.config.model_type),
        compare_where="attention_mask",
    )
