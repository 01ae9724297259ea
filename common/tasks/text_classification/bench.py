"""The whole model of a run, for a party that holds one: the coordinator (to build the
initial adapter, evaluate and export) and the centralised baseline (to train too)."""

from __future__ import annotations

import logging
from collections.abc import Collection
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from transformers import AutoTokenizer, PreTrainedTokenizerBase

from common.backbone import (
    coordinator_backbone_dir,
    fingerprint,
    name_adapter_base,
    pooling_mode,
)
from common.batching import Encoded, encode
from common.closed_form import NEEDS_GRAM, ClassStatistics, head_tensors, solve_head
from common.config import RunConfig
from common.data import Example, encode_labels
from common.evaluation import EvalResult, evaluate_head
from common.feature_cache import FeatureCache
from common.outputs import RunOutputs
from common.sharing import encoder_digest
from common.tasks.finish import backbone_facts, trainable_parameter_count
from common.tasks.text_classification.features import pooled_features
from common.tasks.text_classification.label_head import (
    init_head_from_texts,
    label_texts,
)
from common.tasks.text_classification.model import (
    AdapterState,
    TextClassifier,
    adapter_state,
    attach_lora,
    load_adapter_state,
    load_encoder,
)
from common.tasks.text_classification.saving import save_adapter, save_merged

log = logging.getLogger(__name__)


@dataclass
class Workbench:
    """Backbone, classifier, tokenizer and evaluation rows of one run.

    Build it with :meth:`open`.
    """

    config: RunConfig
    backbone_dir: Path
    fingerprint: str
    pooling: str
    labels: tuple[str, ...]
    model: TextClassifier
    tokenizer: PreTrainedTokenizerBase
    pad_id: int
    test: Encoded
    features: FeatureCache

    @classmethod
    def open(
        cls, config: RunConfig, labels: tuple[str, ...], test_examples: list[Example]
    ) -> Workbench:
        """Load the backbone named by ``model.name``, attach the seeded adapter and
        start the head as ``head.init`` says.

        Raises
        ------
        common.backbone.BackboneError
            When the backbone cannot be found.
        common.data.DataError
            When a test label is outside ``labels``.
        common.tasks.text_classification.label_head.LabelDescriptionError
            When ``head.label-descriptions`` cannot be read.
        """
        backbone_dir = coordinator_backbone_dir(config.model.name)
        pooling = (
            pooling_mode(backbone_dir)
            if config.model.pooling == "native"
            else config.model.pooling
        )
        model = attach_lora(
            load_encoder(backbone_dir), config.lora, pooling, len(labels), config.seed
        )
        tokenizer = AutoTokenizer.from_pretrained(str(backbone_dir))
        pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
        # closed-form: the label-name rows until the sites' statistics arrive.
        if config.head.init != "random":
            init_head_from_texts(
                model,
                tokenizer,
                label_texts(labels, config.head.label_descriptions),
                config.model.max_length,
                pad_id,
            )
        test = encode(
            tokenizer,
            [e.text for e in test_examples],
            encode_labels(test_examples, labels),
            config.model.max_length,
        )
        bench = cls(
            config,
            backbone_dir,
            fingerprint(backbone_dir),
            pooling,
            labels,
            model,
            tokenizer,
            pad_id,
            test,
            FeatureCache(capacity=2),
        )
        log.info(
            "backbone %s (%s, %s pooling): %d trainable parameters, %d labels, "
            "%d test rows",
            config.model.name,
            bench.fingerprint[:12],
            pooling,
            trainable_parameter_count(model),
            len(labels),
            len(test),
        )
        return bench

    def state(self) -> AdapterState:
        """The current adapter state (LoRA and head)."""
        return adapter_state(self.model)

    def evaluate(
        self,
        state: AdapterState | None = None,
        labels: Collection[int] | None = None,
    ) -> EvalResult:
        """Evaluate ``state`` (or the current weights) on the evaluation rows, or on
        those of ``labels`` only (a client's own domain).

        The pooled features are reused while the adapters are unchanged (head-only
        rounds), so such an evaluation costs one matrix product.
        """
        if state is not None:
            load_adapter_state(self.model, state)
        features = self.features_of(self.test, "test")
        if labels is None:
            return evaluate_head(self.model.head, features, self.test.labels)
        rows = np.isin(self.test.labels, list(labels))
        if not rows.any():
            raise ValueError("no evaluation row has any of these labels")
        return evaluate_head(
            self.model.head,
            features[torch.from_numpy(rows).to(features.device)],
            self.test.labels[rows],
        )

    def features_of(self, encoded: Encoded, rows_key: str) -> torch.Tensor:
        """Pooled features of ``encoded`` under the current adapters, cached."""
        return self.features.get(
            rows_key,
            encoder_digest(self.state()),
            lambda: pooled_features(self.model, encoded, self.pad_id),
        )

    def solve_closed_form_head(self, encoded: Encoded, rows_key: str) -> None:
        """Set the head to ``head.closed-form`` solved on ``encoded``'s rows, all
        held here (the centralised counterpart of the sites' statistics round); their
        features are cached under ``rows_key``, so another variant costs a solve."""
        head = self.config.head
        features = self.features_of(encoded, rows_key)  # (n, d)
        statistics = ClassStatistics.of(
            features.cpu().numpy(),
            np.asarray(encoded.labels),
            len(self.labels),
            head.feature_clip,
            with_gram=head.closed_form in NEEDS_GRAM,
        )
        weight, bias = solve_head(
            statistics, head.closed_form, head.closed_form_shrinkage
        )
        load_adapter_state(self.model, self.state() | head_tensors(weight, bias))

    def encode_examples(self, examples: list[Example]) -> Encoded:
        """Tokenise training rows with the run's tokenizer and label map."""
        return encode(
            self.tokenizer,
            [e.text for e in examples],
            encode_labels(examples, self.labels),
            self.config.model.max_length,
        )

    def export(self, outputs: RunOutputs, state: AdapterState) -> None:
        """Write ``adapter/`` and ``merged/`` for ``state``."""
        load_adapter_state(self.model, state)
        name_adapter_base(
            save_adapter(outputs, self.model, self.labels), self.config.model.name
        )
        save_merged(outputs, self.model, self.tokenizer, self.labels, self.backbone_dir)

    def backbone_facts(self) -> dict[str, object]:
        """Name, fingerprint, pooling and sizes for ``summary.json``."""
        return backbone_facts(self, self.model.encoder)
