"""What a site trains in a round, whatever the task (``model.task``).

Every task offers the same steps to :mod:`client.client_app`::

    rows -> encode (once per process, and on the site's disk where that pays) ->
    load the starting adapter -> train this round's phase -> the trained adapter

- the text classifier (:mod:`client.runtime`, :mod:`client.finetune`, DP-SGD in
  :mod:`client.private_training`);
- a causal language model (:mod:`client.causal_lm_site`);
- an image classifier (:mod:`client.vision_site`).

:data:`SITE_OPENERS` holds each task's opener, keyed by the task object
(:mod:`common.tasks`).

Torch and transformers load only when a site model is opened.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from types import MappingProxyType
from typing import TYPE_CHECKING, Any, Protocol

import numpy as np
from flwr.app import Context

from common.codec import AdapterState
from common.config import LoraSettings, RunConfig
from common.data import Example
from common.tasks import Task, task_named
from common.tasks.causal_lm import CAUSAL_LM
from common.tasks.image_classification import IMAGE_CLASSIFICATION
from common.tasks.text_classification import TEXT_CLASSIFICATION

if TYPE_CHECKING:
    from client.finetune import FinetuneResult, LocalTraining
    from client.runtime import LoadedBackbone
    from common.batching import Encoded
    from common.closed_form import ClassStatistics
    from common.evaluation import EvalResult


class SiteModel(Protocol):
    """A site's model for one task; rows are whatever :meth:`encode` returns."""

    def encode(self, examples: list[Example]) -> Any:
        """The rows in the form training reads (tokens, pixels)."""
        ...

    def load_state(self, state: AdapterState) -> None:
        """Overwrite every trainable tensor with ``state``."""
        ...

    def train(
        self,
        rows: Any,
        plan: LocalTraining,
        phase: str,
        start: AdapterState,
        context: Context,
    ) -> tuple[FinetuneResult, float | None]:
        """Train a round of ``phase`` from ``start``; the result and, with DP-SGD,
        the site's sample-level epsilon."""
        ...

    def state(self) -> AdapterState:
        """The trainable tensors now."""
        ...

    def evaluate(self, examples: list[Example]) -> EvalResult:
        """The model as it is now on ``examples`` (at least one row): loss and
        accuracy, and for a causal language model its tokens and perplexity."""
        ...

    def label_counts(self, rows: Any, num_labels: int) -> np.ndarray:
        """Rows per label (``fedavg-per-label``)."""
        ...


@dataclass(frozen=True)
class TextRows:
    """The text classifier's rows: as read, and tokenised."""

    examples: list[Example]
    encoded: Encoded

    def __len__(self) -> int:
        return len(self.encoded)


