"""``fedgraft export``: a run's merged model as a Hugging Face folder or as ONNX.

The ONNX graph is traced with eager attention on a padded batch (so padding masks stay
in the graph), then checked with onnxruntime against the PyTorch logits before the
export is reported as done.
"""

from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np

from common.outputs import MERGED_DIR
from common.tasks import TASK_FILE, TEXT_CLASSIFICATION, read_task

ONNX_FILE = "model.onnx"
EXPORT_FORMATS = ("hf", "onnx")
_CHECK_TEXTS = ["a", "a longer sentence to make the batch need padding on one row"]


class ExportError(ValueError):
    """The export cannot be made or does not reproduce the model's logits."""


def merged_dir(run_or_merged: Path) -> Path:
    """The ``merged/`` folder of a run, or the folder itself if it is one.

    Raises
    ------
    ExportError
        When neither holds a merged model.
    """
    for candidate in (run_or_merged / MERGED_DIR, run_or_merged):
        markers = ("fedgraft_head.json", TASK_FILE)
        if any((candidate / name).exists() for name in markers):
            return candidate
    raise ExportError(f"{run_or_merged}: no merged model; point at a run's output.dir")


def export_hf(source: Path, out: Path) -> Path:
    """Copy the merged Hugging Face folder (encoder, head, tokenizer, labels; for a
    causal LM, the merged ``AutoModelForCausalLM`` folder and its tokenizer)."""
    shutil.copytree(source, out, dirs_exist_ok=True)
    return out


def export_onnx(source: Path, out: Path, tolerance: float = 1e-4) -> Path:
    """Write ``model.onnx`` (input_ids, attention_mask -> logits) with the tokenizer
    and head metadata, then check it against PyTorch with onnxruntime.

    Raises
    ------
    ExportError
        When onnxruntime's logits differ from PyTorch's by more than ``tolerance``.
    """
    # torch, transformers and onnxruntime load only for this command.
    import onnxruntime
    import torch
    from transformers import AutoModel

    from common.inference import HEAD_FILES, MergedClassifier
    from common.model import TextClassifier

    reference = MergedClassifier.load(source)
    # Eager attention traces the padding mask into the graph; the fused kernel path
    # specialises on the example batch.
    encoder = AutoModel.from_pretrained(str(source), attn_implementation="eager")
    model = TextClassifier(encoder, reference.model.pooling, len(reference.labels))
    model.head.load_state_dict(reference.model.head.state_dict())
    model.eval()
    out.mkdir(parents=True, exist_ok=True)
    batch = reference.tokenizer(_CHECK_TEXTS, return_tensors="pt", padding=True)
    axes = {0: "batch", 1: "sequence"}
    torch.onnx.export(
        model,
        (batch["input_ids"], batch["attention_mask"]),
        str(out / ONNX_FILE),
        input_names=["input_ids", "attention_mask"],
        output_names=["logits"],
        dynamic_axes={
            "input_ids": axes,
            "attention_mask": axes,
            "logits": {0: "batch"},
        },
        dynamo=False,
    )
    reference.tokenizer.save_pretrained(str(out))
    for name in HEAD_FILES:
        shutil.copy2(source / name, out / name)
    session = onnxruntime.InferenceSession(str(out / ONNX_FILE))
    check = reference.tokenizer(_CHECK_TEXTS[::-1], return_tensors="np", padding=True)
    (logits,) = session.run(
        None,
        {k: check[k].astype(np.int64) for k in ("input_ids", "attention_mask")},
    )
    with torch.no_grad():
        expected = reference.model(
            torch.from_numpy(check["input_ids"]),
            torch.from_numpy(check["attention_mask"]),
        ).numpy()
    difference = float(np.abs(logits - expected).max())
    if difference > tolerance:
        raise ExportError(
            f"ONNX logits differ from PyTorch by {difference:.2e} (> {tolerance:.0e})"
        )
    return out


def export_run(run_or_merged: Path, fmt: str, out: Path) -> Path:
    """Export a run's merged model in ``fmt`` (``hf`` or ``onnx``) to ``out``."""
    if fmt not in EXPORT_FORMATS:
        raise ExportError(f"--format {fmt!r}: use one of {', '.join(EXPORT_FORMATS)}")
    source = merged_dir(run_or_merged)
    task = read_task(source)
    if fmt == "onnx" and task != TEXT_CLASSIFICATION:
        raise ExportError(
            f"--format onnx exports text classifiers; this {task} model exports with "
            "--format hf (a Hugging Face folder)"
        )
    return export_hf(source, out) if fmt == "hf" else export_onnx(source, out)
