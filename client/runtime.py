"""The text classifier at a site: what a client process keeps between messages
(:class:`TextCaches`: the loaded backbone with its LoRA wrapper, tokenised rows,
pooled features and frozen-layer outputs), in memory and, for tokens and prefixes,
on the site's disk for deployments, where every message starts a fresh process.

The backbone is loaded once per process and per fingerprint. Each message then
overwrites every trainable tensor with the global adapter it received and builds a new
optimiser, so virtual clients sharing a worker never see each other's state.
"""

from __future__ import annotations

import hashlib
import logging
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from transformers import AutoTokenizer, PreTrainedTokenizerBase

from client.caches import BoundedCache
from common.batching import Encoded, encode
from common.config import LoraSettings
from common.data import Example, encode_labels
from common.feature_cache import FeatureCache
from common.tasks.text_classification.features import pooled_features
from common.tasks.text_classification.frozen_prefix import PrefixStates, prefix_states
from common.tasks.text_classification.model import (
    TextClassifier,
    attach_lora,
    load_encoder,
)

log = logging.getLogger(__name__)


def pick_device() -> torch.device:
    """CUDA when present, otherwise the CPU."""
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


@dataclass
class LoadedBackbone:
    """A classifier on one backbone, reused across the messages of a process."""

    model: TextClassifier
    tokenizer: PreTrainedTokenizerBase
    pad_id: int
    quantize: str = "none"


@dataclass
class TextCaches:
    """The text classifier's caches in one client process.

    Attributes
    ----------
    models : BoundedCache
        The latest classifier only, by backbone fingerprint, LoRA shape, pooling,
        label count and precision.
    rows : BoundedCache
        Tokenised rows by :func:`rows_key`, bounded across many virtual clients.
    features : FeatureCache
        Pooled features while only the head trains.
    prefixes : BoundedCache
        The frozen layers' output (``lora.layers``).
    """

    models: BoundedCache[tuple[str, LoraSettings, str, int, str], LoadedBackbone] = (
        field(default_factory=lambda: BoundedCache(1))
    )
    rows: BoundedCache[str, Encoded] = field(default_factory=lambda: BoundedCache(32))
    features: FeatureCache = field(default_factory=lambda: FeatureCache(capacity=32))
    prefixes: BoundedCache[str, PrefixStates] = field(
        default_factory=lambda: BoundedCache(8)
    )


def loaded_backbone(
    caches: TextCaches,
    backbone_dir: Path,
    fingerprint: str,
    lora: LoraSettings,
    pooling: str,
    num_labels: int,
    seed: int,
    quantize: str = "none",
) -> LoadedBackbone:
    """The process's classifier for this backbone and LoRA shape, loading it once.

    Loading from a fingerprint-keyed cache means a changed backbone is never served from
    a stale copy. Only the latest model is kept, to bound memory. ``quantize``
    (``model.quantize``) loads the frozen weights in 4 or 8 bits.
    """

    def load() -> LoadedBackbone:
        device = pick_device()
        encoder = load_encoder(backbone_dir, device, quantize)
        model = attach_lora(encoder, lora, pooling, num_labels, seed)
        tokenizer = AutoTokenizer.from_pretrained(str(backbone_dir))
        pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
        log.info("loaded backbone %s on %s", fingerprint[:12], device)
        return LoadedBackbone(model, tokenizer, pad_id, quantize)

    return caches.models.get((fingerprint, lora, pooling, num_labels, quantize), load)


def rows_key(
    examples: list[Example], labels: tuple[str, ...], fingerprint: str, max_length: int
) -> str:
    """A digest of the rows, label map, backbone and token limit: what the tokenised
    rows depend on."""
    digest = hashlib.sha256(f"{fingerprint}|{max_length}|{'|'.join(labels)}".encode())
    for example in examples:
        digest.update(example.text.encode() + b"\0" + example.label.encode() + b"\n")
    return digest.hexdigest()


