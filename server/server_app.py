"""The ServerApp: the coordinator of a federated LoRA run.

A run, as data::

    run config -> label map (declared, or read from the coordinator's rows) + who
    evaluates (eval.where) -> (checkpoint to resume) -> backbone (fingerprint,
    pooling) -> seeded initial global adapter -> FederatedLoRA rounds (see
    server.strategy; with dp.enabled, server.privacy's account rebuilt from the
    checkpoint's rows), each followed by a metrics line and a checkpoint
    -> adapter/ + merged/ + summary.json

In a deployment the coordinator never reads the demo corpus: what it needs and lacks
(the label map; evaluation rows with eval.where = coordinator) is refused before any
site is contacted, naming the key to set.
"""

from __future__ import annotations

import logging
import math
import time
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from flwr.app import Context
from flwr.serverapp import Grid, ServerApp

from common.codec import AdapterState, build_codec, downlink_codec
from common.config import AGGREGATION_RULES, ConfigError, RunConfig
from common.data import Example
from common.outputs import RunOutputs, default_output_dir
from common.reporting import RoundRecorder
from common.splits import coordinator_holds_data, evaluation_examples, run_labels
from common.tasks import task_named
from common.tasks.finish import finish_run
from common.tracking.base import Tracker
from common.tracking.setup import open_tracker
from server.aggregation import build_rule
from server.checkpoint import Checkpoint, load_checkpoint, save_checkpoint
from server.head_statistics import HeadStatistics
from server.privacy import ClientLevelDP, privacy_summary
from server.sampling import CohortSampler, SecretPoissonSampler, cohort_key
from server.secagg import SecureSum
from server.site_evaluation import SiteEvaluator
from server.strategy import BackboneOffer, FederatedLoRA, StatefulRule, rule_state
from server.summation import PlainSum

log = logging.getLogger(__name__)

#: The grid class of Flower's Simulation Engine (``flwr run`` on a local
#: simulation, ``run_simulation``): named, not imported, as it is not public API.
SIMULATION_GRID = "InMemoryGrid"


def evaluation_sides(config: RunConfig, demo: bool) -> tuple[bool, bool]:
    """Whether the coordinator and whether the sites evaluate (``eval.where``;
    ``auto``: the coordinator when it holds evaluation rows, and the sites too when
    they keep a personalised model to score; else the sites).

    Raises
    ------
    ConfigError
        When the coordinator must evaluate but holds no rows, naming the keys.
    """
    holds = coordinator_holds_data(config.data, demo)
    where = config.eval_where
    if where == "auto":
        personalised = AGGREGATION_RULES[config.aggregation.rule].personalised
        where = ("both" if personalised else "coordinator") if holds else "sites"
    if where in ("coordinator", "both") and not holds:
        raise ConfigError(
            f"config key 'eval.where' = {where} needs evaluation rows at the "
            "coordinator, which holds no data: set data.test-path (or data.path), "
            "or let the sites evaluate with eval.where = sites"
        )
    return where in ("coordinator", "both"), where in ("sites", "both")


@dataclass(frozen=True)
class Inputs:
    """What the coordinator starts from besides the config, checked before any
    site is contacted.

    Attributes
    ----------
    labels : tuple[str, ...]
        The label map (empty for a causal language model).
    rows : list[Example] or None
        The coordinator's evaluation rows; ``None`` when it does not evaluate.
    sites_evaluate : bool
        The sites evaluate the global model (``eval.where``).
    """

    labels: tuple[str, ...]
    rows: list[Example] | None
    sites_evaluate: bool


def coordinate(grid: Grid, config: RunConfig, deployment: bool = False) -> Path:
    """Run every round of ``config`` over ``grid`` and write the outputs, also to
    the trackers ``tracking.*`` asks for.

    Parameters
    ----------
    deployment : bool
        The sites are real (not simulated): the coordinator reads no demo corpus.

    Returns
    -------
    Path
        The output folder.

    Raises
    ------
    ConfigError, DataError
        Before any site is contacted, when the coordinator lacks the label map or
        the evaluation rows ``eval.where`` asks of it.
    """
    demo = not deployment
    labels = run_labels(
        config.data, config.seed, config.head.label_descriptions, demo=demo
    )
    at_coordinator, at_sites = evaluation_sides(config, demo)
    rows = (
        evaluation_examples(config.data, config.seed, demo) if at_coordinator else None
    )
    inputs = Inputs(labels, rows, at_sites)
    output_dir = (
        Path(config.output_dir)
        if config.output_dir
        else default_output_dir("federated")
    )
    with open_tracker(
        config.tracking, output_dir, "federated", config.as_dict()
    ) as tracker:
        _coordinate(grid, config, inputs, output_dir, tracker)
    return output_dir


