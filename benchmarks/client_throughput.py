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
    starts from their cached output (``common.frozen_prefix``). A different model
    (fewer adapted layers), so its accuracy is reported beside its speed.
``baseline``
    What common examples do (a plain loop, as in Flower's and PEFT's text examples):
    every round reloads the backbone from disk and wraps it with LoRA again, tokenises
    the rows padded to ``max_length = 128``, and trains over shuffled fixed-size
    batches.

``samples_per_second`` is training samples over the wall time of the rounds (loading
and tokenising included, evaluation excluded). Both final models are evaluated with the
same code on the same test rows. The comparison object carries ``speedup`` (fedgraft's
samples per second over the baseline's) and both accuracies. Paths take turns, so
noise on the machine hits both. Run from the repository root::

    python benchmarks/client_throughput.py --quick
    python benchmarks/client_throughput.py --train-rows 3000 --rounds 2
"""

from __future__ import annotations

import argparse
import dataclasses
import functools
import json
import logging
import os
import sys
import time
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
from common.evaluation import evaluate  # noqa: E402
from common.frozen_prefix import prefix_states  # noqa: E402
from common.label_head import init_head_from_texts, label_texts  # noqa: E402
from common.model import (  # noqa: E402
    TextClassifier,
    adapter_state,
    attach_lora,
    load_adapter_state,
    load_encoder,
)

CLINC = ROOT.parent / "shared" / "data" / "clinc150"
LORA = LoraSettings(r=8, alpha=16, dropout=0.05, target_modules=("query", "value"))
BATCH, LR, MAX_LENGTH, SEED = 32, 2e-3, 128, 42

log = logging.getLogger("benchmarks.client_throughput")


def spread_rows(rows: list[Any], count: int) -> list[Any]:
    """``count`` rows spread evenly over the file (every label represented)."""
    if count >= len(rows):
        return rows
    step = len(rows) / count
    return [rows[int(i * step)] for i in range(count)]


def build_model(
    backbone: Path, labels: tuple[str, ...], tokenizer: Any, lora: LoraSettings = LORA
) -> Any:
    """Backbone from disk, LoRA, and the label-name head."""
    model = attach_lora(
        load_encoder(backbone), lora, pooling_mode(backbone), len(labels), SEED
    )
    init_head_from_texts(
        model, tokenizer, label_texts(labels), MAX_LENGTH, tokenizer.pad_token_id
    )
    return model


def fedgraft_rounds(
    backbone: Path,
    tokenizer: Any,
    labels: tuple[str, ...],
    texts: list[str],
    label_ids: list[int],
    rounds: int,
    top_layers: int = 0,
) -> tuple[TextClassifier, float, int]:
    """Load once, tokenise once, bucketed dynamic padding; with ``top_layers``, LoRA
    on those layers only and the frozen layers' output computed once."""
    started = time.perf_counter()
    lora = dataclasses.replace(LORA, layers=top_layers)
    model = build_model(backbone, labels, tokenizer, lora)
    encoded = encode(tokenizer, texts, label_ids, MAX_LENGTH)
    prefix = (
        prefix_states(
            model.encoder, model.prefix_depth, encoded, tokenizer.pad_token_id
        )
        if model.prefix_depth
        else None
    )
    samples = 0
    for server_round in range(rounds):
        state = adapter_state(model)  # what the global adapter would be
        load_adapter_state(model, state)
        plan = LocalTraining(1, 0, BATCH, LR, LR, 0.0, SEED + server_round)
        samples += finetune(
            model,
            encoded,
            tokenizer.pad_token_id,
            plan,
            (lambda: prefix) if prefix is not None else None,
        ).samples
    return model, time.perf_counter() - started, samples


def baseline_rounds(
    backbone: Path,
    tokenizer: Any,
    labels: tuple[str, ...],
    texts: list[str],
    label_ids: list[int],
    rounds: int,
) -> tuple[TextClassifier, float, int]:
    """Reload every round, pad to max_length, plain shuffled batches."""
    started = time.perf_counter()
    state = None
    samples = 0
    for server_round in range(rounds):
        model = build_model(backbone, labels, tokenizer)
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
            [p for p in model.parameters() if p.requires_grad], lr=LR
        )
        generator = torch.Generator().manual_seed(SEED + server_round)
        model.train()
        for rows in torch.randperm(len(texts), generator=generator).split(BATCH):
            logits = model(batch["input_ids"][rows], batch["attention_mask"][rows])
            loss = F.cross_entropy(logits, targets[rows])
            optimiser.zero_grad(set_to_none=True)
            loss.backward()
            optimiser.step()
            samples += len(rows)
        model.eval()
        state = adapter_state(model)
    return model, time.perf_counter() - started, samples


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="300 rows, 1 round")
    parser.add_argument("--train-rows", type=int, default=3000)
    parser.add_argument("--test-rows", type=int, default=1500)
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--threads", type=int, default=0, help="torch threads")
    parser.add_argument(
        "--top-layers", type=int, default=2, help="lora.layers of the third path"
    )
    args = parser.parse_args(argv)
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
    torch.manual_seed(SEED)
    results: dict[str, dict[str, Any]] = {}
    paths = (
        ("baseline", baseline_rounds),
        ("fedgraft", fedgraft_rounds),
        (
            "fedgraft-top-layers",
            functools.partial(fedgraft_rounds, top_layers=args.top_layers),
        ),
    )
    for path, run in paths:
        model, seconds, samples = run(
            backbone, tokenizer, labels, texts, train_ids, args.rounds
        )
        accuracy = evaluate(model, test_encoded, tokenizer.pad_token_id).accuracy
        results[path] = {
            "benchmark": "client_throughput",
            "path": path,
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
        }
        print(json.dumps(results[path]), flush=True)
    print(
        json.dumps(
            {
                "benchmark": "client_throughput",
                "comparison": True,
                "speedup": round(
                    results["fedgraft"]["samples_per_second"]
                    / results["baseline"]["samples_per_second"],
                    2,
                ),
                "accuracy_fedgraft": results["fedgraft"]["accuracy"],
                "accuracy_baseline": results["baseline"]["accuracy"],
                "speedup_top_layers": round(
                    results["fedgraft-top-layers"]["samples_per_second"]
                    / results["baseline"]["samples_per_second"],
                    2,
                ),
                "accuracy_top_layers": results["fedgraft-top-layers"]["accuracy"],
                "command": "python benchmarks/client_throughput.py "
                + " ".join(sys.argv[1:] if argv is None else argv),
            }
        ),
        flush=True,
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