def encoded_examples(
    caches: TextCaches,
    examples: list[Example],
    labels: tuple[str, ...],
    backbone: LoadedBackbone,
    fingerprint: str,
    max_length: int,
    cache_dir: Path | None,
) -> Encoded:
    """Tokenise the client's rows once: from memory, from the site's disk, or afresh.

    Raises
    ------
    common.data.DataError
        When a label is outside the run's label map, naming the file and line.
    """
    key = rows_key(examples, labels, fingerprint, max_length)
    stored = cache_dir / "tokens" / f"{key}.npz" if cache_dir is not None else None
    return caches.rows.get(
        key, lambda: _tokenised(examples, labels, backbone, max_length, stored)
    )


def _tokenised(
    examples: list[Example],
    labels: tuple[str, ...],
    backbone: LoadedBackbone,
    max_length: int,
    stored: Path | None,
) -> Encoded:
    """The rows tokenised: from the site's disk (``stored``), or afresh (and then
    stored there)."""
    if stored is not None and stored.exists():
        with np.load(stored) as arrays:
            bounds = np.cumsum(arrays["lengths"])[:-1]
            ids = [part.tolist() for part in np.split(arrays["ids"], bounds)]
            return Encoded(ids=ids, labels=arrays["labels"])
    label_ids = encode_labels(examples, labels)
    encoded = encode(
        backbone.tokenizer, [e.text for e in examples], label_ids, max_length
    )
    if stored is not None:
        stored.parent.mkdir(parents=True, exist_ok=True)
        staging = stored.with_name(stored.stem + ".tmp.npz")
        np.savez(
            staging,
            ids=np.concatenate([np.asarray(i, np.int32) for i in encoded.ids]),
            lengths=np.asarray([len(i) for i in encoded.ids], np.int64),
            labels=encoded.labels,
        )
        staging.replace(stored)
    return encoded


def cached_features(
    caches: TextCaches,
    backbone: LoadedBackbone,
    encoded: Encoded,
    key: str,
    digest: str,
) -> torch.Tensor:
    """Pooled features of the client's rows under adapters with ``digest``, computed
    once per process while only the head trains."""
    return caches.features.get(
        f"{key}|{backbone.model.pooling}|{backbone.quantize}",
        digest,
        lambda: pooled_features(backbone.model, encoded, backbone.pad_id),
    )


def cached_prefix(
    caches: TextCaches,
    backbone: LoadedBackbone,
    encoded: Encoded,
    key: str,
    cache_dir: Path | None,
) -> PrefixStates:
    """The output of the frozen layers for the client's rows (``lora.layers``),
    computed once: from memory, from the site's disk, or afresh.

    Those layers carry no adapter, so their output depends only on the backbone, its
    precision (``model.quantize``) and the tokens (``key``, from ``rows_key``), never
    on the round.
    """
    key = f"{key}|prefix-{backbone.model.prefix_depth}|{backbone.quantize}"
    name = hashlib.sha256(key.encode()).hexdigest()
    stored = cache_dir / "prefix" / f"{name}.npz" if cache_dir is not None else None
    return caches.prefixes.get(key, lambda: _prefix(backbone, encoded, stored))


def _prefix(
    backbone: LoadedBackbone, encoded: Encoded, stored: Path | None
) -> PrefixStates:
    """The frozen layers' output: from the site's disk (``stored``), or afresh (and
    then stored there)."""
    depth = backbone.model.prefix_depth
    device = next(backbone.model.parameters()).device
    if stored is not None and stored.exists():
        with np.load(stored) as arrays:
            bounds = np.cumsum(arrays["lengths"])[:-1]
            return PrefixStates(
                [
                    torch.from_numpy(part).to(device)
                    for part in np.split(arrays["states"], bounds)
                ]
            )
    states = prefix_states(backbone.model.encoder, depth, encoded, backbone.pad_id)
    if stored is not None:
        stored.parent.mkdir(parents=True, exist_ok=True)
        staging = stored.with_name(stored.stem + ".tmp.npz")
        np.savez(
            staging,
            states=torch.cat(states.states).cpu().numpy(),  # (tokens, hidden)
            lengths=np.asarray([len(s) for s in states.states], np.int64),
        )
        staging.replace(stored)
    return states
