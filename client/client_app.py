"""The ClientApp: what a data-owning site does with the coordinator's messages.

One training round, as data::

    instructions -> locate backbone (or ask for it) -> global adapter -> starting
    adapter (client.adapters: the site's rank, its own kept factors) -> local rows
    -> train this round's phase -> upload (deltas of what is shared) -> (DP: clip to
    the round's C; distributed: add this site's share of the noise; adaptive
    clipping: the bit ||delta|| <= C rides in the mask) -> encode or mask -> reply

Only the encoded delta, ``num-examples`` and training metrics leave the site.

Node config keys (``--node-config``): ``data-path`` (the site's own file),
``partition-id`` / ``num-partitions`` (simulation), ``backbone-path`` (the site's own
copy of the backbone), ``cache-dir`` (received backbones and tokenised data),
``eval-path`` (the site's own evaluation rows, for FedSA's personalised accuracy or
perplexity), ``lora.r`` (a FlexLoRA site's rank), ``state-dir`` (what the site
keeps between rounds, so that a resumed run has it: client.site_state) and the
site's own DP limits ``dp-min-noise-multiplier``, ``dp-max-clip-norm``,
``dp-max-epsilon`` and ``dp-delta`` (client.site_privacy),
and the secure-aggregation policy (floors, roster and signing key:
``client.site_policy``).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
from flwr.app import ConfigRecord, Context, Message, MetricRecord, RecordDict
from flwr.clientapp import ClientApp

from client import adapters, secagg
from client.site_privacy import (
    admit_round,
    admit_sample_round,
    round_noise_multiplier,
)
from client.site_state import SiteState, site_folder
from common import dp, keys
from common.backbone import (
    BackboneError,
    backbone_cache,
    default_cache_dir,
    locate_on_site,
    store_bundle,
)
from common.codec import build_codec, dense_reference, downlink_codec
from common.config import RunConfig
from common.data import Example
from common.secagg.encoding import flatten
from common.splits import client_examples, evaluation_examples, read_rows
from common.wire import from_array_record, json_field, to_array_record

if TYPE_CHECKING:  # torch loads only when a site trains
    from client.finetune import FinetuneResult

log = logging.getLogger(__name__)

app = ClientApp()


@dataclass(frozen=True)
class Instructions:
    """A round's instructions, decoded from the message's config record."""

    config: RunConfig
    backbone_ref: str
    fingerprint: str
    pooling: str
    labels: tuple[str, ...]
    server_round: int
    expected_clients: int
    # The coordinator's run identity (empty from a coordinator that sends none):
    # the site's kept state (client.site_state) is filed under it.
    run_identity: str = ""
    # Client-level DP of the round: C (adaptive clipping moves it), the delta's
    # noise multiplier and sigma_b; the config's values when the coordinator sent none.
    dp_clip_norm: float = 0.0
    dp_noise_multiplier: float = 0.0
    dp_count_stddev: float = 0.0

    @classmethod
    def from_record(cls, record: ConfigRecord) -> Instructions:
        """Decode and validate (the run config is re-validated on this side)."""
        config = RunConfig.from_flat(json_field(record, keys.CFG_RUN_CONFIG))
        return cls(
            config=config,
            backbone_ref=str(record[keys.CFG_BACKBONE_REF]),
            fingerprint=str(record[keys.CFG_BACKBONE_FINGERPRINT]),
            pooling=str(record[keys.CFG_POOLING]),
            labels=tuple(json_field(record, keys.CFG_LABELS)),
            server_round=int(record[keys.CFG_ROUND]),  # type: ignore[arg-type]
            expected_clients=int(record.get(keys.CFG_EXPECTED_CLIENTS, 0)),  # type: ignore[arg-type]
            run_identity=str(record.get(keys.CFG_RUN_IDENTITY, "")),
            dp_clip_norm=float(
                record.get(keys.CFG_DP_CLIP_NORM, config.dp.clip_norm)  # type: ignore[arg-type]
            ),
            dp_noise_multiplier=float(
                record.get(keys.CFG_DP_NOISE_MULTIPLIER, config.dp.noise_multiplier)  # type: ignore[arg-type]
            ),
            dp_count_stddev=float(record.get(keys.CFG_DP_COUNT_STDDEV, 0.0)),  # type: ignore[arg-type]
        )


def _cache_dir(context: Context) -> Path:
    configured = str(context.node_config.get("cache-dir", ""))
    return Path(configured).expanduser() if configured else default_cache_dir()


def _partition(context: Context) -> tuple[int, int]:
    node = context.node_config
    return int(node.get("partition-id", 0)), int(node.get("num-partitions", 1))  # type: ignore[arg-type]


def _site_evaluation_rows(
    config: RunConfig,
    context: Context,
    examples: list[Example],
    labels: tuple[str, ...],
) -> list[Example]:
    """The rows a site evaluates its personalised model on (FedSA).

    The site's own file (node config ``eval-path``) if it has one, else, in
    simulation, the run's evaluation rows (the coordinator's held-out set). A
    classifier keeps the rows of its labels: the run's from its own file, and from
    the held-out set those it trains on (its own domain). A causal language model
    (no label map) keeps every row: its rows have no label to select a domain by.
    """
    eval_path = str(context.node_config.get("eval-path", ""))
    if eval_path:
        rows, kept = read_rows(eval_path, config.data), set(labels)
    else:
        rows = evaluation_examples(config.data, config.seed)
        kept = {example.label for example in examples}
    if not labels:
        return rows
    return [row for row in rows if row.label in kept]


def _status_reply(message: Message, kind: str) -> Message:
    return Message(
        RecordDict({keys.STATUS_RECORD: ConfigRecord({keys.STATUS_KIND: kind})}),
        reply_to=message,
    )


@app.train()
def train(message: Message, context: Context) -> Message:
    """Fine-tune the global adapter on the site's rows and reply with the delta."""
    task = Instructions.from_record(message.content.config_records[keys.CONFIG_RECORD])
    config = task.config
    cache_dir = _cache_dir(context)
    site_backbone = str(context.node_config.get("backbone-path", ""))
    backbone_dir = locate_on_site(
        task.backbone_ref, task.fingerprint, cache_dir, site_backbone
    )
    if backbone_dir is None:
        if config.model.distribute == "never":
            raise BackboneError(
                f"this site has no copy of backbone {task.backbone_ref!r} "
                f"({task.fingerprint[:12]}) and model.distribute = never; "
                "install it or "
                "set the node config backbone-path"
            )
        return _status_reply(message, keys.STATUS_NEEDS_BACKBONE)

    # The site's own DP limits and ledger (client.site_privacy): refused here, before
    # anything is trained, when the coordinator's round breaks them.
    admitted = admit_round(
        config,
        context.node_config,
        site_folder(context.node_config, cache_dir),
        round_noise_multiplier(
            task.dp_noise_multiplier, task.dp_count_stddev, config.dp.adaptive_clip
        ),
        task.dp_clip_norm,
    )
    # torch and transformers load only here: a SuperNode starts a fresh process for
    # every message, and the secure-aggregation stages need neither.
    from client.finetune import LocalTraining
    from client.sites import open_site

    lora = adapters.site_lora(config, context.node_config)
    # The task's model (client.sites): text classifier, causal LM or image classifier.
    site = open_site(
        config,
        backbone_dir,
        task.fingerprint,
        lora,
        task.pooling,
        task.labels,
        cache_dir,
    )
    partition_id, num_partitions = _partition(context)
    examples = client_examples(
        config.data,
        config.seed,
        partition_id,
        num_partitions,
        site_data_path=str(context.node_config.get("data-path", "")),
    )
    encoded = site.encode(examples)
    # One seed per site and round: the codec's rounding noise and the batch order.
    round_seed = config.seed * 100_003 + task.server_round * 1_009 + partition_id
    codec = build_codec(
        config.codec.name,
        config.codec.topk_fraction,
        seed=round_seed,
    )
    received = from_array_record(message.content.array_records[keys.ADAPTER_RECORD])
    global_state = downlink_codec(codec).decode(received, dense_reference(received))
    site_state = _site_state(task, context, cache_dir)
    if site_state is not None:
        site_state.restore(context, task.server_round)
    start = adapters.starting_state(global_state, config, lora, context)
    site.load_state(start)
    phase = config.train.phase(task.server_round)
    plan = LocalTraining.from_config(
        config,
        phase,
        seed=round_seed,
    )
    # With dp.level = sample every task's site trains with DP-SGD and reports epsilon;
    # its own budget over every run may refuse the round first.
    sample_admitted = admit_sample_round(
        config,
        context.node_config,
        site_folder(context.node_config, cache_dir),
        len(encoded),
        plan.batch_size,
        dp.dp_sgd_round_steps(
            len(encoded), plan.batch_size, plan.epochs, plan.max_steps
        ),
    )
    result, sample_epsilon = site.train(encoded, plan, phase, start, context)
    if sample_admitted is not None:
        sample_ledger, step_charge = sample_admitted
        sample_ledger.record(step_charge, result.steps)
    trained = site.state()
    change = adapters.upload(trained, start, phase, config.aggregation.rule)
    secure = keys.SECAGG_RECORD in message.content.config_records
    unclipped = None
    if config.dp.client_level:
        unclipped = dp.is_unclipped(change, task.dp_clip_norm)
        # Under adaptive clipping a plain sum's coordinator measures each norm
        # against C itself (it sees each delta anyway): the delta goes up whole.
        if not (config.dp.adaptive_clip and not secure):
            change = dp.clip_to_norm(change, task.dp_clip_norm)
    adapters.keep_local(trained, config.aggregation.rule, context)
    if admitted is not None:
        ledger, charge = admitted
        ledger.record(charge)
    log.info(
        "round %d (%s): trained %d samples on %s in %.1fs, loss %.4f",
        task.server_round,
        phase,
        result.samples,
        result.device,
        result.seconds,
        result.train_loss,
    )
    metrics = _site_metrics(config, secure, result, sample_epsilon)
    # FedSA's personal accuracy or perplexity is computed from the site's rows: it
    # goes up only where the train loss does (plain rounds without DP).
    if keys.TRAIN_LOSS in metrics and config.aggregation.rule == "fedsa":
        own = _site_evaluation_rows(config, context, examples, task.labels)
        if own:
            metrics.update(site.personal_metrics(own))
    if secure:
        # The example count travels only inside the masked vector; under DP every
        # client weighs the same (max-weight encodes as weight 1), so not even the
        # sum of the row counts comes out.
        flat = flatten(change)
        masked, notes = secagg.masked_update(
            context,
            message.content.config_records[keys.SECAGG_RECORD],
            task.server_round,
            flat,
            config.secagg.max_weight if config.dp.enabled else result.num_examples,
            noise=_distributed_noise(task, flat.size),
            tail=_unclipped_bit(task, unclipped),
            model_hash=secagg.received_model_hash(message),
        )
        content = RecordDict(
            {
                keys.MASKED_RECORD: masked,
                keys.METRICS_RECORD: MetricRecord(metrics),
                keys.SECAGG_RECORD: notes,
            }
        )
        if site_state is not None:
            site_state.save(context, task.server_round)
        return Message(content, reply_to=message)
    content = RecordDict(
        {
            keys.ADAPTER_RECORD: to_array_record(
                adapters.encode_upload(codec, change, context)
            ),
            keys.METRICS_RECORD: MetricRecord(metrics),
        }
    )
    if config.aggregation.rule == "fedavg-per-label":
        counts = site.label_counts(encoded, len(task.labels))
        content[keys.LABEL_COUNTS_RECORD] = to_array_record(
            {"counts": counts.astype(np.float32)}
        )
    if site_state is not None:
        site_state.save(context, task.server_round)
    return Message(content, reply_to=message)


