"""Aggregation rules side by side on non-IID splits, against centralised and
local-only training in the same harness, at equal training samples.

For each split (``domain``: one client per CLINC150 domain, label-disjoint;
``dirichlet``: Dirichlet alpha = 0.1 label skew; ``iid``) every rule runs the same
rounds, local epochs and step cap, through the real coordinator (``server.server_app.
coordinate``) and ClientApp over ``simulations.inprocess_grid.InProcessGrid``, which
hands each message to the ClientApp in this process (no Ray start-up per run; the
bytes counted are the records' serialised sizes). ``flexlora`` runs with
heterogeneous ranks: node config ``lora.r`` cycles through ``--flex-ranks`` (the run's
``lora.r`` is their maximum). The centralised baseline trains one model on the union of
the clients' rows with as many samples per round; the local-only baseline trains each
client alone for the same rounds, and reports the mean and worst client on the global
test set and on its own labels' test rows.

Output: one JSON object per run on stdout (``split``, ``rule``, ``accuracy``,
``accuracy_per_round``, ``bytes_up``, ``bytes_down``, ``wall_seconds``,
``gap_to_centralised``), one ``summary`` object per split, and one PNG per split
(accuracy per round) in ``--out``. Run from the repository root::

    python benchmarks/aggregation.py --quick
    python benchmarks/aggregation.py --rounds 3 --max-steps 20
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
import tempfile
import time
from contextlib import redirect_stdout
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from harness import data_settings, run_federation  # noqa: E402  (this folder)

from common.config import AGGREGATION_RULES as ALL_RULES  # noqa: E402

QUICK_RULES = ("fedavg", "fedadam", "ffa", "fedsa", "flexlora")
SPLITS = {
    "domain": {"data.partition": "column:domain"},
    "dirichlet": {
        "data.partition": "dirichlet",
        "data.dirichlet-alpha": 0.1,
        "sim.num-clients": 20,
    },
    "iid": {"data.partition": "iid", "sim.num-clients": 20},
}

log = logging.getLogger("benchmarks.aggregation")


def base_config(args: argparse.Namespace, out: Path) -> dict[str, Any]:
    """The settings every run shares (the data, the budget, LoRA)."""
    return {
        **data_settings(args.quick, args.test_per_label, out),
        "num-server-rounds": args.rounds,
        "train.local-epochs": 1,
        "train.max-steps": args.max_steps,
        "train.batch-size": args.batch_size,
        "train.lr": args.lr,
        "lora.r": max(args.flex_ranks),
        "lora.alpha": 2 * max(args.flex_ranks),
        "sim.local-baseline": False,
        "train.fraction": args.fraction,
    }


def run_rule(
    flat: dict[str, Any], rule: str, flex_ranks: list[int], output: Path
) -> dict[str, Any]:
    """One federated run of ``rule`` over the in-process grid."""
    run = run_federation(
        {**flat, "aggregation": rule},
        output,
        (lambda p: {"lora.r": flex_ranks[p % len(flex_ranks)]})
        if ALL_RULES[rule].site_ranks
        else None,
    )
    rows, clients = run.rows, run.clients
    result = {
        "rule": rule,
        "accuracy": rows[-1]["eval_accuracy"],
        "accuracy_per_round": [row["eval_accuracy"] for row in rows],
        "bytes_up": sum(row.get("bytes_up", 0) for row in rows),
        "bytes_down": sum(row.get("bytes_down", 0) for row in rows),
        "train_samples": sum(row.get("train_samples", 0) for row in rows),
        "clients": clients,
        "wall_seconds": run.wall_seconds,
    }
    if "personal_accuracy_mean" in rows[-1]:
        result["personal_accuracy_mean"] = rows[-1]["personal_accuracy_mean"]
        result["personal_accuracy_min"] = rows[-1]["personal_accuracy_min"]
    if ALL_RULES[rule].site_ranks:
        result["client_ranks"] = sorted(
            {flex_ranks[p % len(flex_ranks)] for p in range(clients)}
        )
    return result


def run_centralised(flat: dict[str, Any], output: Path) -> dict[str, Any]:
    """The centralised baseline with as many samples per round."""
    from common.config import RunConfig
    from simulations.baselines import train_centralized

    started = time.perf_counter()
    train_centralized(RunConfig.from_flat({**flat, "output.dir": str(output)}), output)
    rows = [json.loads(line) for line in (output / "metrics.jsonl").open()]
    return {
        "rule": "centralised",
        "accuracy": rows[-1]["eval_accuracy"],
        "accuracy_per_round": [row["eval_accuracy"] for row in rows],
        "train_samples": sum(row.get("train_samples", 0) for row in rows),
        "wall_seconds": round(time.perf_counter() - started, 1),
    }


def run_local_only(flat: dict[str, Any]) -> dict[str, Any]:
    """Each client alone for the same rounds: mean and worst client."""
    from common.config import RunConfig
    from simulations.baselines import local_only, local_only_summary

    started = time.perf_counter()
    results = local_only(RunConfig.from_flat(flat))
    return {
        "rule": "local-only",
        **local_only_summary(results),
        "accuracy": local_only_summary(results)["mean_eval_accuracy"],
        "clients": len(results),
        "wall_seconds": round(time.perf_counter() - started, 1),
    }


def plot(split: str, results: list[dict[str, Any]], path: Path) -> None:
    """Accuracy per round of every run of one split."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, axes = plt.subplots(figsize=(7, 4.5))
    for result in results:
        if "accuracy_per_round" in result:
            style = "--" if result["rule"] == "centralised" else "-"
            axes.plot(
                result["accuracy_per_round"],
                style,
                marker="o",
                label=result["rule"],
            )
    axes.set_xlabel("round")
    axes.set_ylabel("test accuracy")
    axes.set_title(f"aggregation rules, split: {split}")
    axes.grid(alpha=0.3)
    axes.legend(fontsize=8, ncol=2)
    figure.tight_layout()
    figure.savefig(path, dpi=120)
    plt.close(figure)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="demo corpus, few rules")
    parser.add_argument("--splits", default="domain,dirichlet,iid")
    parser.add_argument("--rules", default="", help="comma list; default all")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--max-steps", type=int, default=20)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--lr", type=float, default=2e-3)
    parser.add_argument("--flex-ranks", default="4,8,16")
    parser.add_argument(
        "--test-per-label",
        type=int,
        default=0,
        help="evaluate on this many CLINC150 test rows per intent (0: all 30)",
    )
    parser.add_argument("--fraction", type=float, default=1.0, help="train.fraction")
    parser.add_argument("--out", default="")
    parser.add_argument(
        "--no-baselines", action="store_true", help="skip centralised and local-only"
    )
    args = parser.parse_args(argv)
    args.flex_ranks = [int(r) for r in args.flex_ranks.split(",")]
    logging.basicConfig(level=logging.WARNING, stream=sys.stderr)
    log.setLevel(logging.INFO)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    if args.quick:
        args.rounds, args.max_steps, args.batch_size = 2, 0, 16
    rules = (
        args.rules.split(",")
        if args.rules
        else list(QUICK_RULES if args.quick else ALL_RULES)
    )
    splits = ["domain", "dirichlet"] if args.quick else args.splits.split(",")
    out = Path(args.out or tempfile.mkdtemp(prefix="fedgraft-aggregation-"))
    out.mkdir(parents=True, exist_ok=True)
    base = base_config(args, out)
    for split in splits:
        overrides = dict(SPLITS[split])
        if args.quick:
            overrides["sim.num-clients"] = 4
        flat = {**base, **overrides}
        results: list[dict[str, Any]] = []
        if not args.no_baselines:
            with redirect_stdout(sys.stderr):  # the runs' tables; stdout is JSON
                central = run_centralised(flat, out / f"{split}-centralised")
            results.append(central)
            print(json.dumps({"split": split, **central}), flush=True)
            with redirect_stdout(sys.stderr):
                alone = run_local_only(flat)
            results.append(alone)
            print(json.dumps({"split": split, **alone}), flush=True)
        for rule in rules:
            log.info("split %s: rule %s", split, rule)
            with redirect_stdout(sys.stderr):
                result = run_rule(flat, rule, args.flex_ranks, out / f"{split}-{rule}")
            if not args.no_baselines:
                result["gap_to_centralised"] = round(
                    results[0]["accuracy"] - result["accuracy"], 4
                )
            results.append(result)
            print(json.dumps({"split": split, **result}), flush=True)
        plot(split, results, out / f"accuracy-{split}.png")
        federated = [
            r for r in results if r["rule"] not in ("centralised", "local-only")
        ]
        best = max(federated, key=lambda r: r["accuracy"])
        fedavg = next((r for r in federated if r["rule"] == "fedavg"), None)
        ffa = next((r for r in federated if r["rule"] == "ffa"), None)
        summary: dict[str, Any] = {
            "split": split,
            "summary": True,
            "best_rule": best["rule"],
            "best_accuracy": best["accuracy"],
            "plot": str(out / f"accuracy-{split}.png"),
        }
        if not args.no_baselines:
            summary["best_gap_to_centralised"] = round(
                results[0]["accuracy"] - best["accuracy"], 4
            )
        if fedavg and ffa:
            summary["ffa_upload_over_fedavg"] = round(
                ffa["bytes_up"] / fedavg["bytes_up"], 4
            )
        print(json.dumps(summary), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
