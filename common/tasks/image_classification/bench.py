"""The whole image classifier of a run, for the coordinator: the seeded initial
adapter and head, accuracy on the held-out images, and the exported ``adapter/`` and
``merged/`` folders."""

from __future__ import annotations

import logging
from collections.abc import Collection
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from common.backbone import coordinator_backbone_dir, fingerprint, name_adapter_base
from common.codec import AdapterState
from common.config import RunConfig
from common.data import Example
from common.evaluation import EvalResult, evaluate_head
from common.feature_cache import FeatureCache
from common.outputs import ADAPTER_DIR, MERGED_DIR, RunOutputs
from common.quantised import require_quantisable
from common.sharing import encoder_digest
from common.tasks.finish import backbone_facts
from common.tasks.image_classification.model import (
    ImageClassifier,
    ImageEncoded,
    encode_images,
    image_adapter_state,
    image_features,
    load_image_adapter_state,
    load_image_classifier,
    load_image_processor,
    save_image_adapter,
    save_merged_image_classifier,
)

log = logging.getLogger(__name__)


@dataclass
class VisionWorkbench:
    """Backbone, classifier, image processor and evaluation images of an
    ``image-cls`` run. Build it with :meth:`open`."""

    config: RunConfig
    backbone_dir: Path
    fingerprint: str
    pooling: str
    labels: tuple[str, ...]
    model: ImageClassifier
    processor: Any
    test: ImageEncoded
    features: FeatureCache

    @classmethod
    def open(
        cls, config: RunConfig, labels: tuple[str, ...], test_examples: list[Example]
    ) -> VisionWorkbench:
        """Load the backbone named by ``model.name`` with the seeded adapter and a
        random head, and preprocess the evaluation images.

        Raises
        ------
        common.backbone.BackboneError
            When the backbone cannot be found.
        common.data.DataError
            When an evaluation image cannot be read or its label is outside
            ``labels``.
        common.config.ConfigError
            When ``model.quantize`` asks to quantise a backbone without linear
            layers, or ``lora.layers`` exceeds its blocks.
        """
        backbone_dir = coordinator_backbone_dir(config.model.name)
        processor = load_image_processor(backbone_dir)
        model = load_image_classifier(
            backbone_dir, config.lora, config.model.pooling, len(labels), config.seed
        )
        # The coordinator stays in full precision; refuse here what every site
        # would refuse, before any round starts.
        require_quantisable(model.encoder, config.model.quantize)
        bench = cls(
            config,
            backbone_dir,
            fingerprint(backbone_dir),
            model.pooling,
            labels,
            model,
            processor,
            encode_images(processor, test_examples, labels),
            FeatureCache(capacity=2),
        )
        log.info(
            "image backbone %s (%s, %s pooling): %d trainable parameters, %d labels, "
            "%d test images",
            config.model.name,
            bench.fingerprint[:12],
            bench.pooling,
            sum(p.numel() for p in model.parameters() if p.requires_grad),
            len(labels),
            len(bench.test),
        )
        return bench

    def state(self) -> AdapterState:
        """The current adapter state (LoRA and head)."""
        return image_adapter_state(self.model)

    def evaluate(
        self,
        state: AdapterState | None = None,
        labels: Collection[int] | None = None,
    ) -> EvalResult:
        """Evaluate ``state`` (or the current weights) on the evaluation images, or
        on those of ``labels`` only; pooled features are reused while the adapters
        are unchanged (head-only rounds)."""
        if state is not None:
            load_image_adapter_state(self.model, state)
        features = self.features.get(
            "test",
            encoder_digest(self.state()),
            lambda: image_features(self.model, self.test),
        )
        rows = np.ones(len(self.test), bool)
        if labels is not None:
            rows = np.isin(self.test.labels, list(labels))
            if not rows.any():
                raise ValueError("no evaluation image has any of these labels")
        return evaluate_head(
            self.model.head,
            features[torch.from_numpy(rows).to(features.device)],
            self.test.labels[rows],
        )

    def encode_examples(self, examples: list[Example]) -> ImageEncoded:
        """Preprocess training images with the run's processor and label map."""
        return encode_images(self.processor, examples, self.labels)

    def export(self, outputs: RunOutputs, state: AdapterState) -> None:
        """Write ``adapter/`` and ``merged/`` for ``state``."""
        load_image_adapter_state(self.model, state)
        adapter = outputs.write_folder(
            ADAPTER_DIR, lambda path: save_image_adapter(self.model, path, self.labels)
        )
        name_adapter_base(adapter, self.config.model.name)
        outputs.write_folder(
            MERGED_DIR,
            lambda path: save_merged_image_classifier(
                self.model, self.processor, path, self.labels
            ),
        )

    def backbone_facts(self) -> dict[str, object]:
        """Name, fingerprint, pooling and sizes for ``summary.json``."""
        return backbone_facts(self, self.model.encoder)

