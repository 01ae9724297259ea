"""Federated LoRA beyond text classification: a causal LM and an image classifier.

Method: the benchmark writes its own offline assets (``simulations.task_demo``): a
synthetic domain corpus of four domains with their own vocabularies, a causal LM
built from a config with a word-level tokenizer trained on that corpus (Llama
architecture), coloured-square images in three classes and a ViT built from a
config. Both backbones are randomly initialised, so the figures measure the
federated machinery (does perplexity fall, does accuracy rise, how fast does a site
train), not a pre-trained model's transfer. Each task then runs through the real
coordinator (``server.server_app.coordinate``) and ClientApp over
``simulations.inprocess_grid.InProcessGrid`` (every message handled in this
process): the causal LM with one client per domain (``data.partition =
column:domain``), the images over three IID clients.

Throughput: one site's model (``client.sites.SiteRuntime.open_site``) trains three epochs over
its rows after a warm-up; tokens per second count every token of the
trained rows (padding excluded), images per second every trained image, on the
device the site picked (CUDA when present).

Output: one JSON object per measurement on stdout: ``{"task", "measurement":
"round", "round", "eval_perplexity" | "eval_accuracy", "eval_loss", "train_loss"}``
for every round, ``{"measurement": "throughput", "device", "tokens_per_second" |
"images_per_second", ...}`` and ``{"measurement": "run", "wall_seconds",
"bytes_up_per_round", "command"}``. The runs' own tables go to stderr. Run from the
repository root::

    python benchmarks/tasks.py --quick   # 32-wide, 2-layer models, 3 rounds
    python benchmarks/tasks.py           # 64-wide, 4-layer models, 4 rounds
"""

from __future__ import annotations

import argparse
import json
import logging
import shlex
import sys
import tempfile
import time
from contextlib import redirect_stdout
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from harness import run_federation  # noqa: E402  (this folder)

log = logging.getLogger("benchmarks.tasks")
#: Passes over one site's rows that the throughput figure times.
THROUGHPUT_EPOCHS = 3


def emit(record: dict[str, Any]) -> None:
    """One measurement as one JSON line on stdout."""
    print(json.dumps(record), flush=True)


def round_records(task: str, metric: str, rows: list[dict[str, Any]]) -> None:
    for row in rows:
        emit(
            {
                "task": task,
                "measurement": "round",
                "round": row["round"],
                metric: row[metric],
                "eval_loss": row["eval_loss"],
                "train_loss": row["train_loss"],
            }
        )


def throughput(config: Any, backbone: Path, warm_up: bool = True) -> dict[str, Any]:
    """Train one site's rows for an epoch (after a warm-up epoch) and time it."""
    from client.finetune import LocalTraining
    from client.sites import SiteRequest, SiteRuntime
    from common.backbone import fingerprint
    from common.splits import client_examples, run_labels
    from common.tasks import task_named

    labels = run_labels(config.data, config.seed)
    site: Any = SiteRuntime().open_site(
        SiteRequest(
            config,
            backbone,
            fingerprint(backbone),
            config.lora,
            config.model.pooling,  # a causal LM pools nothing and ignores it
            labels,
            None,
        )
    )
    examples = client_examples(config.data, config.seed, 0, config.sim.num_clients)
    rows = site.encode(examples)
    plan = LocalTraining.from_config(
        config, "lora", seed=config.seed, epochs=THROUGHPUT_EPOCHS
    )
    start = site.state()
    if warm_up:
        site.train(rows, plan, "lora", start, None)
    result, _ = site.train(rows, plan, "lora", start, None)
    facts = {"device": result.device, "seconds": round(result.seconds, 3)}
    if task_named(config.model.task).generates:  # counted in tokens, not images
        tokens = sum(len(ids) for ids in rows.ids) * THROUGHPUT_EPOCHS
        return facts | {
            "tokens": tokens,
            "tokens_per_second": round(tokens / result.seconds, 1),
        }
    return facts | {
        "images": result.samples,
        "images_per_second": round(result.samples / result.seconds, 1),
    }


def run_task(
    task: str,
    flat: dict[str, Any],
    backbone: Path,
    scratch: Path,
    command: str,
) -> None:
    from common.config import RunConfig
    from common.tasks import task_named

    generates = task_named(task).generates
    metric = "eval_perplexity" if generates else "eval_accuracy"
    with redirect_stdout(sys.stderr):
        run = run_federation(flat, scratch / f"{task}-run")
    round_records(task, metric, run.rows)
    config = RunConfig.from_flat({**flat, "sim.num-clients": run.clients})
    with redirect_stdout(sys.stderr):
        speed = throughput(config, backbone)
    emit({"task": task, "measurement": "throughput", **speed})
    emit(
        {
            "task": task,
            "measurement": "run",
            "clients": run.clients,
            "rounds": len(run.rows) - 1,
            "wall_seconds": run.wall_seconds,
            "bytes_up_per_round": run.rows[-1]["bytes_up"],
            "trainable_parameters": run.summary["backbone"]["trainable_parameters"],
            "command": command,
        }
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="32-wide models, 3 rounds")
    parser.add_argument("--rounds", type=int, default=0, help="0 = 3 quick, 4 full")
    parser.add_argument("--tasks", default="causal-lm,image-cls")
    args = parser.parse_args()
    logging.basicConfig(level=logging.WARNING, stream=sys.stderr)
    from simulations.task_demo import (
        build_causal_lm,
        build_vision_backbone,
        domain_sentences,
        write_image_folder,
        write_jsonl,
    )

    width, layers = (32, 2) if args.quick else (64, 4)
    rounds = args.rounds or (3 if args.quick else 4)
    per_domain = 40 if args.quick else 80
    command = "python benchmarks/tasks.py " + " ".join(
        shlex.quote(a) for a in sys.argv[1:]
    )
    started = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="fedgraft-tasks-") as folder:
        scratch = Path(folder)
        tasks = args.tasks.split(",")
        if "causal-lm" in tasks:
            rows = domain_sentences(0, per_domain)
            corpus = write_jsonl(scratch / "corpus.jsonl", rows)
            backbone = build_causal_lm(
                scratch / "lm",
                [row["text"] for row in rows],
                "llama",
                width=width,
                layers=layers,
            )
            flat = {
                "model.task": "causal-lm",
                "model.name": str(backbone),
                "model.max-length": 32,
                "data.path": str(corpus),
                "data.partition": "column:domain",
                "num-server-rounds": rounds,
                "train.batch-size": 16,
                "train.lr": 0.02,
                "lora.target-modules": "all-linear",
            }
            run_task("causal-lm", flat, backbone, scratch, command)
        if "image-cls" in tasks:
            images = write_image_folder(scratch / "images", 30 if args.quick else 60)
            backbone = build_vision_backbone(
                scratch / "vit", "vit", width=width, layers=layers
            )
            flat = {
                "model.task": "image-cls",
                "model.name": str(backbone),
                "head.init": "random",
                "data.path": str(images),
                "data.partition": "iid",
                "sim.num-clients": 3,
                "num-server-rounds": rounds,
                "train.batch-size": 16,
                "train.lr": 0.01,
            }
            run_task("image-cls", flat, backbone, scratch, command)
    log.info("done in %.1fs", time.perf_counter() - started)


if __name__ == "__main__":
    main()
