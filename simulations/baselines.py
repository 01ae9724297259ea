"""Baselines in the same harness: centralised training on the union of the clients'
rows, and each client training alone.

Both train the same model from the same seeded initial adapter, and both see as many
training samples as the federated run they are compared with.
"""

from __future__ import annotations

import logging
import time
from functools import partial
from pathlib import Path
from typing import Any

from client.finetune import LocalTraining, train_phase
from common.config import RunConfig
from common.outputs import RunOutputs, default_output_dir
from common.reporting import RoundRecorder
from common.splits import (
    all_client_examples,
    default_num_clients,
    evaluation_examples,
    run_labels,
)
from common.workbench import Workbench

log = logging.getLogger(__name__)


def federated_samples_per_round(config: RunConfig, client_sizes: list[int]) -> int:
    """Training samples one federated round processes, in expectation.

    Each sampled client trains ``local-epochs`` over its rows, capped at
    ``max-steps * batch-size``; ``train.fraction`` of the clients take part.
    """
    per_client = [size * config.train.local_epochs for size in client_sizes]
    if config.train.max_steps:
        per_client = [
            min(samples, config.train.max_steps * config.train.batch_size)
            for samples in per_client
        ]
    return round(sum(per_client) * config.train.fraction)


def train_centralized(config: RunConfig, output_dir: Path | None = None) -> Path:
    """Train one LoRA model on the union of every client's rows.

    Each "round" trains on as many samples as one federated round processes (see
    :func:`federated_samples_per_round`), then evaluates, so that ``metrics.jsonl`` can
    be read side by side with the federated run's.

    Returns
    -------
    Path
        The output folder, holding the same files as a federated run.
    """
    started = time.perf_counter()
    target = output_dir or (
        Path(config.output_dir)
        if config.output_dir
        else default_output_dir("centralized")
    )
    num_clients = default_num_clients(config.data, config.seed, config.sim.num_clients)
    clients = all_client_examples(config.data, config.seed, num_clients)
    union = [example for rows in clients for example in rows]
    labels = run_labels(config.data, config.seed)
    bench = Workbench.open(
        config, labels, evaluation_examples(config.data, config.seed)
    )
    encoded = bench.encode_examples(union)
    per_round = federated_samples_per_round(config, [len(rows) for rows in clients])
    outputs = RunOutputs(target)
    recorder = RoundRecorder(outputs, config.num_server_rounds)
    evaluation = bench.evaluate()
    recorder.record(
        {
            "round": 0,
            "clients": 1,
            "train_loss": None,
            "eval_loss": evaluation.loss,
            "eval_accuracy": evaluation.accuracy,
            "train_samples": 0,
            "seconds": 0.0,
        }
    )
    for server_round in range(1, config.num_server_rounds + 1):
        round_started = time.perf_counter()
        phase = config.train.phase(server_round)
        plan = LocalTraining.from_config(
            config,
            phase,
            seed=config.seed * 100_003 + server_round,
            epochs=per_round / len(encoded),
            max_steps=0,
        )
        result = train_phase(
            bench.model,
            encoded,
            bench.pad_id,
            plan,
            phase,
            lambda: bench.features_of(encoded, "train"),
        )
        evaluation = bench.evaluate()
        recorder.record(
            {
                "round": server_round,
                "phase": phase,
                "clients": 1,
                "train_loss": result.train_loss,
                "train_samples": result.samples,
                "eval_loss": evaluation.loss,
                "eval_accuracy": evaluation.accuracy,
                "seconds": round(time.perf_counter() - round_started, 3),
            }
        )
    bench.finish_run("centralized", outputs, recorder, bench.state(), started)
    return target


def local_only(config: RunConfig) -> list[dict[str, Any]]:
    """Accuracy of each client trained alone: on the coordinator's evaluation rows
    (``eval_accuracy``) and on those of the labels the client holds
    (``own_domain_accuracy``: its own domain under ``column:domain``).

    Each client trains from the initial adapter for ``num-server-rounds`` rounds of
    ``local-epochs`` passes over its own rows, in the same phases as the federated run:
    the compute it spends there, without anybody else's knowledge.
    """
    num_clients = default_num_clients(config.data, config.seed, config.sim.num_clients)
    clients = all_client_examples(config.data, config.seed, num_clients)
    labels = run_labels(config.data, config.seed)
    bench = Workbench.open(
        config, labels, evaluation_examples(config.data, config.seed)
    )
    initial = bench.state()
    results = []
    for client, rows in enumerate(clients):
        bench.evaluate(initial)  # resets the adapter to the initial state
        encoded = bench.encode_examples(rows)
        for server_round in range(1, config.num_server_rounds + 1):
            phase = config.train.phase(server_round)
            plan = LocalTraining.from_config(
                config,
                phase,
                seed=config.seed * 100_003 + server_round * 1_009 + client,
            )
            train_phase(
                bench.model,
                encoded,
                bench.pad_id,
                plan,
                phase,
                partial(bench.features_of, encoded, f"client-{client}"),
            )
        evaluation = bench.evaluate()
        own = bench.evaluate(labels=set(encoded.labels.tolist()))
        results.append(
            {
                "client": client,
                "rows": len(rows),
                "eval_accuracy": evaluation.accuracy,
                "own_domain_accuracy": own.accuracy,
                "own_domain_rows": own.num_examples,
            }
        )
        log.info(
            "client %d alone: eval_accuracy %.4f, own domain %.4f, on %d rows",
            client,
            evaluation.accuracy,
            own.accuracy,
            len(rows),
        )
    return results


def local_only_summary(results: list[dict[str, Any]]) -> dict[str, float]:
    """Mean and worst client of :func:`local_only`, on both evaluation sets."""
    summary: dict[str, float] = {}
    for key in ("eval_accuracy", "own_domain_accuracy"):
        values = [row[key] for row in results]
        summary[f"mean_{key}"] = sum(values) / len(values)
        summary[f"worst_{key}"] = min(values)
        summary[f"best_{key}"] = max(values)
    return summary