def _site_metrics(
    config: RunConfig,
    secure: bool,
    result: FinetuneResult,
    sample_epsilon: float | None,
) -> dict[str, float]:
    """The figures that go up beside the update, per mode.

    Behind secure aggregation the coordinator is promised the sum alone: only
    ``on-cuda``. Under DP (plain sum) the figures DP does not account for stay too
    (train time, loss and samples all follow the site's rows): ``num-examples`` is 1,
    as every site weighs the same, and at sample level the site's own epsilon goes
    with it. A plain round without DP sends them all, ``num-examples`` capped at
    ``train.max-weight`` (the coordinator rejects a larger weight).
    """
    metrics: dict[str, float] = {keys.ON_CUDA: int(result.device == "cuda")}
    if secure:
        return metrics
    if config.dp.enabled:
        metrics[keys.NUM_EXAMPLES] = 1
        if sample_epsilon is not None:
            metrics[keys.SAMPLE_EPSILON] = sample_epsilon
        return metrics
    return metrics | {
        keys.TRAIN_SECONDS: result.seconds,
        keys.TRAIN_LOSS: result.train_loss,
        keys.NUM_EXAMPLES: min(result.num_examples, config.train.max_weight),
        keys.TRAIN_SAMPLES: result.samples,
    }


def _site_state(
    task: Instructions, context: Context, cache_dir: Path
) -> SiteState | None:
    """The site's kept state of this run on its disk (none without a run
    identity)."""
    if not task.run_identity:
        return None
    return SiteState(site_folder(context.node_config, cache_dir), task.run_identity)


