"""Classifying text with an exported ``merged/`` folder.

Usage::

    from common.tasks.text_classification.inference import MergedClassifier
    classifier = MergedClassifier.load("runs/demo/merged")
    classifier.predict(["send money to my savings account"])
    # [("transfer_money", 0.97)]
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors.torch import load_file
from transformers import AutoModel, AutoTokenizer, PreTrainedTokenizerBase

from common.tasks.text_classification.model import TextClassifier

#: Files beside an exported encoder that describe the head.
HEAD_FILES = ("head.safetensors", "fedgraft_head.json")


@dataclass
class MergedClassifier:
    """A merged backbone with its head, pooling and labels."""

    model: TextClassifier
    tokenizer: PreTrainedTokenizerBase
    labels: tuple[str, ...]

    @classmethod
    def load(cls, directory: str | Path) -> MergedClassifier:
        """Load a ``merged/`` folder written by a fedgraft run.

        Raises
        ------
        FileNotFoundError
            When the folder lacks the head files, naming the folder.
        """
        folder = Path(directory)
        head_file = folder / "fedgraft_head.json"
        if not head_file.exists():
            raise FileNotFoundError(
                f"{folder}: no fedgraft_head.json; point at the merged/ folder of a run"
            )
        meta = json.loads(head_file.read_text())
        labels = tuple(meta["labels"])
        encoder = AutoModel.from_pretrained(str(folder))
        model = TextClassifier(encoder, meta["pooling"], len(labels))
        model.head.load_state_dict(load_file(str(folder / "head.safetensors")))
        model.eval()
        return cls(model, AutoTokenizer.from_pretrained(str(folder)), labels)

    @torch.no_grad()
    def predict(
        self, texts: Sequence[str], max_length: int = 128
    ) -> list[tuple[str, float]]:
        """The most likely label and its probability for each text."""
        batch = self.tokenizer(
            list(texts),
            truncation=True,
            max_length=max_length,
            padding=True,
            return_tensors="pt",
        )
        probabilities = self.model(batch["input_ids"], batch["attention_mask"]).softmax(
            -1
        )
        best = probabilities.max(-1)
        return [
            (self.labels[int(i)], float(p))
            for p, i in zip(best.values, best.indices, strict=True)
        ]


@dataclass
class OnnxClassifier:
    """An ONNX export (``fedgraft export --format onnx``) run with onnxruntime."""

    session: object
    tokenizer: PreTrainedTokenizerBase
    labels: tuple[str, ...]

    @classmethod
    def load(cls, directory: str | Path) -> OnnxClassifier:
        """Load ``model.onnx`` with its tokenizer and labels."""
        import onnxruntime

        folder = Path(directory)
        meta = json.loads((folder / "fedgraft_head.json").read_text())
        session = onnxruntime.InferenceSession(str(folder / "model.onnx"))
        tokenizer = AutoTokenizer.from_pretrained(str(folder))
        return cls(session, tokenizer, tuple(meta["labels"]))

    def predict(
        self, texts: Sequence[str], max_length: int = 128
    ) -> list[tuple[str, float]]:
        """The most likely label and its probability for each text."""
        import numpy as np

        batch = self.tokenizer(
            list(texts),
            truncation=True,
            max_length=max_length,
            padding=True,
            return_tensors="np",
        )
        inputs = {k: batch[k].astype(np.int64) for k in ("input_ids", "attention_mask")}
        (logits,) = self.session.run(None, inputs)  # type: ignore[attr-defined]
        shifted = np.exp(logits - logits.max(-1, keepdims=True))
        probabilities = shifted / shifted.sum(-1, keepdims=True)
        best = probabilities.argmax(-1)
        return [
            (self.labels[int(i)], float(probabilities[row, i]))
            for row, i in enumerate(best)
        ]


def load_classifier(directory: str | Path) -> MergedClassifier | OnnxClassifier:
    """A merged folder or an ONNX export, whichever ``directory`` holds."""
    if (Path(directory) / "model.onnx").exists():
        return OnnxClassifier.load(directory)
    return MergedClassifier.load(directory)
