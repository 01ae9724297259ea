"""Baselines in the same harness: centralised training on the union of the clients'
rows, and each client training alone, for every task (``model.task``).

Both train the run's own model (the coordinator's workbench, :mod:`common.tasks`)
from the same seeded initial adapter, as a site of its task trains it
(:mod:`client.sites`), and both see as many training samples as the federated run
they are compared with.
"""

from __future__ import annotations

import dataclasses
import logging
import time
from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from types import MappingProxyType
from typing import Any

import numpy as np
from flwr.app import Context, RecordDict

from client.causal_lm_site import CausalLMSite, LmCaches
from client.finetune import FinetuneResult, LocalTraining, train_phase
from client.runtime import rows_key
from client.sites import SiteModel, TextRows
from client.vision_site import ImageCaches, VisionSite
from common.codec import AdapterState
from common.config import RunConfig
from common.console import step_progress
from common.data import Example
from common.evaluation import EvalResult
from common.outputs import RunOutputs, default_output_dir
from common.reporting import LOWER_IS_BETTER, RoundRecorder, main_metric
from common.splits import (
    all_client_examples,
    default_num_clients,
    evaluation_examples,
    run_labels,
)
from common.tasks import RunBench, Task, task_named
from common.tasks.causal_lm import CAUSAL_LM
from common.tasks.finish import finish_run
from common.tasks.image_classification import IMAGE_CLASSIFICATION
from common.tasks.text_classification import TEXT_CLASSIFICATION
from common.tasks.text_classification.bench import Workbench
from common.tasks.text_classification.evaluation import evaluate
from common.tasks.text_classification.model import load_adapter_state
from common.tracking.base import Tracker
from common.tracking.setup import open_tracker

log = logging.getLogger(__name__)

#: The per-client columns :func:`local_only_summary` sums up, where present.
SUMMARISED = ("eval_accuracy", "own_domain_accuracy", "eval_perplexity")


@dataclass
class WorkbenchText:
    """The text classifier of a
    :class:`~common.tasks.text_classification.bench.Workbench` as a
    :class:`~client.sites.SiteModel`: trained with :func:`client.finetune.train_phase`
    as a site trains it, head-only rounds on the bench's cached features. No DP-SGD:
    the baselines are the non-private reference."""

    bench: Workbench

    def encode(self, examples: list[Example]) -> TextRows:
        return TextRows(examples, self.bench.encode_examples(examples))

    def load_state(self, state: AdapterState) -> None:
        load_adapter_state(self.bench.model, state)

    def train(
        self,
        rows: TextRows,
        plan: LocalTraining,
        phase: str,
        start: AdapterState,
        context: Context,
    ) -> tuple[FinetuneResult, float | None]:
        del start, context  # the bench keys its features by the current adapter
        bench, encoded = self.bench, rows.encoded
        key = rows_key(
            rows.examples,
            bench.labels,
            bench.fingerprint,
            bench.config.model.max_length,
        )
        result = train_phase(
            bench.model,
            encoded,
            bench.pad_id,
            plan,
            phase,
            lambda: bench.features_of(encoded, key),
        )
        return result, None

    def state(self) -> AdapterState:
        return self.bench.state()

    def evaluate(self, examples: list[Example]) -> EvalResult:
        rows = self.encode(examples)
        return evaluate(self.bench.model, rows.encoded, self.bench.pad_id)

    def label_counts(self, rows: TextRows, num_labels: int) -> np.ndarray:
        return np.bincount(rows.encoded.labels, minlength=num_labels)


def _causal_lm_trainee(bench: Any, config: RunConfig) -> SiteModel:
    return CausalLMSite(
        config,
        bench.model,
        bench.tokenizer,
        bench.pad_id,
        bench.fingerprint,
        cache_dir=None,
        caches=LmCaches(),
    )


def _image_trainee(bench: Any, config: RunConfig) -> SiteModel:
    return VisionSite(
        config,
        bench.model,
        bench.processor,
        bench.labels,
        bench.fingerprint,
        ImageCaches(),
    )


def _text_trainee(bench: Any, config: RunConfig) -> SiteModel:
    del config  # the bench's own configuration (DP-SGD is never used here)
    return WorkbenchText(bench)


#: Each task's workbench as a site model (the bench's model, trained in place).
TRAINEES: Mapping[Task, Callable[[Any, RunConfig], SiteModel]] = MappingProxyType(
    {
        TEXT_CLASSIFICATION: _text_trainee,
        CAUSAL_LM: _causal_lm_trainee,
        IMAGE_CLASSIFICATION: _image_trainee,
    }
)


def trainable(bench: RunBench) -> SiteModel:
    """The model of ``bench``, trained in place as a site of the run's task trains
    it, without DP (the non-private reference)."""
    # The baselines are the non-private reference for every task: no DP-SGD.
    config = dataclasses.replace(
        bench.config, dp=dataclasses.replace(bench.config.dp, enabled=False)
    )
    return TRAINEES[task_named(config.model.task)](bench, config)


def baseline_context(client: int) -> Context:
    """A fresh Flower context for one trainee (its state holds nothing yet)."""
    return Context(
        run_id=0, node_id=client, node_config={}, state=RecordDict(), run_config={}
    )


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


def open_run_bench(config: RunConfig) -> tuple[RunBench, list[list[Example]]]:
    """The run's workbench with the seeded initial adapter, and every simulated
    client's rows."""
    num_clients = default_num_clients(config.data, config.seed, config.sim.num_clients)
    clients = all_client_examples(config.data, config.seed, num_clients)
    bench = task_named(config.model.task).open_bench(
        config,
        run_labels(config.data, config.seed),
        evaluation_examples(config.data, config.seed),
    )
    return bench, clients


