"""An image classifier: a frozen image backbone (ViT, ResNet, ConvNeXt, ... through
``AutoModel``) with LoRA adapters, pooling, and a new linear head; its pixels, its
adapter state and its merged export.

Pooling (``model.pooling``): ``native`` takes the class token of backbones that have
one (ViT and its kin, as their own classifiers do) and the backbone's pooled output
otherwise (a ResNet's or ConvNeXt's global average pool); ``cls``, ``mean`` and
``max`` force the class token, or the mean or maximum over tokens or feature-map
positions.
"""

from __future__ import annotations

import copy
import json
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from peft import PeftModel
from peft.utils import get_peft_model_state_dict, set_peft_model_state_dict
from torch import nn
from transformers import AutoImageProcessor, AutoModel

from common.codec import AdapterState
from common.config import LoraSettings
from common.console import step_progress
from common.data import Example, encode_labels
from common.evaluation import EvalResult, evaluate_head
from common.feature_cache import FEATURE_PASS
from common.lora_targets import require_same_tensors, wrap_with_lora
from common.quantised import load_frozen
from common.sharing import HEAD_PREFIX
from common.tasks.base import write_task_file
from common.tasks.image_classification import IMAGE_CLASSIFICATION
from common.tasks.image_classification.data import read_image

#: Model types whose own classifier reads the class token.
CLASS_TOKEN_MODELS = (
    "vit",
    "deit",
    "beit",
    "dinov2",
    "data2vec-vision",
    "vit_msn",
    "vit_mae",
)
HEAD_FILE = "fedgraft_head.json"
HEAD_WEIGHTS = "head.safetensors"


def image_pooling(setting: str, model_type: str) -> str:
    """The pooling ``model.pooling = setting`` means for a backbone of
    ``model_type``: ``cls``, ``mean``, ``max`` or ``pooler``."""
    if setting != "native":
        return setting
    return "cls" if model_type in CLASS_TOKEN_MODELS else "pooler"


def pool_image(output: Any, mode: str) -> torch.Tensor:
    """Pool a backbone's output into ``(batch, features)``.

    Raises
    ------
    ValueError
        For ``cls`` on a backbone that outputs feature maps (no class token).
    """
    if mode == "pooler" and getattr(output, "pooler_output", None) is not None:
        return output.pooler_output.flatten(1)  # (batch, C, 1, 1) -> (batch, C)
    hidden = output.last_hidden_state
    if hidden.dim() == 4:  # (batch, C, H, W) feature maps -> (batch, H*W, C)
        if mode == "cls":
            raise ValueError(
                "model.pooling = cls needs a backbone with a class token, but this one "
                "outputs feature maps; use native, mean or max"
            )
        hidden = hidden.flatten(2).transpose(1, 2)
    if mode == "cls":
        return hidden[:, 0]
    if mode == "max":
        return hidden.max(1).values
    return hidden.mean(1)  # mean, and pooler for a backbone without a pooled output


def feature_size(config: Any) -> int:
    """Width of the pooled features: ``hidden_size``, or the last stage's width."""
    size = getattr(config, "hidden_size", None)
    return int(size) if isinstance(size, int) else int(config.hidden_sizes[-1])


class ImageClassifier(nn.Module):
    """Image backbone (wrapped by PEFT), pooling and a linear head.

    Parameters
    ----------
    encoder : PeftModel
        Maps ``pixel_values`` to ``last_hidden_state`` (and ``pooler_output``).
    pooling : str
        ``cls``, ``mean``, ``max`` or ``pooler`` (see :func:`image_pooling`).
    num_labels, features : int
        The head's output and input sizes.
    """

    def __init__(
        self, encoder: nn.Module, pooling: str, num_labels: int, features: int
    ) -> None:
        super().__init__()
        self.encoder = encoder
        self.pooling = pooling
        self.head = nn.Linear(features, num_labels)

    def embed(self, pixel_values: torch.Tensor) -> torch.Tensor:
        """Pooled features ``(batch, features)``: what the head reads."""
        return pool_image(self.encoder(pixel_values=pixel_values), self.pooling)

    def forward(self, pixel_values: torch.Tensor) -> torch.Tensor:
        """Logits ``(batch, num_labels)``."""
        return self.head(self.embed(pixel_values).to(self.head.weight.dtype))


