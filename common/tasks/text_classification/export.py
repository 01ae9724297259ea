"""The text classifier's ONNX export plan."""

from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np

from common.tasks.export import CHECK_TEXTS, TRACE_TEXTS, OnnxPlan, logits_of


def onnx_plan(source: Path) -> OnnxPlan:
    """A text classifier: ``input_ids, attention_mask -> logits (batch, labels)``."""
    import torch
    from transformers import AutoModel

    from common.tasks.text_classification.inference import HEAD_FILES, MergedClassifier
    from common.tasks.text_classification.model import TextClassifier

    reference = MergedClassifier.load(source)
    encoder = AutoModel.from_pretrained(
        str(source), attn_implementation="eager", dtype=torch.float32
    )
    traced = TextClassifier(encoder, reference.model.pooling, len(reference.labels))
    traced.head.load_state_dict(reference.model.head.state_dict())

    def batch(texts: list[str]) -> dict[str, np.ndarray]:
        encoded = reference.tokenizer(texts, return_tensors="np", padding=True)
        return {k: encoded[k].astype(np.int64) for k in ("input_ids", "attention_mask")}

    check = batch(CHECK_TEXTS)

    def write_files(out: Path) -> None:
        reference.tokenizer.save_pretrained(str(out))
        for name in HEAD_FILES:
            shutil.copy2(source / name, out / name)

    axes = {0: "batch", 1: "sequence"}
    return OnnxPlan(
        traced=traced.float().eval(),
        trace_inputs=batch(TRACE_TEXTS),
        check_inputs=check,
        expected=logits_of(reference.model.float().eval(), check),
        dynamic_axes={
            "input_ids": axes,
            "attention_mask": axes,
            "logits": {0: "batch"},
        },
        write_files=write_files,
        model_type=str(encoder.config.model_type),
    )