def _distributed_noise(task: Instructions, size: int) -> np.ndarray | None:
    """This site's share of the DP noise, ``N(0, (sigma C)^2 / m)`` per coordinate
    (distributed mode only; the round's ``C`` and delta noise multiplier), from a
    CSPRNG-seeded generator."""
    config = task.config
    if not (config.dp.client_level and config.dp.mode == "distributed"):
        return None
    std = dp.distributed_noise_std(
        task.dp_noise_multiplier, task.dp_clip_norm, task.expected_clients
    )
    return dp.gaussian_noise(size, std, dp.secure_generator())


def _unclipped_bit(task: Instructions, unclipped: bool | None) -> np.ndarray | None:
    """Adaptive clipping behind secure aggregation: the centred bit ``b_i - 1/2``
    (plus, in distributed mode, this site's share ``N(0, sigma_b^2 / m)`` of the
    count's noise), to ride after the weight inside the masked vector."""
    if not task.config.dp.adaptive_clip or unclipped is None:
        return None
    bit = np.array([dp.centred_bit(unclipped)])  # (1,) float64
    if task.config.dp.mode != "distributed":
        return bit
    # m shares of variance sigma_b^2 / m: the count's noise, split like the delta's.
    std = dp.distributed_noise_std(task.dp_count_stddev, 1.0, task.expected_clients)
    return bit + dp.gaussian_noise(1, std, dp.secure_generator())


@app.query(keys.ACTION_BACKBONE)
def receive_backbone(message: Message, context: Context) -> Message:
    """Store the backbone files the coordinator sent, after checking the fingerprint."""
    record = message.content.config_records[keys.CONFIG_RECORD]
    expected = str(record[keys.CFG_BACKBONE_FINGERPRINT])
    files = from_array_record(message.content.array_records[keys.BACKBONE_RECORD])
    stored = store_bundle(files, expected, backbone_cache(_cache_dir(context)))
    log.info("stored backbone %s at %s", expected[:12], stored)
    return _status_reply(message, keys.STATUS_BACKBONE_STORED)


app.query(keys.ACTION_SECAGG_ADVERTISE)(secagg.advertise)
app.query(keys.ACTION_SECAGG_SHARE)(secagg.share_keys)
app.query(keys.ACTION_SECAGG_CONSISTENCY)(secagg.consistency)
app.query(keys.ACTION_SECAGG_UNMASK)(secagg.unmask)