@dataclass
class TextSite:
    """The text classifier at a site: the calls of :mod:`client.runtime` and
    :mod:`client.finetune` (DP-SGD with ``dp.level = sample``)."""

    config: RunConfig
    backbone: LoadedBackbone
    fingerprint: str
    labels: tuple[str, ...]
    cache_dir: Path | None

    def encode(self, examples: list[Example]) -> TextRows:
        from client.runtime import encoded_examples

        encoded = encoded_examples(
            examples,
            self.labels,
            self.backbone,
            self.fingerprint,
            self.config.model.max_length,
            self.cache_dir,
        )
        return TextRows(examples, encoded)

    def load_state(self, state: AdapterState) -> None:
        from common.model import load_adapter_state

        load_adapter_state(self.backbone.model, state)

    def train(
        self,
        rows: TextRows,
        plan: LocalTraining,
        phase: str,
        start: AdapterState,
        context: Context,
    ) -> tuple[FinetuneResult, float | None]:
        from client import private_training
        from client.finetune import train_phase
        from client.runtime import cached_features, cached_prefix, rows_key
        from common.model import encoder_digest

        backbone, encoded = self.backbone, rows.encoded
        if self.config.dp.sample_level:
            result, history, sample_epsilon = private_training.dp_sgd(
                backbone.model,
                encoded,
                backbone.pad_id,
                plan,
                self.config.dp,
                private_training.load_history(context),
            )
            private_training.save_history(context, history)
            return result, sample_epsilon
        key = rows_key(
            rows.examples, self.labels, self.fingerprint, self.config.model.max_length
        )
        result = train_phase(
            backbone.model,
            encoded,
            backbone.pad_id,
            plan,
            phase,
            lambda: cached_features(backbone, encoded, key, encoder_digest(start)),
            lambda: cached_prefix(backbone, encoded, key, self.cache_dir),
        )
        return result, None

    def state(self) -> AdapterState:
        from common.model import adapter_state

        return adapter_state(self.backbone.model)

    def evaluate(self, examples: list[Example]) -> EvalResult:
        from common.evaluation import evaluate

        rows = self.encode(examples)
        return evaluate(self.backbone.model, rows.encoded, self.backbone.pad_id)

    def label_counts(self, rows: TextRows, num_labels: int) -> np.ndarray:
        return np.bincount(rows.encoded.labels, minlength=num_labels)

    def class_statistics(self, rows: TextRows, num_labels: int) -> ClassStatistics:
        """The sums of the rows' pooled features under the loaded adapter, by label
        (``head.init = closed-form``); the features are cached as the head-only
        rounds' are, so a following head round reuses them."""
        from client.runtime import cached_features, rows_key
        from common.closed_form import NEEDS_GRAM, ClassStatistics
        from common.model import adapter_state, encoder_digest

        backbone, head = self.backbone, self.config.head
        key = rows_key(
            rows.examples, self.labels, self.fingerprint, self.config.model.max_length
        )
        features = cached_features(
            backbone,
            rows.encoded,
            key,
            encoder_digest(adapter_state(backbone.model)),
        )  # (n, d)
        return ClassStatistics.of(
            features.cpu().numpy(),
            np.asarray(rows.encoded.labels),
            num_labels,
            head.feature_clip,
            with_gram=head.closed_form in NEEDS_GRAM,
        )


def _open_text_site(
    config: RunConfig,
    backbone_dir: Path,
    fingerprint: str,
    lora: LoraSettings,
    pooling: str,
    labels: tuple[str, ...],
    cache_dir: Path | None,
) -> SiteModel:
    from client.runtime import loaded_backbone

    backbone = loaded_backbone(
        backbone_dir,
        fingerprint,
        lora,
        pooling,
        len(labels),
        config.seed,
        config.model.quantize,
    )
    return TextSite(config, backbone, fingerprint, labels, cache_dir)


def _open_causal_lm_site(
    config: RunConfig,
    backbone_dir: Path,
    fingerprint: str,
    lora: LoraSettings,
    pooling: str,
    labels: tuple[str, ...],
    cache_dir: Path | None,
) -> SiteModel:
    from client.causal_lm_site import open_causal_lm_site

    return open_causal_lm_site(config, backbone_dir, fingerprint, lora, cache_dir)


def _open_image_site(
    config: RunConfig,
    backbone_dir: Path,
    fingerprint: str,
    lora: LoraSettings,
    pooling: str,
    labels: tuple[str, ...],
    cache_dir: Path | None,
) -> SiteModel:
    from client.vision_site import open_vision_site

    return open_vision_site(config, backbone_dir, fingerprint, lora, pooling, labels)


#: Each task's site side: the site code trains with :mod:`client.finetune` and
#: DP-SGD, which ``common`` may not import, so it is looked up here by task.
SITE_OPENERS: Mapping[Task, Callable[..., SiteModel]] = MappingProxyType(
    {
        TEXT_CLASSIFICATION: _open_text_site,
        CAUSAL_LM: _open_causal_lm_site,
        IMAGE_CLASSIFICATION: _open_image_site,
    }
)


def open_site(
    config: RunConfig,
    backbone_dir: Path,
    fingerprint: str,
    lora: LoraSettings,
    pooling: str,
    labels: tuple[str, ...],
    cache_dir: Path | None,
) -> SiteModel:
    """The site's model for ``config.model.task``, loaded once per process and per
    backbone, LoRA shape, pooling and label count."""
    opener = SITE_OPENERS[task_named(config.model.task)]
    return opener(config, backbone_dir, fingerprint, lora, pooling, labels, cache_dir)
