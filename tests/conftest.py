"""Shared fixtures: tiny backbones built offline from a config (BERT for text
classification; Llama, GPT-2, ViT and ResNet for the causal-LM and image tasks) and
small data."""

from __future__ import annotations

import importlib.util
import json
import os
import re
import sys
from collections.abc import Sequence
from pathlib import Path

import pytest

from simulations.inprocess_grid import InProcessGrid
from simulations.task_demo import (
    build_causal_lm,
    build_vision_backbone,
    domain_sentences,
    write_image_folder,
)

__all__ = [
    "InProcessGrid",
    "build_tiny_backbone",
    "flower_env",
    "shared_data",
    "write_jsonl",
]

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

REPO_ROOT = Path(__file__).resolve().parent.parent


def pytest_configure(config: pytest.Config) -> None:
    """Keep the library warnings fedgraft's console keeps quiet
    (``common.console.QUIET_WARNINGS``, each named there with its reason) out of
    pytest's warnings summary too: README's test command prints no warning."""
    from common.console import QUIET_WARNINGS

    for category, prefix in QUIET_WARNINGS:
        # pytest splits a filter at ':'; '.' matches it in the message pattern.
        message = re.escape(prefix).replace(":", ".")
        config.addinivalue_line(
            "filterwarnings", f"ignore:{message}:{category.__name__}"
        )
SHARED_DATA = REPO_ROOT.parent / "shared" / "data"

_WORDS = [
    "send",
    "money",
    "to",
    "transfer",
    "a",
    "payment",
    "wire",
    "funds",
    "how",
    "much",
    "is",
    "in",
    "show",
    "the",
    "balance",
    "of",
    "book",
    "flight",
    "reserve",
    "hotel",
    "room",
    "lost",
    "luggage",
    "recipe",
    "cook",
    "bake",
    "calories",
    "protein",
    "lights",
    "on",
    "lamps",
    "thermostat",
    "heating",
    "lock",
    "doors",
    "please",
    "can",
    "you",
    "i",
    "need",
    "could",
    "my",
    "savings",
    "account",
    "trip",
    "kitchen",
    "home",
    "today",
    "now",
    "thanks",
    "good",
    "bad",
    "great",
    "awful",
    "movie",
    "film",
    "food",
    "service",
    "phone",
    "battery",
    "love",
    "hate",
    "it",
    "was",
    "very",
    "not",
]


def build_tiny_backbone(
    directory: Path,
    mean_pooling: bool = True,
    seed: int = 0,
    words: Sequence[str] = _WORDS,
) -> Path:
    """Save a 2-layer, 32-wide BERT with a word-level vocabulary (``words``) into
    ``directory``.

    With ``mean_pooling`` it also carries sentence-transformers' pooling config, like
    the packaged MiniLM.
    """
    import torch
    from transformers import BertConfig, BertModel, BertTokenizerFast

    directory.mkdir(parents=True, exist_ok=True)
    vocab = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", *sorted(set(words))]
    # transformers 5 keeps only the special tokens of a vocab_file: pass the map.
    tokenizer = BertTokenizerFast(
        vocab={word: index for index, word in enumerate(vocab)}, do_lower_case=True
    )
    tokenizer.save_pretrained(str(directory))
    config = BertConfig(
        vocab_size=len(vocab),
        hidden_size=32,
        num_hidden_layers=2,
        num_attention_heads=2,
        intermediate_size=64,
        max_position_embeddings=64,
    )
    torch.manual_seed(seed)
    BertModel(config).save_pretrained(str(directory))
    if mean_pooling:
        (directory / "modules.json").write_text(
            json.dumps(
                [
                    {
                        "idx": 0,
                        "name": "0",
                        "path": "",
                        "type": "sentence_transformers.models.Transformer",
                    },
                    {
                        "idx": 1,
                        "name": "1",
                        "path": "1_Pooling",
                        "type": "sentence_transformers.models.Pooling",
                    },
                ]
            )
        )
        (directory / "1_Pooling").mkdir(exist_ok=True)
        (directory / "1_Pooling" / "config.json").write_text(
            json.dumps(
                {
                    "word_embedding_dimension": 32,
                    "pooling_mode_mean_tokens": True,
                    "pooling_mode_cls_token": False,
                }
            )
        )
    return directory


