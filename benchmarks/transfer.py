"""Transfer recipes side by side: zero-shot, feature extraction, LoRA with the default
head, and fedgraft's recipe, federated and centralised, at equal training samples.

Methods (each run is the real command a user would type, in its own process):

``zero-shot``
    The label-name head on the frozen backbone, no training (round 0 of the recipe).
``fed-feature-extraction``
    ``train.mode = head``: the head alone on features cached once per client.
``fed-lora-default-head``
    What common examples do: LoRA r=8 on query/value, a randomly initialised head on
    the first token (``model.pooling = cls``), plain FedAvg.
``fed-recipe``
    fedgraft's recipe: backbone-native pooling, a label-name head,
    ``train.mode = lp-ft`` (head-only rounds first, then LoRA on all linear layers with
    a smaller head rate) and ``aggregation = fedavg-per-label``.
``central-recipe``
    The same recipe trained centrally on the union of the clients' rows
    (``fedgraft centralized``), with as many training samples per round.
``fed-closed-form-lda``, ``-ridge``, ``-ncm``
    ``head.init = closed-form``: the head solved from the sites' summed feature
    statistics before any gradient step; its accuracy is round 0's (the run then
    takes one head-only step, as a run needs a round).
``central-closed-form-lda``, ``-ridge``, ``-ncm``
    The same closed forms solved in this process on the union of the clients' rows
    (one feature pass for all three).

``--secure`` runs every federated method with ``secagg.enabled = true`` (each JSON
line then says ``"secure": true``).

Every federated method runs ``--rounds`` rounds of one local epoch on every client, so
all of them process the same number of training samples (feature extraction's samples
are head-only steps).

Datasets: ``clinc`` (CLINC150, one client per domain: 10 label-disjoint clients),
``sentiment`` (Sentiment Labelled Sentences, one client per site: amazon, imdb, yelp,
20% of each held out) and ``sst2`` (SST-2, 4 IID clients, GLUE dev as the test set, LoRA
rounds capped at ``--sst2-max-steps`` steps per client). ``--quick`` runs every method
on the built-in demo corpus in a few minutes.

Output: one JSON object per run on stdout (``dataset``, ``method``, ``accuracy``,
``wall_seconds``, ``train_samples``, ``bytes_up``, ``command``), then one ``summary``
object per dataset with the federated/centralised ratio. Run from the repository root::

    python benchmarks/transfer.py --quick
    python benchmarks/transfer.py --datasets clinc,sentiment,sst2
    python benchmarks/transfer.py --datasets clinc --secure \
        --methods fed-closed-form-lda,central-closed-form-lda
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import shlex
import subprocess
import sys
import tempfile
import time
from contextlib import redirect_stdout
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
SHARED_DATA = ROOT.parent / "shared" / "data"
SENTIMENT_LABELS = ROOT / "benchmarks" / "label_descriptions" / "sentiment.json"

log = logging.getLogger("benchmarks.transfer")


@dataclass(frozen=True)
class Dataset:
    """A dataset's base config and the recipe's learning rates on it."""

    name: str
    base: dict[str, Any]
    recipe: dict[str, Any] = field(default_factory=dict)


def datasets(rounds: int, sst2_max_steps: int) -> dict[str, Dataset]:
    """The benchmark's datasets, keyed by name."""
    lp_rounds = max(1, rounds // 2)
    recipe = {
        "head.init": "label-names",
        "train.mode": "lp-ft",
        "train.lp-rounds": lp_rounds,
        "lora.target-modules": "all-linear",
        "train.lr": 5e-4,
        "train.head-lr": 1.25e-4,
        "train.lp-lr": 1e-2,
        "aggregation": "fedavg-per-label",
    }
    common = {"num-server-rounds": rounds, "sim.local-baseline": False}
    sentiment_files = ",".join(
        str(SHARED_DATA / "sentiment_labelled_sentences" / f"{site}_labelled.txt")
        for site in ("amazon_cells", "imdb", "yelp")
    )
    return {
        "demo": Dataset(
            "demo",
            {**common, "data.path": "", "train.batch-size": 16},
            recipe,
        ),
        "clinc": Dataset(
            "clinc",
            {
                **common,
                "data.path": str(SHARED_DATA / "clinc150" / "train.jsonl"),
                "data.test-path": str(SHARED_DATA / "clinc150" / "test.jsonl"),
                "data.partition": "column:domain",
                "train.batch-size": 32,
            },
            recipe,
        ),
        "sentiment": Dataset(
            "sentiment",
            {
                **common,
                "data.path": sentiment_files,
                "data.partition": "column:source",
                "data.holdout-fraction": 0.2,
                "train.batch-size": 32,
                "head.label-descriptions": str(SENTIMENT_LABELS),
            },
            {**recipe, "aggregation": "fedavg"},
        ),
        "sst2": Dataset(
            "sst2",
            {
                **common,
                "data.path": str(SHARED_DATA / "sst2" / "train.tsv"),
                "data.test-path": str(SHARED_DATA / "sst2" / "test.tsv"),
                "data.text-column": "sentence",
                "data.partition": "iid",
                "sim.num-clients": 4,
                "train.batch-size": 32,
                "train.max-steps": sst2_max_steps,
                "head.label-descriptions": str(SENTIMENT_LABELS),
            },
            {**recipe, "aggregation": "fedavg"},
        ),
    }


def methods(dataset: Dataset) -> dict[str, tuple[str, dict[str, Any]]]:
    """Each method's command (``simulate`` or ``centralized``) and config overrides."""
    recipe = {**dataset.base, **dataset.recipe}
    return {
        "fed-feature-extraction": (
            "simulate",
            {
                **dataset.base,
                "head.init": "label-names",
                "train.mode": "head",
                "train.lp-lr": 1e-2,
                "aggregation": dataset.recipe["aggregation"],
            },
        ),
        "fed-lora-default-head": (
            "simulate",
            {
                **dataset.base,
                "head.init": "random",
                "head.label-descriptions": "",
                "model.pooling": "cls",
                "train.mode": "lora",
                "lora.target-modules": "query,value",
                "train.lr": 2e-3,
                "aggregation": "fedavg",
            },
        ),
        "fed-recipe": ("simulate", recipe),
        "central-recipe": ("centralized", recipe),
    } | {
        f"fed-closed-form-{variant}": (
            "simulate",
            {
                **dataset.base,
                "head.init": "closed-form",
                "head.closed-form": variant,
                "num-server-rounds": 1,
                # The one round a run needs: a head step at 3 of the sites.
                "train.mode": "head",
                "train.max-steps": 1,
                "train.fraction": 0.3,
                "aggregation": "fedavg",
            },
        )
        for variant in CLOSED_FORM_VARIANTS
    }


#: The closed-form heads measured (``head.closed-form``).
CLOSED_FORM_VARIANTS = ("lda", "ridge", "ncm")


def secured(kind: str, overrides: dict[str, Any]) -> dict[str, Any]:
    """A federated method's overrides behind secure aggregation (``--secure``)."""
    if kind != "simulate":
        return overrides
    return {**overrides, "secagg.enabled": True}


def _command(kind: str, overrides: dict[str, Any], output: Path) -> list[str]:
    command = [sys.executable, "-m", "simulations.cli", kind]
    for key, value in {**overrides, "output.dir": str(output)}.items():
        command += ["--set", f"{key}={value}"]
    return command


def run_method(
    dataset: str, method: str, kind: str, overrides: dict[str, Any], output: Path
) -> dict[str, Any]:
    """Run one method in its own process and read its ``summary.json``."""
    command = _command(kind, overrides, output)
    log.info("%s / %s: %s", dataset, method, shlex.join(command))
    started = time.perf_counter()
    with open(output.with_suffix(".log"), "w") as log_file:
        subprocess.run(
            command,
            cwd=ROOT,
            stdout=log_file,
            stderr=subprocess.STDOUT,
            check=True,
            env={**os.environ, "PYTHONPATH": str(ROOT)},
        )
    wall = time.perf_counter() - started
    summary = json.loads((output / "summary.json").read_text())
    rows = [json.loads(line) for line in (output / "metrics.jsonl").open()]
    # A closed-form head is measured before any gradient step: round 0.
    before_training = overrides.get("head.init") == "closed-form"
    return {
        "benchmark": "transfer",
        "dataset": dataset,
        "method": method,
        "secure": bool(overrides.get("secagg.enabled", False)),
        "accuracy": (
            rows[0]["eval_accuracy"]
            if before_training
            else summary["final"]["eval_accuracy"]
        ),
        "accuracy_per_round": [row["eval_accuracy"] for row in rows],
        "phases": [row.get("phase") for row in rows],
        "wall_seconds": round(wall, 1),
        "train_samples": summary["totals"].get("train_samples"),
        "bytes_up": summary["totals"].get("bytes_up"),
        "trainable_parameters": summary["backbone"]["trainable_parameters"],
        "command": shlex.join(["python"] + command[1:]),
    }


def zero_shot(dataset: Dataset) -> dict[str, Any]:
    """Accuracy of the label-name head before any training, in this process."""
    from common.config import RunConfig
    from common.splits import evaluation_examples, run_labels
    from common.tasks.text_classification.bench import Workbench

    started = time.perf_counter()
    config = RunConfig.from_flat({**dataset.base, "head.init": "label-names"})
    labels = run_labels(config.data, config.seed)
    bench = Workbench.open(
        config, labels, evaluation_examples(config.data, config.seed)
    )
    accuracy = bench.evaluate().accuracy
    return {
        "benchmark": "transfer",
        "dataset": dataset.name,
        "method": "zero-shot",
        "accuracy": accuracy,
        "wall_seconds": round(time.perf_counter() - started, 1),
        "train_samples": 0,
        "bytes_up": 0,
    }


def central_closed_form(dataset: Dataset) -> list[dict[str, Any]]:
    """Each closed-form head solved in this process on the union of the clients'
    rows (the federated rows' centralised counterpart), one feature pass for all."""
    from common.config import RunConfig
    from common.splits import (
        all_client_examples,
        default_num_clients,
        evaluation_examples,
        run_labels,
    )
    from common.tasks.text_classification.bench import Workbench

    started = time.perf_counter()
    config = RunConfig.from_flat({**dataset.base, "head.init": "closed-form"})
    labels = run_labels(config.data, config.seed)
    clients = all_client_examples(
        config.data,
        config.seed,
        default_num_clients(config.data, config.seed, config.sim.num_clients),
    )
    union = [row for part in clients for row in part]
    bench = Workbench.open(
        config, labels, evaluation_examples(config.data, config.seed)
    )
    encoded = bench.encode_examples(union)
    results = []
    for variant in CLOSED_FORM_VARIANTS:
        bench.config = config.with_overrides(**{"head.closed-form": variant})
        bench.solve_closed_form_head(encoded, "union")
        results.append(
            {
                "benchmark": "transfer",
                "dataset": dataset.name,
                "method": f"central-closed-form-{variant}",
                "accuracy": bench.evaluate().accuracy,
                "train_rows": len(union),
                # The first variant's time includes the one feature pass.
                "wall_seconds": round(time.perf_counter() - started, 1),
                "train_samples": 0,
                "bytes_up": 0,
            }
        )
        started = time.perf_counter()
    return results


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--quick", action="store_true", help="the demo corpus only, 2 rounds"
    )
    parser.add_argument("--datasets", default="clinc,sentiment,sst2")
    parser.add_argument("--methods", default="", help="comma list; default all")
    parser.add_argument("--rounds", type=int, default=4)
    parser.add_argument("--sst2-max-steps", type=int, default=100)
    parser.add_argument("--out", default="", help="folder for the runs' outputs")
    parser.add_argument(
        "--secure",
        action="store_true",
        help="federated methods with secagg.enabled = true",
    )
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, stream=sys.stderr)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    rounds = 2 if args.quick else args.rounds
    names = ["demo"] if args.quick else args.datasets.split(",")
    table = datasets(rounds, args.sst2_max_steps)
    unknown = sorted(set(names) - set(table))
    if unknown:
        parser.error(f"unknown dataset(s) {unknown}; choose from {sorted(table)}")
    out = Path(args.out or tempfile.mkdtemp(prefix="fedgraft-transfer-"))
    out.mkdir(parents=True, exist_ok=True)
    wanted = set(args.methods.split(",")) if args.methods else None
    for name in names:
        dataset = table[name]
        results: dict[str, dict[str, Any]] = {}
        if wanted is None or "zero-shot" in wanted:
            with redirect_stdout(sys.stderr):  # stdout carries only JSON
                results["zero-shot"] = zero_shot(dataset)
            print(json.dumps(results["zero-shot"]), flush=True)
        central_cf = [f"central-closed-form-{v}" for v in CLOSED_FORM_VARIANTS]
        if wanted is None or wanted & set(central_cf):
            with redirect_stdout(sys.stderr):
                for row in central_closed_form(dataset):
                    results[row["method"]] = row
            for method in central_cf:
                if wanted is None or method in wanted:
                    print(json.dumps(results[method]), flush=True)
        for method, (kind, overrides) in methods(dataset).items():
            if wanted is not None and method not in wanted:
                continue
            if args.secure:
                overrides = secured(kind, overrides)
            results[method] = run_method(
                name, method, kind, overrides, out / f"{name}-{method}"
            )
            print(json.dumps(results[method]), flush=True)
        summary: dict[str, Any] = {
            "benchmark": "transfer",
            "dataset": name,
            "summary": True,
            "rounds": rounds,
            "accuracy": {m: r["accuracy"] for m, r in results.items()},
        }
        for variant in CLOSED_FORM_VARIANTS:
            fed = results.get(f"fed-closed-form-{variant}")
            central = results.get(f"central-closed-form-{variant}")
            if fed and central:
                summary[f"closed_form_{variant}_federated_minus_centralised"] = round(
                    fed["accuracy"] - central["accuracy"], 6
                )
        if "fed-recipe" in results and "central-recipe" in results:
            summary["federated_over_centralised"] = round(
                results["fed-recipe"]["accuracy"]
                / results["central-recipe"]["accuracy"],
                4,
            )
        print(json.dumps(summary), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
