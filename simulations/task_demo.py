"""Offline assets for the causal-LM and image-classification tasks: tiny backbones
built from a config (no hub access) and small seeded data sets.

``fedgraft make-task-demo DIR`` writes everything the ready configs
``simulations/configs/causal-lm-demo.toml`` and ``image-cls-demo.toml`` read (they
expect ``DIR = runs/task-demo``); the tests and ``benchmarks/tasks.py`` build the same
assets in their own folders.

- a domain corpus (``lm-corpus.jsonl``: ``text`` and ``domain``, four domains with
  their own vocabulary and sentence shapes) and instruction rows
  (``lm-instructions.jsonl``: ``prompt``, ``response``, ``domain``);
- a causal LM (``tiny-llama`` or ``tiny-gpt2``) with a word-level tokenizer trained on
  that corpus (pad, unknown, begin and end tokens);
- an image folder (``images/<colour>/*.png``): a coloured square on a noisy
  background per class, at a random place;
- an image backbone (``tiny-vit`` or ``tiny-resnet``) with its image processor.

The backbones are randomly initialised: they show the federated mechanics (loss and
perplexity fall, accuracy rises) in seconds, not a pre-trained model's quality.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np

#: domain -> (subjects, verbs, objects, endings): each domain's own vocabulary.
LM_DOMAINS: dict[str, tuple[list[str], list[str], list[str], list[str]]] = {
    "banking": (
        ["the bank", "my account", "the teller", "a customer"],
        ["sends", "moves", "holds", "checks"],
        ["money", "funds", "the balance", "a payment"],
        ["today", "every month", "on friday", "at noon"],
    ),
    "travel": (
        ["the pilot", "our flight", "the hotel", "a traveller"],
        ["books", "boards", "reserves", "leaves"],
        ["a seat", "the plane", "a room", "the gate"],
        ["at dawn", "for paris", "in june", "on time"],
    ),
    "kitchen": (
        ["the chef", "my oven", "the recipe", "a cook"],
        ["bakes", "stirs", "roasts", "serves"],
        ["bread", "the soup", "garlic", "a cake"],
        ["slowly", "with butter", "for dinner", "until golden"],
    ),
    "home": (
        ["the lamp", "my thermostat", "the door", "a sensor"],
        ["dims", "locks", "heats", "opens"],
        ["the hall", "the lights", "the garage", "a window"],
        ["at night", "by itself", "after ten", "quietly"],
    ),
}
#: class -> RGB colour of its square.
IMAGE_CLASSES: dict[str, tuple[int, int, int]] = {
    "red": (220, 30, 30),
    "green": (30, 190, 40),
    "blue": (40, 60, 220),
}
SPECIAL_TOKENS = ("<pad>", "<unk>", "<s>", "</s>")


def domain_sentences(seed: int, per_domain: int) -> list[dict[str, str]]:
    """``per_domain`` seeded sentences of each domain: ``{"text", "domain"}``."""
    rng = np.random.default_rng(seed)
    rows = []
    for domain, parts in LM_DOMAINS.items():
        for _ in range(per_domain):
            words = [part[int(rng.integers(len(part)))] for part in parts]
            rows.append({"text": " ".join(words), "domain": domain})
    return rows


def instruction_rows(seed: int, per_domain: int) -> list[dict[str, str]]:
    """Seeded prompt/response rows: the prompt names a subject, the response
    completes its sentence in the subject's domain."""
    rows = []
    for row in domain_sentences(seed, per_domain):
        words = row["text"].split()
        cut = 2  # every subject is two words
        rows.append(
            {
                "prompt": "complete : " + " ".join(words[:cut]),
                "response": " ".join(words[cut:]),
                "domain": row["domain"],
            }
        )
    return rows


def write_jsonl(path: Path, rows: list[dict[str, str]]) -> Path:
    """Write ``rows`` as JSON lines."""
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(row) + "\n" for row in rows))
    return path


def build_word_tokenizer(directory: Path, texts: list[str]) -> object:
    """Train a word-level tokenizer on ``texts`` and save it as a fast tokenizer
    with ``<pad>``, ``<unk>``, ``<s>`` (begin) and ``</s>`` (end)."""
    from tokenizers import Tokenizer, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    core = Tokenizer(models.WordLevel(unk_token="<unk>"))
    core.pre_tokenizer = pre_tokenizers.Whitespace()
    core.train_from_iterator(
        texts, trainers.WordLevelTrainer(special_tokens=list(SPECIAL_TOKENS))
    )
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=core,
        pad_token="<pad>",
        unk_token="<unk>",
        bos_token="<s>",
        eos_token="</s>",
    )
    directory.mkdir(parents=True, exist_ok=True)
    tokenizer.save_pretrained(str(directory))
    return tokenizer


