"""Client training throughput: fedgraft's client loop against the way common examples
train, side by side in one process, at equal training samples.

Both paths train the same model (the packaged MiniLM, mean pooling, LoRA r=8 on query
and value, a label-name head, AdamW at the same rates, batch 32) on the same CLINC150
rows for ``--rounds`` rounds of one epoch, starting each round from the adapter the
previous round ended with, as a client sampled every round would:

``fedgraft``
    What ``client/client_app.py`` does: the backbone is loaded once per process and
    kept; the rows are tokenised once (no padding) and batched in length buckets with
    dynamic padding (``client.finetune.finetune``).
``fedgraft-top-layers``
    The same with LoRA on the top ``--top-layers`` layers only (``lora.layers``): the
    frozen layers below run once per row, before the first round, and every step
    starts from their cached output
    (:mod:`common.tasks.text_classification.frozen_prefix`). A different model (fewer
    adapted layers), so its accuracy is reported beside its speed.
``baseline``
    What common examples do (a plain loop, as in Flower's and PEFT's text examples):
    every round reloads the backbone from disk and wraps it with LoRA again, tokenises
    the rows padded to ``max_length = 128``, and trains over shuffled fixed-size
    batches.

``samples_per_second`` is training samples over the wall time of the rounds (loading
and tokenising included, evaluation excluded). Both final models are evaluated with the
same code on the same test rows. The comparison object carries ``speedup`` (fedgraft's
samples per second over the baseline's) and both accuracies. The paths take turns
round by round (:func:`interleave`), so noise on the machine hits each alike. Both use
AdamW with weight decay 0.01 (torch's default). ``--seeds`` repeats the comparison
with other seeds (LoRA and head draws, batch order) and ends with a summary object:
mean speedup and the paired accuracy gap with its spread. Run from the repository
root::

    python benchmarks/client_throughput.py --quick
    python benchmarks/client_throughput.py --train-rows 1500 --rounds 1 --seeds 1,2,3
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import math
import os
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch.nn import functional as F

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from client.finetune import LocalTraining, finetune  # noqa: E402
from common.backbone import coordinator_backbone_dir, pooling_mode  # noqa: E402
from common.batching import encode  # noqa: E402
from common.config import LoraSettings  # noqa: E402
from common.data import encode_labels, label_set, load_examples  # noqa: E402
from common.tasks.text_classification.evaluation import evaluate  # noqa: E402
from common.tasks.text_classification.frozen_prefix import prefix_states  # noqa: E402
from common.tasks.text_classification.label_head import (  # noqa: E402
    init_head_from_texts,
    label_texts,
)
from common.tasks.text_classification.model import (  # noqa: E402
    TextClassifier,
    adapter_state,
    attach_lora,
    load_adapter_state,
    load_encoder,
)

CLINC = ROOT.parent / "shared" / "data" / "clinc150"
LORA = LoraSettings(r=8, alpha=16, dropout=0.05, target_modules=("query", "value"))
BATCH, LR, MAX_LENGTH, WEIGHT_DECAY = 32, 2e-3, 128, 0.01

log = logging.getLogger("benchmarks.client_throughput")


def spread_rows(rows: list[Any], count: int) -> list[Any]:
    """``count`` rows spread evenly over the file (every label represented)."""
    if count >= len(rows):
        return rows
    step = len(rows) / count
    return [rows[int(i * step)] for i in range(count)]


def build_model(
    backbone: Path,
    labels: tuple[str, ...],
    tokenizer: Any,
    seed: int,
    lora: LoraSettings = LORA,
) -> Any:
    """Backbone from disk, LoRA drawn from ``seed``, and the label-name head."""
    model = attach_lora(
        load_encoder(backbone), lora, pooling_mode(backbone), len(labels), seed
    )
    init_head_from_texts(
        model, tokenizer, label_texts(labels), MAX_LENGTH, tokenizer.pad_token_id
    )
    return model


#: One path's rounds: each ``next()`` trains one round and yields the model and the
#: samples it trained on.
Rounds = Iterator[tuple[TextClassifier, int]]


def fedgraft_rounds(
    backbone: Path,
    tokenizer: Any,
    labels: tuple[str, ...],
    texts: list[str],
    label_ids: list[int],
    rounds: int,
    seed: int,
    top_layers: int = 0,
) -> Rounds:
    """Load once, tokenise once, bucketed dynamic padding; with ``top_layers``, LoRA
    on those layers only and the frozen layers' output computed once."""
    lora = dataclasses.replace(LORA, layers=top_layers)
    model = build_model(backbone, labels, tokenizer, seed, lora)
    encoded = encode(tokenizer, texts, label_ids, MAX_LENGTH)
    prefix = (
        prefix_states(
            model.encoder, model.prefix_depth, encoded, tokenizer.pad_token_id
        )
        if model.prefix_depth
        else None
    )
    for server_round in range(rounds):
        state = adapter_state(model)  # what the global adapter would be
        load_adapter_state(model, state)
        plan = LocalTraining(1, 0, BATCH, LR, LR, WEIGHT_DECAY, seed + server_round)
        result = finetune(
            model,
            encoded,
            tokenizer.pad_token_id,
            plan,
            (lambda: prefix) if prefix is not None else None,
        )
        yield model, result.samples


