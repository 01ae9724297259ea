"""What a site trains in a round, whatever the task (``model.task``).

Every task offers the same steps to :mod:`client.client_app`::

    rows -> encode (once per process, and on the site's disk where that pays) ->
    load the starting adapter -> train this round's phase -> the trained adapter

- the text classifier (:mod:`client.runtime`, :mod:`client.finetune`, DP-SGD in
  :mod:`client.private_training`);
- a causal language model (:mod:`client.causal_lm_site`);
- an image classifier (:mod:`client.vision_site`).

:data:`SITE_OPENERS` holds each task's opener, keyed by the task object
(:mod:`common.tasks`); :class:`SiteRuntime` holds each task's caches.

Torch and transformers load only when a site model is opened.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from types import MappingProxyType
from typing import TYPE_CHECKING, Any, Protocol, TypeVar, cast

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
    from client.runtime import LoadedBackbone, TextCaches
    from common.batching import Encoded
    from common.closed_form import ClassStatistics
    from common.evaluation import EvalResult


C = TypeVar("C")


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
    caches: TextCaches

    def encode(self, examples: list[Example]) -> TextRows:
        from client.runtime import encoded_examples

        encoded = encoded_examples(
            self.caches,
            examples,
            self.labels,
            self.backbone,
            self.fingerprint,
            self.config.model.max_length,
            self.cache_dir,
        )
        return TextRows(examples, encoded)

    def load_state(self, state: AdapterState) -> None:
        from common.tasks.text_classification.model import load_adapter_state

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
        from common.sharing import encoder_digest

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
            lambda: cached_features(
                self.caches, backbone, encoded, key, encoder_digest(start)
            ),
            lambda: cached_prefix(self.caches, backbone, encoded, key, self.cache_dir),
        )
        return result, None

    def state(self) -> AdapterState:
        from common.tasks.text_classification.model import adapter_state

        return adapter_state(self.backbone.model)

    def evaluate(self, examples: list[Example]) -> EvalResult:
        from common.tasks.text_classification.evaluation import evaluate

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
        from common.sharing import encoder_digest
        from common.tasks.text_classification.model import adapter_state

        backbone, head = self.backbone, self.config.head
        key = rows_key(
            rows.examples, self.labels, self.fingerprint, self.config.model.max_length
        )
        features = cached_features(
            self.caches,
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


@dataclass(frozen=True)
class SiteRequest:
    """What opening a site's model takes, whatever the task.

    Attributes
    ----------
    config : RunConfig
        The run's configuration.
    backbone_dir : Path
        Where the site holds the backbone.
    fingerprint : str
        The backbone's fingerprint (keys every cache).
    lora : LoraSettings
        The LoRA shape this site trains (its own rank under FlexLoRA).
    pooling : str
        The coordinator's pooling (a classifier's).
    labels : tuple[str, ...]
        The run's label map (empty for a causal LM).
    cache_dir : Path or None
        The site's disk cache for tokens and frozen-layer outputs.
    """

    config: RunConfig
    backbone_dir: Path
    fingerprint: str
    lora: LoraSettings
    pooling: str
    labels: tuple[str, ...]
    cache_dir: Path | None


def _open_text_site(request: SiteRequest, runtime: SiteRuntime) -> SiteModel:
    from client.runtime import TextCaches, loaded_backbone

    config = request.config
    caches = runtime.caches_of(TEXT_CLASSIFICATION, TextCaches)
    backbone = loaded_backbone(
        caches,
        request.backbone_dir,
        request.fingerprint,
        request.lora,
        request.pooling,
        len(request.labels),
        config.seed,
        config.model.quantize,
    )
    return TextSite(
        config, backbone, request.fingerprint, request.labels, request.cache_dir, caches
    )


def _open_causal_lm_site(request: SiteRequest, runtime: SiteRuntime) -> SiteModel:
    from client.causal_lm_site import LmCaches, open_causal_lm_site

    return open_causal_lm_site(runtime.caches_of(CAUSAL_LM, LmCaches), request)


def _open_image_site(request: SiteRequest, runtime: SiteRuntime) -> SiteModel:
    from client.vision_site import ImageCaches, open_vision_site

    caches = runtime.caches_of(IMAGE_CLASSIFICATION, ImageCaches)
    return open_vision_site(caches, request)


#: Each task's site side: the site code trains with :mod:`client.finetune` and
#: DP-SGD, which ``common`` may not import, so it is looked up here by task.
SITE_OPENERS: Mapping[Task, Callable[[SiteRequest, SiteRuntime], SiteModel]] = (
    MappingProxyType(
        {
            TEXT_CLASSIFICATION: _open_text_site,
            CAUSAL_LM: _open_causal_lm_site,
            IMAGE_CLASSIFICATION: _open_image_site,
        }
    )
)


@dataclass
class SiteRuntime:
    """What one client process keeps between messages: each task's caches (the
    loaded model, encoded rows, features), made when the task's first site opens.

    The ClientApp owns one (:data:`client.client_app.SITE_RUNTIME`); a test builds
    its own or calls :meth:`clear`.
    """

    caches: dict[Task, Any] = field(default_factory=dict)

    def caches_of(self, task: Task, make: Callable[[], C]) -> C:
        """``task``'s caches in this process, ``make()`` on first use."""
        if task not in self.caches:
            self.caches[task] = make()
        return cast(C, self.caches[task])

    def clear(self) -> None:
        """Drop every cached model and row."""
        self.caches.clear()

    def open_site(self, request: SiteRequest) -> SiteModel:
        """The site's model for ``request.config.model.task``, loaded once per
        process and per backbone, LoRA shape, pooling and label count."""
        opener = SITE_OPENERS[task_named(request.config.model.task)]
        return opener(request, self)