def build_causal_lm(
    directory: Path,
    texts: list[str],
    kind: str = "llama",
    seed: int = 0,
    width: int = 32,
    layers: int = 2,
) -> Path:
    """A ``layers``-layer, ``width``-wide causal LM (``llama`` or ``gpt2``; 2 and 32
    by default) with a word-level tokenizer trained on ``texts``, saved into
    ``directory``."""
    import torch
    from transformers import GPT2Config, GPT2LMHeadModel, LlamaConfig, LlamaForCausalLM

    tokenizer = build_word_tokenizer(directory, texts)
    special = {
        "vocab_size": len(tokenizer),  # type: ignore[arg-type]
        "pad_token_id": tokenizer.pad_token_id,  # type: ignore[attr-defined]
        "bos_token_id": tokenizer.bos_token_id,  # type: ignore[attr-defined]
        "eos_token_id": tokenizer.eos_token_id,  # type: ignore[attr-defined]
    }
    torch.manual_seed(seed)
    if kind == "llama":
        model: torch.nn.Module = LlamaForCausalLM(
            LlamaConfig(
                hidden_size=width,
                intermediate_size=2 * width,
                num_hidden_layers=layers,
                num_attention_heads=2,
                num_key_value_heads=2,
                max_position_embeddings=128,
                tie_word_embeddings=False,
                # Wide enough weights that a 32-wide model can make confident
                # predictions (the default 0.02 caps its logits near zero).
                initializer_range=0.3,
                **special,
            )
        )
    elif kind == "gpt2":
        model = GPT2LMHeadModel(
            GPT2Config(
                n_embd=width,
                n_layer=layers,
                n_head=2,
                n_positions=128,
                initializer_range=0.3,
                **special,
            )
        )
    else:
        raise ValueError(f"unknown tiny causal LM {kind!r}; use llama or gpt2")
    model.save_pretrained(str(directory))  # type: ignore[operator]
    return directory


def write_image_folder(
    directory: Path, per_class: int, seed: int = 0, size: int = 32
) -> Path:
    """``directory/<class>/<n>.png``: a coloured square (a third of the side) at a
    random place on a noisy grey background, per class of :data:`IMAGE_CLASSES`."""
    from PIL import Image

    rng = np.random.default_rng(seed)
    side = size // 3
    for name, colour in IMAGE_CLASSES.items():
        folder = directory / name
        folder.mkdir(parents=True, exist_ok=True)
        for index in range(per_class):
            pixels = rng.integers(90, 160, (size, size, 3)).astype(np.uint8)
            top, left = rng.integers(0, size - side, 2)
            pixels[top : top + side, left : left + side] = colour
            Image.fromarray(pixels).save(folder / f"{index}.png")
    return directory


def build_vision_backbone(
    directory: Path,
    kind: str = "vit",
    size: int = 32,
    seed: int = 0,
    width: int = 32,
    layers: int = 2,
) -> Path:
    """A tiny image backbone (``vit``: ``layers`` layers, ``width`` wide, 8-pixel
    patches; ``resnet``: two basic stages) with a ``size``-pixel image
    processor."""
    import torch
    from transformers import ResNetConfig, ResNetModel, ViTConfig, ViTModel

    try:  # transformers 5: the PIL processor (the default one needs torchvision)
        from transformers import ViTImageProcessorPil as Processor
    except ImportError:  # transformers 4
        from transformers import ViTImageProcessor as Processor

    directory.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(seed)
    if kind == "vit":
        model: torch.nn.Module = ViTModel(
            ViTConfig(
                image_size=size,
                patch_size=8,
                hidden_size=width,
                num_hidden_layers=layers,
                num_attention_heads=2,
                intermediate_size=2 * width,
            )
        )
    elif kind == "resnet":
        model = ResNetModel(
            ResNetConfig(
                embedding_size=8,
                hidden_sizes=[8, 16],
                depths=[1, 1],
                layer_type="basic",
            )
        )
    else:
        raise ValueError(f"unknown tiny image backbone {kind!r}; use vit or resnet")
    model.save_pretrained(str(directory))  # type: ignore[operator]
    Processor(size={"height": size, "width": size}).save_pretrained(str(directory))
    return directory


def write_task_demo(directory: Path, seed: int = 0) -> dict[str, Path]:
    """Every asset of the ready task configs, under ``directory``.

    Returns
    -------
    dict[str, Path]
        ``corpus``, ``instructions``, ``causal_lm``, ``gpt2``, ``images``, ``vit``
        and ``resnet``.
    """
    corpus = write_jsonl(directory / "lm-corpus.jsonl", domain_sentences(seed, 60))
    instructions = write_jsonl(
        directory / "lm-instructions.jsonl", instruction_rows(seed + 1, 60)
    )
    texts = [row["text"] for row in domain_sentences(seed, 60)]
    texts += ["complete :"]
    return {
        "corpus": corpus,
        "instructions": instructions,
        "causal_lm": build_causal_lm(directory / "tiny-llama", texts, "llama", seed),
        "gpt2": build_causal_lm(directory / "tiny-gpt2", texts, "gpt2", seed),
        "images": write_image_folder(directory / "images", 24, seed),
        "vit": build_vision_backbone(directory / "tiny-vit", "vit", seed=seed),
        "resnet": build_vision_backbone(directory / "tiny-resnet", "resnet", seed=seed),
    }