def baseline_rounds(
    backbone: Path,
    tokenizer: Any,
    labels: tuple[str, ...],
    texts: list[str],
    label_ids: list[int],
    rounds: int,
    seed: int,
) -> Rounds:
    """Reload every round, pad to max_length, plain shuffled batches."""
    state = None
    for server_round in range(rounds):
        model = build_model(backbone, labels, tokenizer, seed)
        if state is not None:
            load_adapter_state(model, state)
        batch = tokenizer(
            texts,
            padding="max_length",
            truncation=True,
            max_length=MAX_LENGTH,
            return_tensors="pt",
        )
        targets = torch.tensor(label_ids)
        optimiser = torch.optim.AdamW(
            [p for p in model.parameters() if p.requires_grad],
            lr=LR,
            weight_decay=WEIGHT_DECAY,
        )
        generator = torch.Generator().manual_seed(seed + server_round)
        model.train()
        samples = 0
        for rows in torch.randperm(len(texts), generator=generator).split(BATCH):
            logits = model(batch["input_ids"][rows], batch["attention_mask"][rows])
            loss = F.cross_entropy(logits, targets[rows])
            optimiser.zero_grad(set_to_none=True)
            loss.backward()
            optimiser.step()
            samples += len(rows)
        model.eval()
        state = adapter_state(model)
        yield model, samples


