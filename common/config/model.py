"""The ``model.*`` keys: which backbone to fine-tune and how clients obtain it."""

from __future__ import annotations

from dataclasses import dataclass

from common.config.keys import at_least, one_of, satisfies, setting
from common.tasks.registry import TASKS as _REGISTERED

DISTRIBUTE_MODES = ("auto", "never")
POOLING_MODES = ("native", "mean", "cls", "max")
QUANTISATIONS = ("none", "8bit", "4bit")
#: What is fine-tuned: every task's name (:mod:`common.tasks.registry`).
TASKS = tuple(_REGISTERED)
_tasks = list(_REGISTERED.values())


@dataclass(frozen=True)
class ModelConfig:
    """Which backbone to fine-tune and how clients obtain it (``model.*``)."""

    name: str = setting(
        "model.name",
        "minilm",
        "`minilm` (packaged), a local model directory, or a hub id already in the "
        "local cache",
        check=satisfies(bool, "must not be empty; use 'minilm'"),
    )
    distribute: str = setting(
        "model.distribute",
        "auto",
        "`auto`: the coordinator sends the backbone once to a site that lacks it; "
        "`never`: such a site fails",
        check=satisfies(
            lambda mode: mode in DISTRIBUTE_MODES,
            f"must be one of {', '.join(DISTRIBUTE_MODES)}",
        ),
    )
    max_length: int = setting(
        "model.max-length",
        128,
        "token limit per text; longer texts are truncated",
        check=at_least(8, "must be at least 8"),
    )
    pooling: str = setting(
        "model.pooling",
        "native",
        "`native` pools as the backbone was trained (its sentence-transformers "
        "pooling config; the first token without one); or force `mean`, `cls` or "
        "`max`",
        check=one_of(POOLING_MODES),
    )
    quantize: str = setting(
        "model.quantize",
        "none",
        "`4bit` (QLoRA: NF4, double quantisation, bf16 compute on CUDA, float32 on a "
        "CPU) or `8bit`: clients load the frozen backbone's linear layers through "
        'the optional `bitsandbytes` package (`pip install -e ".[quantize]"`; '
        "version 0.50 or later on a CPU, the one tested); a site without it refuses "
        "the round with a message saying so. Every task: text encoders, causal LMs "
        "(GPT-2's `Conv1D` too) and image backbones with linear layers (ViT; "
        "ConvNeXt's linear half); a backbone of convolutions alone (ResNet) is "
        "refused, naming the key and the family. Adapters, deltas and the "
        "coordinator stay in full precision",
        check=one_of(QUANTISATIONS),
    )
    task: str = setting(
        "model.task",
        "text-cls",
        " or ".join(
            [
                ", ".join(f"`{t.name}` ({t.summary})" for t in _tasks[:-1]),
                f"`{_tasks[-1].name}` ({_tasks[-1].summary})",
            ]
        )
        + "; see README's \"Causal language models and image backbones\"",
        check=one_of(TASKS),
    )
