"""An image classifier at a site (``model.task = image-cls``): loaded once per
process, each image read and preprocessed once per process (pixels are kept in
memory, not on disk: they are larger than the files), and trained end to end or, in
head-only rounds, on pooled features computed once per adapter state."""

from __future__ import annotations

import dataclasses
import hashlib
import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from flwr.app import Context
from torch import nn
from torch.nn import functional as F

from client import private_training
from client.caches import BoundedCache
from client.finetune import FinetuneResult, LocalTraining, train_head, train_steps
from client.runtime import pick_device
from client.sites import SiteRequest
from common.codec import AdapterState
from common.config import LoraSettings, RunConfig
from common.data import Example
from common.evaluation import EvalResult
from common.feature_cache import FeatureCache
from common.sharing import encoder_digest
from common.tasks.image_classification.model import (
    ImageClassifier,
    ImageEncoded,
    encode_images,
    evaluate_images,
    image_adapter_state,
    image_features,
    load_image_adapter_state,
    load_image_classifier,
    load_image_processor,
)

log = logging.getLogger(__name__)



@dataclass
class ImageCaches:
    """The image classifier's caches in one client process: the latest model and
    image processor only (by fingerprint, LoRA shape, pooling, label count and
    precision), preprocessed images by :func:`image_rows_key`, and pooled features
    while only the head trains."""

    models: BoundedCache[
        tuple[str, LoraSettings, str, int, str], tuple[ImageClassifier, Any]
    ] = field(default_factory=lambda: BoundedCache(1))
    rows: BoundedCache[str, ImageEncoded] = field(
        default_factory=lambda: BoundedCache(8)
    )
    features: FeatureCache = field(default_factory=lambda: FeatureCache(capacity=8))


def image_rows_key(
    examples: list[Example], labels: tuple[str, ...], fingerprint: str
) -> str:
    """A digest of the images (path, size, modification time), labels and backbone."""
    digest = hashlib.sha256(f"image|{fingerprint}|{'|'.join(labels)}".encode())
    for example in examples:
        path = Path(example.text)
        size, modified = (
            (path.stat().st_size, path.stat().st_mtime_ns)
            if path.exists()
            else (-1, -1)
        )
        line = f"{example.text}\0{example.label}\0{size}\0{modified}\n"
        digest.update(line.encode())
    return digest.hexdigest()


@dataclass
class VisionSite:
    """The site's image classifier, image processor and label map."""

    config: RunConfig
    model: ImageClassifier
    processor: Any
    labels: tuple[str, ...]
    fingerprint: str
    caches: ImageCaches

    def encode(self, examples: list[Example]) -> ImageEncoded:
        """Preprocess the images once per process."""
        key = image_rows_key(examples, self.labels, self.fingerprint)
        return self.caches.rows.get(
            key,
            lambda: dataclasses.replace(
                encode_images(self.processor, examples, self.labels), key=key
            ),
        )

    def load_state(self, state: AdapterState) -> None:
        load_image_adapter_state(self.model, state)

    def train(
        self,
        rows: ImageEncoded,
        plan: LocalTraining,
        phase: str,
        start: AdapterState,
        context: Context,
    ) -> tuple[FinetuneResult, float | None]:
        """``head``: the head alone on pooled features (cached per adapter state);
        ``lora``: adapters and head end to end, with DP-SGD under ``dp.level =
        sample`` (:func:`client.private_training.dp_sgd_at_site`; the site's epsilon
        comes back with the result)."""
        if self.config.dp.sample_level and phase == "lora":
            return self._train_private(rows, plan, context)
        if phase == "head":
            # The pooled features depend on the pooling and the backbone's precision
            # too; a process may hold sites of runs that differ in either.
            model = self.config.model
            features = self.caches.features.get(
                f"{rows.key}|{model.pooling}|{model.quantize}",
                encoder_digest(start),
                lambda: image_features(self.model, rows),
            )
            return train_head(self.model.head, features, rows.labels, plan), None
        device = self.model.head.weight.device
        targets = torch.from_numpy(rows.labels)

        def step_loss(batch_rows: list[int]) -> tuple[torch.Tensor, int]:
            index = torch.as_tensor(batch_rows)
            logits = self.model(rows.pixels[index].to(device, non_blocking=True))
            loss = F.cross_entropy(logits.float(), targets[index].to(device))
            return loss, len(batch_rows)

        return train_steps(self.model, [1] * len(rows), step_loss, plan), None

    def _train_private(
        self, rows: ImageEncoded, plan: LocalTraining, context: Context
    ) -> tuple[FinetuneResult, float]:
        def batch_loss(private: nn.Module, tensors: list[torch.Tensor]) -> torch.Tensor:
            pixels, labels = tensors
            return F.cross_entropy(private(pixels).float(), labels)

        return private_training.dp_sgd_at_site(
            self.model,
            [rows.pixels, torch.from_numpy(rows.labels)],
            batch_loss,
            plan,
            self.config.dp,
            context,
        )

    def state(self) -> AdapterState:
        return image_adapter_state(self.model)

    def evaluate(self, examples: list[Example]) -> EvalResult:
        return evaluate_images(self.model, self.encode(examples))

    def label_counts(self, rows: ImageEncoded, num_labels: int) -> np.ndarray:
        return np.bincount(rows.labels, minlength=num_labels)


def open_vision_site(caches: ImageCaches, request: SiteRequest) -> VisionSite:
    """The process's image classifier for this backbone, LoRA shape, pooling, label
    count and precision (``model.quantize``), loaded once (only the latest is kept,
    to bound memory)."""
    config, fingerprint, lora = request.config, request.fingerprint, request.lora
    backbone_dir, pooling, labels = (
        request.backbone_dir,
        request.pooling,
        request.labels,
    )
    quantize = config.model.quantize

    def load() -> tuple[ImageClassifier, Any]:
        device = pick_device()
        model = load_image_classifier(
            backbone_dir, lora, pooling, len(labels), config.seed, device, quantize
        )
        processor = load_image_processor(backbone_dir)
        log.info(
            "loaded image backbone %s on %s (quantize = %s)",
            fingerprint[:12],
            device,
            quantize,
        )
        return model, processor

    key = (fingerprint, lora, pooling, len(labels), quantize)
    model, processor = caches.models.get(key, load)
    return VisionSite(config, model, processor, labels, fingerprint, caches)