def interleave(
    paths: dict[str, Rounds],
) -> dict[str, tuple[TextClassifier, float, int]]:
    """Advance every path one round at a time, in turn, so that whatever else loads
    the machine hits each path alike; return each path's final model, seconds (its
    own rounds only) and samples."""
    seconds = dict.fromkeys(paths, 0.0)
    samples = dict.fromkeys(paths, 0)
    models: dict[str, TextClassifier] = {}
    live = dict(paths)
    while live:
        for name, rounds in list(live.items()):
            started = time.perf_counter()
            try:
                models[name], trained = next(rounds)
            except StopIteration:
                del live[name]
                continue
            seconds[name] += time.perf_counter() - started
            samples[name] += trained
    return {name: (models[name], seconds[name], samples[name]) for name in paths}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="300 rows, 1 round")
    parser.add_argument("--train-rows", type=int, default=3000)
    parser.add_argument("--test-rows", type=int, default=1500)
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--threads", type=int, default=0, help="torch threads")
    parser.add_argument(
        "--seeds", default="42", help="comma list: one side-by-side run per seed"
    )
    parser.add_argument(
        "--top-layers", type=int, default=2, help="lora.layers of the third path"
    )
    args = parser.parse_args(argv)
    command = "python benchmarks/client_throughput.py " + " ".join(
        sys.argv[1:] if argv is None else argv
    )
    logging.basicConfig(level=logging.WARNING, stream=sys.stderr)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.quick:
        args.train_rows, args.test_rows, args.rounds = 300, 300, 1
    from transformers import AutoTokenizer

    backbone = coordinator_backbone_dir("minilm")
    tokenizer = AutoTokenizer.from_pretrained(str(backbone))
    train = spread_rows(load_examples(CLINC / "train.jsonl"), args.train_rows)
    test = spread_rows(load_examples(CLINC / "test.jsonl"), args.test_rows)
    labels = label_set(load_examples(CLINC / "train.jsonl"))
    train_ids, test_ids = encode_labels(train, labels), encode_labels(test, labels)
    test_encoded = encode(tokenizer, [e.text for e in test], test_ids, MAX_LENGTH)
    texts = [e.text for e in train]
    lengths = [len(ids) for ids in encode(tokenizer, texts, train_ids, MAX_LENGTH).ids]
    data = (backbone, tokenizer, labels, texts, train_ids, args.rounds)
    comparisons = []
    for seed in [int(s) for s in args.seeds.split(",") if s.strip()]:
        torch.manual_seed(seed)
        trained = interleave(
            {
                "baseline": baseline_rounds(*data, seed),
                "fedgraft": fedgraft_rounds(*data, seed),
                "fedgraft-top-layers": fedgraft_rounds(
                    *data, seed, top_layers=args.top_layers
                ),
            }
        )
        results: dict[str, dict[str, Any]] = {}
        for path, (model, seconds, samples) in trained.items():
            accuracy = evaluate(model, test_encoded, tokenizer.pad_token_id).accuracy
            results[path] = {
                "benchmark": "client_throughput",
                "path": path,
                "seed": seed,
                "samples": samples,
                "seconds": round(seconds, 2),
                "samples_per_second": round(samples / seconds, 2),
                "accuracy": accuracy,
                "train_rows": len(texts),
                "test_rows": len(test),
                "rounds": args.rounds,
                "mean_tokens_per_row": round(float(np.mean(lengths)), 1),
                "torch_threads": torch.get_num_threads(),
                "lora_layers": args.top_layers if path == "fedgraft-top-layers" else 0,
                "command": command,
            }
            print(json.dumps(results[path]), flush=True)
        comparison = {
            "benchmark": "client_throughput",
            "comparison": True,
            "seed": seed,
            "speedup": speedup(results, "fedgraft"),
            "accuracy_fedgraft": results["fedgraft"]["accuracy"],
            "accuracy_baseline": results["baseline"]["accuracy"],
            "speedup_top_layers": speedup(results, "fedgraft-top-layers"),
            "accuracy_top_layers": results["fedgraft-top-layers"]["accuracy"],
            "command": command,
        }
        comparisons.append(comparison)
        print(json.dumps(comparison), flush=True)
    if len(comparisons) > 1:
        print(json.dumps(across_seeds(comparisons, len(test), command)), flush=True)
    return 0


def speedup(results: dict[str, dict[str, Any]], path: str) -> float:
    """``path``'s samples per second over the baseline's."""
    return round(
        results[path]["samples_per_second"] / results["baseline"]["samples_per_second"],
        2,
    )


def across_seeds(
    comparisons: list[dict[str, Any]], test_rows: int, command: str
) -> dict[str, Any]:
    """Mean and spread of the per-seed comparisons, and the paired accuracy gap
    (fedgraft minus baseline) with its standard error over the seeds, beside one
    binomial standard error of either accuracy on the test rows."""
    gaps = [c["accuracy_fedgraft"] - c["accuracy_baseline"] for c in comparisons]
    accuracy = float(np.mean([c["accuracy_baseline"] for c in comparisons]))
    return {
        "benchmark": "client_throughput",
        "summary": True,
        "seeds": [c["seed"] for c in comparisons],
        "speedup_mean": round(float(np.mean([c["speedup"] for c in comparisons])), 2),
        "speedup_min": min(c["speedup"] for c in comparisons),
        "speedup_top_layers_mean": round(
            float(np.mean([c["speedup_top_layers"] for c in comparisons])), 2
        ),
        "accuracy_fedgraft_mean": round(
            float(np.mean([c["accuracy_fedgraft"] for c in comparisons])), 4
        ),
        "accuracy_baseline_mean": round(accuracy, 4),
        "accuracy_gap_mean": round(float(np.mean(gaps)), 4),
        "accuracy_gap_std": round(float(np.std(gaps, ddof=1)), 4),
        "accuracy_gap_standard_error": round(
            float(np.std(gaps, ddof=1)) / math.sqrt(len(gaps)), 4
        ),
        "binomial_standard_error": round(
            math.sqrt(accuracy * (1 - accuracy) / test_rows), 4
        ),
        "command": command,
    }


if __name__ == "__main__":
    sys.exit(main())