@pytest.fixture(scope="session")
def tiny_backbone(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tiny mean-pooling BERT directory, built once per test session."""
    return build_tiny_backbone(tmp_path_factory.mktemp("tiny-backbone"))


@pytest.fixture()
def client_cache(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """An empty per-test client cache folder (``FEDGRAFT_CACHE_DIR``)."""
    cache = tmp_path / "client-cache"
    monkeypatch.setenv("FEDGRAFT_CACHE_DIR", str(cache))
    return cache


def flower_env(home: Path, connections: str) -> dict[str, str]:
    """Environment for Flower processes with a private ``FLWR_HOME``.

    ``connections`` is the text of ``$FLWR_HOME/config.toml`` (the ``[superlink]``
    tables); the venv's bin comes first on PATH, as ``flwr`` starts its tools by name.
    """
    home.mkdir(parents=True, exist_ok=True)
    (home / "config.toml").write_text(connections)
    bin_dir = Path(sys.executable).parent
    return {
        **os.environ,
        "FLWR_HOME": str(home),
        "FLWR_DISABLE_UPDATE_CHECK": "1",
        "FLWR_TELEMETRY_ENABLED": "0",
        "FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION": "1",
        "HF_HUB_OFFLINE": "1",
        "PATH": f"{bin_dir}{os.pathsep}{os.environ.get('PATH', '')}",
        "PYTHONPATH": str(REPO_ROOT),
    }


def hide_package(monkeypatch: pytest.MonkeyPatch, package: str) -> None:
    """Make ``importlib.util.find_spec`` report ``package`` as not installed."""
    real_find_spec = importlib.util.find_spec
    monkeypatch.setattr(
        importlib.util,
        "find_spec",
        lambda name, *a: None if name == package else real_find_spec(name, *a),
    )


def write_jsonl(path: Path, rows: list[dict[str, object]]) -> Path:
    """Write ``rows`` as JSON lines and return ``path``."""
    path.write_text("".join(json.dumps(row) + "\n" for row in rows))
    return path


@pytest.fixture()
def small_jsonl(tmp_path: Path) -> Path:
    """Twelve rows in two domains with two labels each."""
    rows = []
    for domain, labels in (
        ("bank", ("send", "balance")),
        ("travel", ("flight", "hotel")),
    ):
        for label in labels:
            for index in range(3):
                rows.append(
                    {
                        "text": f"please {label} number {index} my account",
                        "label": label,
                        "domain": domain,
                    }
                )
    return write_jsonl(tmp_path / "small.jsonl", rows)


def shared_data(*parts: str) -> Path:
    """A path in ../shared/data; skips the test when the folder is absent."""
    path = SHARED_DATA.joinpath(*parts)
    if not path.exists():
        pytest.skip(f"{path} is not available on this machine")
    return path


# -- the causal-LM and image-classification tasks ----------------------------------
# Built once per session: the same seeded bytes in every test file (a backbone's
# fingerprint is its weights' digest, so sharing the folder changes nothing else).


def _lm_corpus(factory: pytest.TempPathFactory, name: str, per_domain: int) -> Path:
    """``per_domain`` seeded sentences of each of the four domains, as JSON lines."""
    folder = factory.mktemp(name)
    return write_jsonl(folder / "corpus.jsonl", domain_sentences(0, per_domain))


def _tiny_causal_lms(
    factory: pytest.TempPathFactory, name: str, per_domain: int, *extra: str
) -> dict[str, Path]:
    """A tiny Llama and a tiny GPT-2 whose word-level tokenizer is trained on the
    sentences of :func:`_lm_corpus` and on ``extra``."""
    folder = factory.mktemp(name)
    texts = [row["text"] for row in domain_sentences(0, per_domain)] + list(extra)
    return {
        kind: build_causal_lm(folder / kind, texts, kind) for kind in ("llama", "gpt2")
    }


@pytest.fixture(scope="session")
def lm_corpus(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """120 sentences in four domains, each with its own vocabulary."""
    return _lm_corpus(tmp_path_factory, "lm-corpus", 30)


@pytest.fixture(scope="session")
def causal_lms(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """Two-block Llama and GPT-2 that know :func:`lm_corpus`'s words and the
    instruction prompts' ``complete :``."""
    return _tiny_causal_lms(tmp_path_factory, "tiny-causal-lms", 30, "complete :")


@pytest.fixture(scope="session")
def small_lm_corpus(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """40 sentences in four domains."""
    return _lm_corpus(tmp_path_factory, "small-lm-corpus", 10)


@pytest.fixture(scope="session")
def small_causal_lms(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """Two-block Llama and GPT-2 that know :func:`small_lm_corpus`'s words."""
    return _tiny_causal_lms(tmp_path_factory, "small-causal-lms", 10)


@pytest.fixture(scope="session")
def vision_backbones(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """A two-layer ViT and a two-stage ResNet, with 32-pixel image processors."""
    folder = tmp_path_factory.mktemp("tiny-vision")
    return {
        kind: build_vision_backbone(folder / kind, kind) for kind in ("vit", "resnet")
    }


@pytest.fixture(scope="session")
def images(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """18 images of each of three colours, in one sub-folder per class."""
    return write_image_folder(tmp_path_factory.mktemp("images") / "images", 18)


@pytest.fixture(scope="session")
def few_images(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Eight images of each of three colours, in one sub-folder per class."""
    return write_image_folder(tmp_path_factory.mktemp("few-images") / "images", 8)