def load_image_classifier(
    backbone_dir: Path,
    settings: LoraSettings,
    pooling: str,
    num_labels: int,
    seed: int,
    device: torch.device | str = "cpu",
    quantize: str = "none",
) -> ImageClassifier:
    """The frozen backbone with seeded LoRA adapters and a seeded random head.

    ``pooling`` is ``model.pooling`` (``native`` resolves per backbone);
    ``quantize`` (``model.quantize``) loads the backbone's linear layers in 4 or 8
    bits (:func:`common.quantised.load_frozen`; refused for a backbone without any,
    a ResNet).
    """
    backbone = load_frozen(AutoModel, backbone_dir, device, quantize)
    mode = image_pooling(pooling, getattr(backbone.config, "model_type", ""))
    features = feature_size(backbone.config)
    model = ImageClassifier(
        wrap_with_lora(backbone, settings, seed), mode, num_labels, features
    )
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        model.head.weight.copy_(
            torch.randn(model.head.weight.shape, generator=generator) * 0.02
        )
        model.head.bias.zero_()
    # The backbone is on ``device`` already, and PEFT puts each adapter on its base
    # layer's device; a quantised model must not be moved as a whole.
    model.head.to(device)
    return model


def load_image_processor(backbone_dir: Path) -> Any:
    """The backbone's image processor (``preprocessor_config.json``).

    Raises
    ------
    FileNotFoundError
        When the backbone folder has none, naming it.
    """
    if not (backbone_dir / "preprocessor_config.json").exists():
        raise FileNotFoundError(
            f"{backbone_dir}: no preprocessor_config.json; an image backbone needs its "
            "image processor beside the weights"
        )
    return AutoImageProcessor.from_pretrained(str(backbone_dir))


def image_adapter_state(model: ImageClassifier) -> AdapterState:
    """LoRA factors (PEFT's names) and the head, as float32 numpy."""
    state = dict(get_peft_model_state_dict(model.encoder))
    state.update({HEAD_PREFIX + k: v for k, v in model.head.state_dict().items()})
    return {
        k: v.detach().to("cpu", torch.float32).numpy().copy() for k, v in state.items()
    }


def load_image_adapter_state(
    model: ImageClassifier, state: Mapping[str, np.ndarray]
) -> None:
    """Overwrite every trainable tensor of ``model`` with ``state``.

    Raises
    ------
    KeyError
        When ``state`` lacks a tensor of the model or holds one it does not have.
    """
    expected = set(get_peft_model_state_dict(model.encoder)) | {
        HEAD_PREFIX + k for k in model.head.state_dict()
    }
    require_same_tensors(expected, state)
    set_peft_model_state_dict(
        model.encoder,
        {
            k: torch.from_numpy(np.asarray(v))
            for k, v in state.items()
            if not k.startswith(HEAD_PREFIX)
        },
    )
    device = model.head.weight.device
    model.head.load_state_dict(
        {
            k.removeprefix(HEAD_PREFIX): torch.from_numpy(np.asarray(v)).to(device)
            for k, v in state.items()
            if k.startswith(HEAD_PREFIX)
        }
    )


@dataclass(frozen=True)
class ImageEncoded:
    """Preprocessed images with their label indices.

    Attributes
    ----------
    pixels : torch.Tensor
        ``(n, channels, height, width) float32`` on the CPU, as the image processor
        makes them.
    labels : np.ndarray
        ``(n,) int64`` label indices.
    key : str
        A digest of the rows they were made from (keys caches of features).
    """

    pixels: torch.Tensor
    labels: np.ndarray
    key: str = ""

    def __len__(self) -> int:
        return len(self.labels)


def encode_images(
    processor: Any,
    examples: Sequence[Example],
    labels: Sequence[str],
    batch_size: int = 64,
) -> ImageEncoded:
    """Read and preprocess every image once.

    Raises
    ------
    common.data.DataError
        For an unreadable image or a label outside ``labels``, naming the row.
    """
    label_ids = encode_labels(examples, labels)
    chunks = []
    for start in range(0, len(examples), batch_size):
        images = [read_image(row) for row in examples[start : start + batch_size]]
        chunks.append(processor(images=images, return_tensors="pt")["pixel_values"])
    pixels = torch.cat(chunks).float() if chunks else torch.empty(0)
    return ImageEncoded(pixels, np.asarray(label_ids, dtype=np.int64))