def train_centralized(config: RunConfig, output_dir: Path | None = None) -> Path:
    """Train one LoRA model on the union of every client's rows.

    Each "round" trains on as many samples as one federated round processes (see
    :func:`federated_samples_per_round`), then evaluates, so that ``metrics.jsonl`` can
    be read side by side with the federated run's (``eval_perplexity`` too for a
    causal language model).

    Returns
    -------
    Path
        The output folder, holding the same files as a federated run (and, with
        ``tracking.*`` keys, the same tracked records, tagged ``centralized``).
    """
    target = output_dir or (
        Path(config.output_dir)
        if config.output_dir
        else default_output_dir("centralized")
    )
    with open_tracker(
        config.tracking, target, "centralized", config.as_dict()
    ) as tracker:
        _train_centralized(config, target, tracker)
    return target


def _train_centralized(config: RunConfig, target: Path, tracker: Tracker) -> None:
    started = time.perf_counter()
    bench, clients = open_run_bench(config)
    model = trainable(bench)
    union = [example for rows in clients for example in rows]
    encoded = model.encode(union)
    if config.head.init == "closed-form":  # a text classifier (the config checks)
        assert isinstance(bench, Workbench)
        bench.solve_closed_form_head(
            encoded.encoded,
            rows_key(union, bench.labels, bench.fingerprint, config.model.max_length),
        )
    per_round = federated_samples_per_round(config, [len(rows) for rows in clients])
    context = baseline_context(0)
    outputs = RunOutputs(target, tracker=tracker)
    recorder = RoundRecorder(outputs, config.num_server_rounds)
    recorder.record(
        {
            "round": 0,
            "clients": 1,
            "train_loss": None,
            **bench.evaluate().as_metrics(),
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
            epochs=per_round / len(union),
            max_steps=0,
        )
        result, _ = model.train(encoded, plan, phase, bench.state(), context)
        recorder.record(
            {
                "round": server_round,
                "phase": phase,
                "clients": 1,
                "train_loss": result.train_loss,
                "train_samples": result.samples,
                **bench.evaluate().as_metrics(),
                "seconds": round(time.perf_counter() - round_started, 3),
            }
        )
    finish_run(bench, "centralized", outputs, recorder, bench.state(), started)


@contextmanager
def torch_threads(count: int) -> Iterator[None]:
    """Run the block with ``count`` torch threads, as a virtual client of
    ``sim.cpus-per-client`` CPUs trains (Ray gives it that many): on a busy machine a
    second thread waiting at every barrier made the baseline six times slower per
    step (docs/BENCHMARKS.md, first run)."""
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(count)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def local_only(config: RunConfig) -> list[dict[str, Any]]:
    """Each client trained alone, evaluated on the coordinator's evaluation rows
    (``eval_loss``, ``eval_accuracy``, and ``eval_perplexity`` for a causal language
    model) and, for a task with labels, on those of the labels the client holds
    (``own_domain_accuracy``: its own domain under ``column:domain``).

    Each client trains from the initial adapter for ``num-server-rounds`` rounds of
    ``local-epochs`` passes over its own rows, in the same phases as the federated run:
    the compute it spends there, without anybody else's knowledge.
    """
    bench, clients = open_run_bench(config)
    model = trainable(bench)
    initial = bench.state()
    results = []
    with (
        torch_threads(max(1, int(config.sim.cpus_per_client))),
        step_progress("clients trained alone", len(clients)) as advance,
    ):
        for client, examples in enumerate(clients):
            results.append(
                _train_alone(config, bench, model, initial, client, examples)
            )
            advance()
    return results


def _train_alone(
    config: RunConfig,
    bench: RunBench,
    model: SiteModel,
    initial: AdapterState,
    client: int,
    examples: list[Example],
) -> dict[str, Any]:
    """One client of :func:`local_only`: trained alone, then evaluated."""
    model.load_state(initial)
    encoded = model.encode(examples)
    context = baseline_context(client)
    for server_round in range(1, config.num_server_rounds + 1):
        phase = config.train.phase(server_round)
        plan = LocalTraining.from_config(
            config,
            phase,
            seed=config.seed * 100_003 + server_round * 1_009 + client,
        )
        model.train(encoded, plan, phase, bench.state(), context)
    row: dict[str, Any] = {
        "client": client,
        "rows": len(examples),
        **bench.evaluate().as_metrics(),
    }
    if bench.labels:  # a causal language model has no labels, so no own domain
        held = np.flatnonzero(model.label_counts(encoded, len(bench.labels)))
        own = bench.evaluate(labels=held.tolist())
        row["own_domain_accuracy"] = own.accuracy
        row["own_domain_rows"] = own.num_examples
    name, value = main_metric(row)
    log.info("client %d alone: %s %.4f on %d rows", client, name, value, len(examples))
    return row


def local_only_summary(results: list[dict[str, Any]]) -> dict[str, float]:
    """Mean, best and worst client of :func:`local_only` for each column of
    :data:`SUMMARISED` every client has (best is the lowest perplexity, the highest
    accuracy)."""
    summary: dict[str, float] = {}
    for key in SUMMARISED:
        if not results or any(key not in row for row in results):
            continue
        values = [row[key] for row in results]
        lowest_first = sorted(values)
        best, worst = lowest_first[0], lowest_first[-1]
        if key not in LOWER_IS_BETTER:
            best, worst = worst, best
        summary[f"mean_{key}"] = sum(values) / len(values)
        summary[f"worst_{key}"] = worst
        summary[f"best_{key}"] = best
    return summary
