"""Accuracy against the client-level privacy budget epsilon, for fedavg and ffa.

For each rule and each epsilon the noise multiplier is calibrated (dp-accounting's
``calibrate_dp_mechanism`` over the same RDP accountant the coordinator uses) so that
the run's rounds at its client sampling rate spend exactly that budget at
``dp.delta``; epsilon = inf is the same run without DP (no clipping, no noise, example
weights). The run itself also carries ``dp.target-epsilon``, so the coordinator's own
account must agree. Every run goes through the real coordinator
(``server.server_app.coordinate``) and ClientApp over
``simulations.inprocess_grid.InProcessGrid``. FFA-LoRA (Sun et al., ICLR 2024) is
claimed to suffer less from DP noise, since only B travels and its A is fixed: the
summary compares each rule's accuracy drop from epsilon = inf.

Each (rule, epsilon) cell runs once per seed of ``--seeds`` (the seed also draws the
Dirichlet split and the DP noise differs every run) and is reported as mean and
standard deviation over them. ``--adaptive`` clips adaptively (Andrew et al. 2021:
``dp.adaptive-clip``, starting at ``--clip-norm``, towards the median update norm)
instead of at a fixed ``--clip-norm``; the round's total noise multiplier stays the
calibrated one.

Full: CLINC150, Dirichlet alpha = 0.1 label skew, epsilon in {1, 3, 8, inf}, delta =
1e-5, seeds 0, 1, 2. ``--quick``: the demo corpus, few clients, rounds and steps,
epsilon in {8, inf}, seed 0.

Output: one JSON object per run on stdout (``rule``, ``seed``, ``epsilon_target``,
``noise_multiplier``, ``clipping``, ``final_clip_norm``, ``epsilon`` as the
coordinator accounted it, ``accuracy``, ``accuracy_per_round``, ``clients``,
``sampled``, ``wall_seconds``), one ``cell`` object per (rule, epsilon) with
``accuracy_mean`` and ``accuracy_std`` (sample std; 0 for one seed), one ``summary``
object, and ``accuracy-vs-epsilon.png`` (means with std error bars) in ``--out``. Run
from the repository root::

    python benchmarks/privacy.py --quick
    python benchmarks/privacy.py
    python benchmarks/privacy.py --adaptive --out runs/privacy-adaptive
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import os
import statistics
import sys
import tempfile
from contextlib import redirect_stdout
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from harness import data_settings, run_federation  # noqa: E402  (this folder)

log = logging.getLogger("benchmarks.privacy")


def base_config(args: argparse.Namespace, out: Path) -> dict[str, Any]:
    """The settings every run shares: data, split, budget of work, LoRA."""
    return {
        **data_settings(args.quick, args.test_per_label, out),
        # The demo's texts are a few words long.
        **({"model.max-length": 32} if args.quick else {}),
        "data.partition": "dirichlet",
        "data.dirichlet-alpha": args.alpha,
        "sim.num-clients": args.clients,
        "sim.local-baseline": False,
        "num-server-rounds": args.rounds,
        "train.fraction": args.fraction,
        "train.local-epochs": 1,
        "train.max-steps": args.max_steps,
        "train.batch-size": args.batch_size,
        "train.lr": args.lr,
        "dp.clip-norm": args.clip_norm,
        "dp.delta": args.delta,
    }


def sampled_per_round(clients: int, fraction: float) -> int:
    """How many clients the coordinator samples per round: under client-level DP
    each node independently at ``q = fraction`` (``server.sampling``), so about
    ``q n`` (at least 1)."""
    return min(clients, max(1, round(fraction * clients)))


def count_stddev(sampled: int, noise_multiplier: float) -> float:
    """Adaptive clipping's ``sigma_b``: the paper's ``m / 20`` where it is above
    ``z / 2`` (as Theorem 1 needs), else ``z``, which raises the delta's noise
    multiplier by ``(1 - 1/4)^-1/2``, about 15%."""
    from common import dp

    return max(dp.default_count_stddev(sampled), noise_multiplier)


def run_one(
    flat: dict[str, Any],
    rule: str,
    epsilon: float,
    output: Path,
    seed: int = 0,
    adaptive: bool = False,
) -> dict[str, Any]:
    """One federated run of ``rule`` at budget ``epsilon`` (inf: without DP)."""
    from common import dp

    clients = flat["sim.num-clients"]
    sampled = sampled_per_round(clients, flat["train.fraction"])
    settings: dict[str, Any] = {"aggregation": rule, "seed": seed}
    sigma = None
    if math.isfinite(epsilon):
        sigma = dp.noise_multiplier_for(
            # The rate the accountant charges: the Poisson sampler's q.
            epsilon,
            flat["dp.delta"],
            flat["num-server-rounds"],
            flat["train.fraction"],
        )
        settings |= {
            "dp.enabled": True,
            "dp.noise-multiplier": sigma,
            # A hair above the target: the calibration lands within 1e-4 of it.
            "dp.target-epsilon": epsilon * (1 + 1e-3),
        }
        if adaptive:
            settings |= {
                "dp.adaptive-clip": True,
                "dp.clipped-count-stddev": count_stddev(sampled, sigma),
            }
    run = run_federation({**flat, **settings}, output)
    rows, summary = run.rows, run.summary
    return {
        "rule": rule,
        "seed": seed,
        "epsilon_target": epsilon if math.isfinite(epsilon) else "inf",
        "noise_multiplier": sigma,
        "clipping": None if sigma is None else ("adaptive" if adaptive else "fixed"),
        "final_clip_norm": rows[-1].get("dp_clip_norm", flat["dp.clip-norm"])
        if sigma is not None
        else None,
        "epsilon": rows[-1].get("epsilon"),
        "delta": flat["dp.delta"] if sigma is not None else None,
        "clip_norm": flat["dp.clip-norm"] if sigma is not None else None,
        "accuracy": rows[-1]["eval_accuracy"],
        "accuracy_per_round": [row["eval_accuracy"] for row in rows],
        "rounds": rows[-1]["round"],
        "stopped_early": summary["stopped_early"],
        "clients": clients,
        "sampled": sampled,
        "wall_seconds": run.wall_seconds,
    }


def cells(results: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Mean and sample standard deviation of the accuracy over the seeds of each
    (rule, epsilon) cell, in the order the cells first ran."""
    grouped: dict[tuple[str, Any], list[dict[str, Any]]] = {}
    for result in results:
        grouped.setdefault((result["rule"], result["epsilon_target"]), []).append(
            result
        )
    out = []
    for (rule, epsilon), runs in grouped.items():
        accuracies = [r["accuracy"] for r in runs]
        out.append(
            {
                "cell": True,
                "rule": rule,
                "epsilon_target": epsilon,
                "clipping": runs[0]["clipping"],
                "seeds": [r["seed"] for r in runs],
                "accuracy_mean": round(statistics.fmean(accuracies), 4),
                "accuracy_std": round(
                    statistics.stdev(accuracies) if len(accuracies) > 1 else 0.0, 4
                ),
                "epsilon_mean": (
                    statistics.fmean(r["epsilon"] for r in runs)
                    if all(r["epsilon"] is not None for r in runs)
                    else None
                ),
            }
        )
    return out


