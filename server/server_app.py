"""The ServerApp: the coordinator of a federated LoRA run.

A run, as data::

    run config -> (checkpoint to resume) -> label map + evaluation rows -> backbone
    (fingerprint, pooling) -> seeded initial global adapter -> FederatedLoRA rounds
    (see server.strategy; with dp.enabled, server.privacy's account rebuilt from the
    checkpoint's rows), each followed by a metrics line and a checkpoint
    -> adapter/ + merged/ + summary.json
"""

from __future__ import annotations

import logging
import math
import time
import uuid
from pathlib import Path
from typing import Any

from flwr.app import Context
from flwr.serverapp import Grid, ServerApp

from common.codec import AdapterState, build_codec, downlink_codec
from common.config import RunConfig
from common.outputs import RunOutputs, default_output_dir
from common.reporting import RoundRecorder
from common.splits import evaluation_examples, run_labels
from common.tasks import open_bench
from common.tracking.base import Tracker
from common.tracking.setup import open_tracker
from server.aggregation import build_rule
from server.checkpoint import Checkpoint, load_checkpoint, save_checkpoint
from server.privacy import ClientLevelDP, privacy_summary
from server.sampling import CohortSampler, SecretPoissonSampler, cohort_key
from server.secagg import SecureSum
from server.strategy import BackboneOffer, FederatedLoRA, StatefulRule, rule_state
from server.summation import PlainSum

log = logging.getLogger(__name__)


def coordinate(grid: Grid, config: RunConfig) -> Path:
    """Run every round of ``config`` over ``grid`` and write the outputs, also to
    the trackers ``tracking.*`` asks for.

    Returns
    -------
    Path
        The output folder.
    """
    output_dir = (
        Path(config.output_dir)
        if config.output_dir
        else default_output_dir("federated")
    )
    with open_tracker(
        config.tracking, output_dir, "federated", config.as_dict()
    ) as tracker:
        _coordinate(grid, config, output_dir, tracker)
    return output_dir


def _coordinate(
    grid: Grid, config: RunConfig, output_dir: Path, tracker: Tracker
) -> None:
    started = time.perf_counter()
    resumed = load_checkpoint(output_dir) if config.resume else None
    if resumed is not None:
        config.check_resumable_from(resumed.config)
        log.info("resuming %s after round %d", output_dir, resumed.server_round)
    labels = run_labels(config.data, config.seed)
    # The task's workbench (common.tasks): text classifier, causal LM or images.
    bench = open_bench(config, labels, evaluation_examples(config.data, config.seed))
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
        labels=labels,
        # With client-level DP the clients' noise (distributed mode) and unclipped
        # bits (adaptive clipping) ride in the secure sum, sized afresh each round.
        summer=SecureSum(
            config.secagg,
            config.seed,
            extras=privacy.ring_extras if privacy is not None else None,
            ring_bits=config.codec.secure_ring_bits,
            # Under client-level DP every site weighs 1: a slot off 1 is forged.
            unit_weights=config.dp.client_level,
        )
        if config.secagg.enabled
        else PlainSum(
            codec,
            config.update_norm_bound,
            flexible_rank=config.aggregation.rule == "flexlora",
            max_weight=config.train.max_weight,
        ),
        rule=rule,
        evaluate=bench.evaluate,
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
    bench.finish_run("federated", outputs, recorder, final, started, extra)
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
    """Entry point for ``flwr run``: the run config comes from pyproject and ``-c``."""
    coordinate(grid, RunConfig.from_flat(context.run_config))