@torch.no_grad()
def image_features(
    model: ImageClassifier, encoded: ImageEncoded, batch_size: int = 64
) -> torch.Tensor:
    """Pooled features of every image, in row order: ``(n, features) float32`` on
    the model's device (eval mode, so LoRA dropout is off). On a terminal a live
    bar counts the images done."""
    device = model.head.weight.device
    was_training = model.training
    model.eval()
    parts = []
    with step_progress(FEATURE_PASS, len(encoded)) as advance:
        for start in range(0, len(encoded), batch_size):
            pixels = encoded.pixels[start : start + batch_size].to(device)
            with torch.autocast(
                device.type, dtype=torch.bfloat16, enabled=device.type == "cuda"
            ):
                parts.append(model.embed(pixels).float())
            advance(len(pixels))
    model.train(was_training)
    return torch.cat(parts)


def evaluate_images(model: ImageClassifier, encoded: ImageEncoded) -> EvalResult:
    """Loss and accuracy of ``model`` on every image of ``encoded``."""
    return evaluate_head(model.head, image_features(model, encoded), encoded.labels)


def save_image_head(
    model: ImageClassifier, directory: Path, labels: tuple[str, ...]
) -> None:
    """Write the head, its pooling, the label map and the task beside a backbone."""
    from safetensors.torch import save_file

    save_file(
        {k: v.detach().cpu().contiguous() for k, v in model.head.state_dict().items()},
        str(directory / HEAD_WEIGHTS),
    )
    (directory / HEAD_FILE).write_text(
        json.dumps(
            {
                "pooling": model.pooling,
                "labels": list(labels),
                "task": IMAGE_CLASSIFICATION.name,
            },
            indent=2,
        )
    )
    write_task_file(directory, IMAGE_CLASSIFICATION.name)


def save_image_adapter(
    model: ImageClassifier, directory: Path, labels: tuple[str, ...]
) -> None:
    """The adapter in PEFT format with the head beside it."""
    model.encoder.save_pretrained(str(directory))
    save_image_head(model, directory, labels)


def save_merged_image_classifier(
    model: ImageClassifier, processor: Any, directory: Path, labels: tuple[str, ...]
) -> None:
    """The backbone with the adapter merged (``AutoModel`` loads it), its image
    processor, the head and the label map."""
    encoder: PeftModel = model.encoder  # type: ignore[assignment]
    merged = copy.deepcopy(encoder).merge_and_unload()
    merged.save_pretrained(str(directory))
    processor.save_pretrained(str(directory))
    save_image_head(model, directory, labels)


@dataclass
class MergedImageClassifier:
    """A merged image backbone with its head, pooling, processor and labels."""

    model: ImageClassifier
    processor: Any
    labels: tuple[str, ...]

    @classmethod
    def load(cls, directory: str | Path) -> MergedImageClassifier:
        """Load a ``merged/`` folder of an ``image-cls`` run.

        Raises
        ------
        FileNotFoundError
            When the folder holds no backbone (an ONNX export, say), naming it.
        """
        from safetensors.torch import load_file

        folder = Path(directory)
        if not (folder / "config.json").exists():
            raise FileNotFoundError(
                f"{folder}: no config.json; point at an image-cls run's merged/ "
                "folder or its --format hf export (an ONNX export runs with "
                "onnxruntime)"
            )
        meta = json.loads((folder / HEAD_FILE).read_text())
        labels = tuple(meta["labels"])
        encoder = AutoModel.from_pretrained(str(folder))
        model = ImageClassifier(
            encoder, meta["pooling"], len(labels), feature_size(encoder.config)
        )
        model.head.load_state_dict(load_file(str(folder / HEAD_WEIGHTS)))
        model.eval()
        return cls(model, AutoImageProcessor.from_pretrained(str(folder)), labels)

    @torch.no_grad()
    def predict(self, paths: Sequence[str]) -> list[tuple[str, float]]:
        """The most likely label and its probability for each image file."""
        rows = [Example(text=str(path), label="", where=str(path)) for path in paths]
        images = [read_image(row) for row in rows]
        pixels = self.processor(images=images, return_tensors="pt")["pixel_values"]
        best = self.model(pixels.float()).softmax(-1).max(-1)
        return [
            (self.labels[int(i)], float(p))
            for p, i in zip(best.values, best.indices, strict=True)
        ]