def _coordinate(
    grid: Grid, config: RunConfig, inputs: Inputs, output_dir: Path, tracker: Tracker
) -> None:
    started = time.perf_counter()
    resumed = load_checkpoint(output_dir) if config.resume else None
    if resumed is not None:
        config.check_resumable_from(resumed.config)
        log.info("resuming %s after round %d", output_dir, resumed.server_round)
    # The task's model of the run (common.tasks): text classifier, causal LM, images.
    bench = task_named(config.model.task).open_bench(
        config, inputs.labels, inputs.rows or []
    )
    completed = resumed.rows if resumed else ()
    outputs = RunOutputs(output_dir, completed, tracker)
    recorder = RoundRecorder(outputs, config.num_server_rounds, completed)

    rule = build_rule(config)
    codec = build_codec(config.codec.name, config.codec.topk_fraction, config.seed)
    if resumed is not None and isinstance(rule, StatefulRule):
        rule.load_state_arrays(resumed.rule_state)
    privacy = (
        ClientLevelDP(
            config.dp,
            completed,
            # Adaptive clipping stays within the bound the secure sum is sized for.
            clip_ceiling=config.secagg.clip_norm if config.secagg.enabled else math.inf,
        )
        if config.dp.client_level
        else None
    )

    # The sites key the state they keep between rounds by this: a resumed run sends
    # the same identity (a checkpoint from before it existed gets a new one). A
    # nonce, not a secret: uuid4, leaving the secrets module's draws to the noise.
    run_identity = (resumed.run_identity if resumed else "") or uuid.uuid4().hex

    def after_round(metrics: dict[str, Any], state: AdapterState) -> None:
        recorder.record(metrics)
        checkpoint = Checkpoint(
            metrics["round"],
            state,
            config.as_dict(),
            recorder.rows,
            rule_state(rule),
            run_identity,
        )
        save_checkpoint(output_dir, checkpoint)

    strategy = FederatedLoRA(
        config=config,
        backbone=BackboneOffer(
            config.model.name, bench.fingerprint, bench.pooling, bench.backbone_dir
        ),
        labels=inputs.labels,
        # With client-level DP the clients' noise (distributed mode) and unclipped
        # bits (adaptive clipping) ride in the secure sum, sized afresh each round.
        summer=SecureSum(
            config.secagg,
            config.seed,
            extras=privacy.ring_extras if privacy is not None else None,
            ring_bits=config.codec.secure_ring_bits,
            # Under client-level DP every site weighs 1: a slot off 1 is forged.
            unit_weights=config.dp.client_level,
            label_sums=AGGREGATION_RULES[config.aggregation.rule].sends_label_counts,
        )
        if config.secagg.enabled
        else PlainSum(
            codec,
            config.update_norm_bound,
            flexible_rank=AGGREGATION_RULES[config.aggregation.rule].site_ranks,
            max_weight=config.train.max_weight,
        ),
        rule=rule,
        evaluate=bench.evaluate if inputs.rows is not None else None,
        on_round=after_round,
        downlink=lambda server_round: downlink_codec(
            build_codec(
                config.codec.name,
                config.codec.topk_fraction,
                seed=config.seed * 1_000_003 + server_round,
            )
        ),
        privacy=privacy,
        sampler=_secret_sampler(config, output_dir),
        run_identity=run_identity,
        sites=SiteEvaluator(
            config,
            SecureSum(config.secagg, config.seed) if config.secagg.enabled else None,
        )
        if inputs.sites_evaluate
        else None,
        head_statistics=HeadStatistics(
            config,
            len(inputs.labels),
            SecureSum(config.secagg, config.seed) if config.secagg.enabled else None,
        )
        if config.head.init == "closed-form"
        else None,
    )
    initial = bench.state() if resumed is None else resumed.state
    try:
        final = strategy.start(
            grid, initial, completed_rounds=resumed.server_round if resumed else 0
        )
    finally:
        recorder.close()
    extra: dict[str, Any] = {
        "stopped_early": strategy.stop_reason is not None,
        "stop_reason": strategy.stop_reason,
    }
    if config.dp.enabled:
        extra["privacy"] = privacy_summary(config.dp, privacy, recorder.rows)
    finish_run(bench, "federated", outputs, recorder, final, started, extra)
    if strategy.stop_reason is not None:
        print(strategy.stop_reason)


def _secret_sampler(config: RunConfig, output_dir: Path) -> CohortSampler | None:
    """Client-level DP with ``train.fraction < 1`` samples in secret (the
    amplification its account claims); every other run samples from its seed."""
    if not (config.dp.client_level and config.train.fraction < 1):
        return None
    return SecretPoissonSampler(cohort_key(output_dir), config.train.fraction)


def build_server_app(config: RunConfig) -> ServerApp:
    """A ServerApp bound to ``config`` (the Simulation Engine passes no run config)."""
    bound = ServerApp()

    @bound.main()
    def _main(grid: Grid, context: Context) -> None:
        coordinate(grid, config)

    return bound


app = ServerApp()


@app.main()
def main(grid: Grid, context: Context) -> None:
    """Entry point for ``flwr run``: the run config comes from pyproject and ``-c``.

    Flower's Simulation Engine drives the app through its in-memory grid; any other
    grid reaches real sites (a deployment).
    """
    deployment = type(grid).__name__ != SIMULATION_GRID
    coordinate(grid, RunConfig.from_flat(context.run_config), deployment=deployment)