def plot(summaries: list[dict[str, Any]], path: Path, title: str, delta: float) -> None:
    """Mean accuracy against epsilon with std error bars, one line per rule; inf sits
    at the right edge."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    finite = sorted(
        {c["epsilon_target"] for c in summaries if c["epsilon_target"] != "inf"}
    )
    inf_at = (finite[-1] * 3) if finite else 1.0
    figure, axes = plt.subplots(figsize=(6.5, 4.2))
    for rule in dict.fromkeys(c["rule"] for c in summaries):
        points = sorted(
            (
                inf_at if c["epsilon_target"] == "inf" else c["epsilon_target"],
                c["accuracy_mean"],
                c["accuracy_std"],
            )
            for c in summaries
            if c["rule"] == rule
        )
        xs, means, stds = zip(*points, strict=True)
        axes.errorbar(xs, means, yerr=stds, marker="o", capsize=4, label=rule)
    axes.set_xscale("log")
    ticks = [*finite, inf_at]
    axes.set_xticks(ticks, [f"{t:g}" for t in finite] + ["inf (no DP)"])
    axes.minorticks_off()
    axes.set_xlabel(f"client-level epsilon (delta = {delta:g})")
    axes.set_ylabel("test accuracy")
    axes.set_title(title)
    axes.grid(alpha=0.3)
    axes.legend()
    figure.tight_layout()
    figure.savefig(path, dpi=120)
    plt.close(figure)


def summarise(summaries: list[dict[str, Any]], plot_path: Path) -> dict[str, Any]:
    """Each rule's drop in mean accuracy from epsilon = inf, and ffa's against
    fedavg's."""
    summary: dict[str, Any] = {"summary": True, "plot": str(plot_path)}
    drops: dict[str, dict[str, float]] = {}
    for rule in dict.fromkeys(c["rule"] for c in summaries):
        runs = {
            c["epsilon_target"]: c["accuracy_mean"]
            for c in summaries
            if c["rule"] == rule
        }
        if "inf" in runs:
            drops[rule] = {
                f"{eps:g}": round(runs["inf"] - acc, 4)
                for eps, acc in runs.items()
                if eps != "inf"
            }
    summary["accuracy_drop_from_no_dp"] = drops
    if "fedavg" in drops and "ffa" in drops:
        summary["ffa_drop_minus_fedavg_drop"] = {
            eps: round(drops["ffa"][eps] - drops["fedavg"][eps], 4)
            for eps in drops["ffa"]
            if eps in drops["fedavg"]
        }
    return summary


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="demo corpus, small")
    parser.add_argument("--rules", default="fedavg,ffa")
    parser.add_argument("--epsilons", default="1,3,8,inf")
    parser.add_argument("--clients", type=int, default=50)
    parser.add_argument("--fraction", type=float, default=0.2)
    parser.add_argument("--alpha", type=float, default=0.1)
    parser.add_argument("--rounds", type=int, default=10)
    parser.add_argument("--max-steps", type=int, default=20)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--lr", type=float, default=2e-3)
    parser.add_argument("--clip-norm", type=float, default=1.0)
    parser.add_argument("--delta", type=float, default=1e-5)
    parser.add_argument(
        "--seeds", default="", help="comma list; default 0,1,2 (--quick: 0)"
    )
    parser.add_argument(
        "--adaptive",
        action="store_true",
        help="adaptive clipping (dp.adaptive-clip) from --clip-norm",
    )
    parser.add_argument(
        "--test-per-label",
        type=int,
        default=0,
        help="evaluate on this many CLINC150 test rows per intent (0: all 30)",
    )
    parser.add_argument("--out", default="")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.WARNING, stream=sys.stderr)
    log.setLevel(logging.INFO)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    if args.quick:
        args.clients, args.fraction, args.rounds = 4, 1.0, 2
        args.max_steps, args.batch_size = 2, 8
        if args.epsilons == parser.get_default("epsilons"):
            args.epsilons = "8,inf"
    epsilons = [float(e) for e in args.epsilons.split(",")]
    seeds = [
        int(s) for s in (args.seeds or ("0" if args.quick else "0,1,2")).split(",")
    ]
    out = Path(args.out or tempfile.mkdtemp(prefix="fedgraft-privacy-"))
    out.mkdir(parents=True, exist_ok=True)
    flat = base_config(args, out)
    results = []
    for rule in args.rules.split(","):
        for epsilon in epsilons:
            for seed in seeds:
                log.info("rule %s, epsilon %g, seed %d", rule, epsilon, seed)
                with redirect_stdout(sys.stderr):  # the runs' tables; stdout is JSON
                    result = run_one(
                        flat,
                        rule,
                        epsilon,
                        out / f"{rule}-eps{epsilon:g}-seed{seed}",
                        seed,
                        args.adaptive,
                    )
                results.append(result)
                print(json.dumps(result), flush=True)
    summaries = cells(results)
    for cell in summaries:
        print(json.dumps(cell), flush=True)
    corpus = "demo corpus" if args.quick else "CLINC150"
    clipping = "adaptive clip" if args.adaptive else f"C = {args.clip_norm:g}"
    plot_path = out / "accuracy-vs-epsilon.png"
    plot(
        summaries,
        plot_path,
        f"{corpus}, dirichlet alpha = {args.alpha:g}, {args.clients} clients, "
        f"{clipping}, {len(seeds)} seeds",
        args.delta,
    )
    print(json.dumps(summarise(summaries, plot_path)), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
