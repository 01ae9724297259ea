"""The ClientApp: what a data-owning site does with the coordinator's messages.

One training round, as data::

    instructions -> locate backbone (or ask for it) -> global adapter -> starting
    adapter (client.adapters: the site's rank, its own kept factors) -> local rows
    -> train this round's phase -> upload (deltas of what is shared) -> (DP: clip to
    the round's C; distributed: add this site's share of the noise; adaptive
    clipping: the bit ||delta|| <= C rides in the mask) -> encode or mask -> reply

Only the encoded delta, ``num-examples`` and training metrics leave the site.

An evaluation (``@app.evaluate``), when the sites evaluate (``eval.where``)::

    instructions -> global adapter -> the site's evaluation rows (checked against
    the declared label map) -> summable totals (examples, correct, loss sum,
    tokens) -> masked (secure aggregation) or in the clear, with the personalised
    model's score (FedSA's own B; plain rounds without DP)

Node config keys (``--node-config``): ``data-path`` (the site's own file),
``partition-id`` / ``num-partitions`` (simulation), ``backbone-path`` (the site's own
copy of the backbone), ``cache-dir`` (received backbones and tokenised data),
``eval-path`` (the site's own evaluation rows; without it a site with ``data-path``
holds out ``data.holdout-fraction`` of its file when the sites evaluate),
``lora.r`` (a FlexLoRA site's rank), ``state-dir`` (what the site keeps between
rounds, so that a resumed run has it: client.site_state) and the site's own DP
limits ``dp-min-noise-multiplier``, ``dp-max-clip-norm``, ``dp-max-epsilon`` and
``dp-delta`` (client.site_privacy), and the secure-aggregation policy (floors,
roster and signing key: ``client.site_policy``).
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
from client.coordinator_request import (
    MAX_CLIENTS,
    CoordinatorRequest,
    MalformedRequest,
)
from client.site_privacy import (
    admit_round,
    admit_sample_round,
    round_noise_multiplier,
)
from client.site_state import SiteState, site_folder
from client.sites import SiteRequest, SiteRuntime
from common import dp, keys
from common.backbone import (
    BackboneError,
    backbone_cache,
    default_cache_dir,
    locate_on_site,
    store_bundle,
)
from common.codec import AdapterState, build_codec, dense_reference, downlink_codec
from common.config import AGGREGATION_RULES, RunConfig
from common.data import Example
from common.evaluation import EvalResult, EvalTotals
from common.secagg.encoding import flatten
from common.secagg.label_sums import HEAD_TENSORS
from common.splits import checked_site_rows, client_examples, site_evaluation_rows
from common.wire import from_array_record, json_field, to_array_record

if TYPE_CHECKING:  # torch loads only when a site trains or evaluates
    from client.finetune import FinetuneResult
    from client.sites import SiteModel

log = logging.getLogger(__name__)

app = ClientApp()
#: What this process keeps between messages: each task's loaded model and rows.
SITE_RUNTIME = SiteRuntime()

#: The largest clip norm, noise multiplier or count std a site accepts (finite
#: values far beyond any useful setting; NaN and infinity never pass).
_DP_LIMIT = 1e12


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
    sites_evaluate: bool = False
    # Client-level DP of the round: C (adaptive clipping moves it), the delta's
    # noise multiplier and sigma_b; the config's values when the coordinator sent none.
    dp_clip_norm: float = 0.0
    dp_noise_multiplier: float = 0.0
    dp_count_stddev: float = 0.0

    @classmethod
    def from_message(cls, message: Message) -> Instructions:
        """Decode and validate every field (the run config is re-validated on this
        side; client.coordinator_request checks the rest).

        Raises
        ------
        MalformedRequest
            Naming a field of the wrong type or out of range.
        """
        request = CoordinatorRequest.of(
            message, keys.CONFIG_RECORD, message.metadata.message_type
        )
        record = request.record
        config = RunConfig.from_flat(json_field(record, keys.CFG_RUN_CONFIG))
        labels = json_field(record, keys.CFG_LABELS)
        if not (isinstance(labels, list) and all(isinstance(x, str) for x in labels)):
            raise MalformedRequest(
                f"the coordinator's '{keys.CFG_LABELS}' must be a JSON list of label "
                "names; refusing the message"
            )
        expected_clients = request.integer(
            keys.CFG_EXPECTED_CLIENTS, 0, MAX_CLIENTS, 0
        )
        if config.dp.client_level and config.dp.mode == "distributed":
            if expected_clients < 1:
                raise MalformedRequest(
                    "the coordinator asks for distributed DP without the number of "
                    f"sites m that share the noise ('{keys.CFG_EXPECTED_CLIENTS}' = "
                    f"{expected_clients}); refusing the message"
                )
        return cls(
            config=config,
            backbone_ref=request.text(keys.CFG_BACKBONE_REF),
            fingerprint=request.text(keys.CFG_BACKBONE_FINGERPRINT),
            pooling=request.text(keys.CFG_POOLING),
            labels=tuple(labels),
            server_round=request.server_round(keys.CFG_ROUND),
            expected_clients=expected_clients,
            run_identity=request.text(keys.CFG_RUN_IDENTITY, ""),
            sites_evaluate=request.flag(keys.CFG_SITES_EVALUATE, False),
            dp_clip_norm=request.number(
                keys.CFG_DP_CLIP_NORM, 0.0, _DP_LIMIT, config.dp.clip_norm
            ),
            dp_noise_multiplier=request.number(
                keys.CFG_DP_NOISE_MULTIPLIER,
                0.0,
                _DP_LIMIT,
                config.dp.noise_multiplier,
            ),
            dp_count_stddev=request.number(
                keys.CFG_DP_COUNT_STDDEV, 0.0, _DP_LIMIT, 0.0
            ),
        )


def _cache_dir(context: Context) -> Path:
    configured = str(context.node_config.get("cache-dir", ""))
    return Path(configured).expanduser() if configured else default_cache_dir()


def _partition(context: Context) -> tuple[int, int]:
    node = context.node_config
    return int(node.get("partition-id", 0)), int(node.get("num-partitions", 1))  # type: ignore[arg-type]


def _node_path(context: Context, key: str) -> str:
    return str(context.node_config.get(key, ""))


def _site_rows(
    task: Instructions, context: Context
) -> tuple[list[Example], list[Example]]:
    """The site's training rows and the evaluation rows it can score, checked
    against the declared label map (an undeclared training label stops the site)."""
    config = task.config
    partition_id, num_partitions = _partition(context)
    data_path = _node_path(context, "data-path")
    eval_path = _node_path(context, "eval-path")
    train_rows = client_examples(
        config.data,
        config.seed,
        partition_id,
        num_partitions,
        site_data_path=data_path,
        hold_out=task.sites_evaluate and not eval_path,
    )
    evaluation = (
        site_evaluation_rows(
            config.data, config.seed, partition_id, num_partitions, data_path, eval_path
        )
        if task.sites_evaluate
        else []
    )
    return train_rows, checked_site_rows(train_rows, evaluation, task.labels)


def _open_site(
    message: Message, context: Context
) -> tuple[Instructions, SiteModel, AdapterState] | Message:
    """The message's instructions, the task's site model and the received global
    adapter; or, when the site has no copy of the backbone, the reply that asks
    for it."""
    try:
        task = Instructions.from_message(message)
    except MalformedRequest as refusal:
        log.error("refused by this site: %s", refusal)
        raise
    config = task.config
    cache_dir = _cache_dir(context)
    site_backbone = _node_path(context, "backbone-path")
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

    # torch and transformers load only here: a SuperNode starts a fresh process for
    # every message, and the secure-aggregation stages need neither.
    lora = adapters.site_lora(config, context.node_config)
    # The task's model (client.sites): text classifier, causal LM or image classifier.
    site = SITE_RUNTIME.open_site(
        SiteRequest(
            config,
            backbone_dir,
            task.fingerprint,
            lora,
            task.pooling,
            task.labels,
            cache_dir,
        )
    )
    received = from_array_record(message.content.array_records[keys.ADAPTER_RECORD])
    # Decoding needs no seed: only an encoder's stochastic rounding does.
    codec = downlink_codec(build_codec(config.codec.name, config.codec.topk_fraction))
    return task, site, codec.decode(received, dense_reference(received))


def _status_reply(message: Message, kind: str) -> Message:
    return Message(
        RecordDict({keys.STATUS_RECORD: ConfigRecord({keys.STATUS_KIND: kind})}),
        reply_to=message,
    )


@app.train()
def train(message: Message, context: Context) -> Message:
    """Fine-tune the global adapter on the site's rows and reply with the delta."""
    opened = _open_site(message, context)
    if isinstance(opened, Message):
        return opened
    task, site, global_state = opened
    config = task.config
    cache_dir = _cache_dir(context)
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
    from client.finetune import LocalTraining

    partition_id, _ = _partition(context)
    examples, _ = _site_rows(task, context)
    encoded = site.encode(examples)
    # One seed per site and round: the codec's rounding noise and the batch order.
    round_seed = config.seed * 100_003 + task.server_round * 1_009 + partition_id
    codec = build_codec(
        config.codec.name,
        config.codec.topk_fraction,
        seed=round_seed,
    )
    lora = adapters.site_lora(config, context.node_config)
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
    per_label = AGGREGATION_RULES[config.aggregation.rule].sends_label_counts
    counts = site.label_counts(encoded, len(task.labels)) if per_label else None
    if secure:
        # The example count travels only inside the masked vector; under DP every
        # client weighs the same (max-weight encodes as weight 1), so not even the
        # sum of the row counts comes out.
        flat = flatten(change)
        noise = _distributed_noise(task, flat.size)
        masked, notes = secagg.masked_update(
            context,
            message.content.config_records[keys.SECAGG_RECORD],
            task.server_round,
            flat,
            config.secagg.max_weight if config.dp.enabled else result.num_examples,
            noise=noise,
            tail=_unclipped_bit(task, unclipped),
            model_hash=secagg.received_model_hash(message),
            label_counts=counts,
            # The round may share no head (a phase that trains none).
            head=change if all(k in change for k in HEAD_TENSORS) else None,
            noise_shares=task.expected_clients if noise is not None else 0,
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
    if counts is not None:
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


@app.evaluate()
def evaluate(message: Message, context: Context) -> Message:
    """Score the global model on the site's evaluation rows; reply with summable
    totals only (:class:`common.evaluation.EvalTotals`), masked behind secure
    aggregation. In plain rounds without DP a site with personalised state (FedSA's
    own B) also scores its personalised model."""
    opened = _open_site(message, context)
    if isinstance(opened, Message):
        return opened
    task, site, global_state = opened
    config = task.config
    _, rows = _site_rows(task, context)
    lora = adapters.site_lora(config, context.node_config)
    site_state = _site_state(task, context, _cache_dir(context))
    if site_state is not None:  # what it kept after this round (FedSA's own B)
        site_state.restore(context, task.server_round + 1)
    site.load_state(adapters.site_view(global_state, config, lora))
    totals = EvalTotals.of(site.evaluate(rows) if rows else None)
    log.info(
        "round %d: scored the global model on %d evaluation rows",
        task.server_round,
        totals.examples,
    )
    if keys.SECAGG_RECORD in message.content.config_records:
        masked, notes = secagg.masked_totals(
            context,
            message.content.config_records[keys.SECAGG_RECORD],
            task.server_round,
            totals.as_vector(),
            model_hash=secagg.received_model_hash(message),
        )
        content = RecordDict({keys.MASKED_RECORD: masked, keys.SECAGG_RECORD: notes})
        return Message(content, reply_to=message)
    metrics: dict[str, float] = {
        keys.EVAL_EXAMPLES: totals.examples,
        keys.EVAL_CORRECT: totals.correct,
        keys.EVAL_LOSS_SUM: totals.loss_sum,
        keys.EVAL_TOKENS: totals.tokens,
    }
    # The personalised model was trained on the site's rows, which DP does not
    # account for beyond the update it released: its score goes up only without DP.
    if rows and adapters.has_personal_state(context) and not config.dp.enabled:
        site.load_state(adapters.starting_state(global_state, config, lora, context))
        metrics.update(_personal_metrics(site.evaluate(rows)))
    return Message(
        RecordDict({keys.METRICS_RECORD: MetricRecord(metrics)}), reply_to=message
    )


@app.query(keys.ACTION_HEAD_STATISTICS)
def head_statistics(message: Message, context: Context) -> Message:
    """``head.init = closed-form``: the sums of the pooled features of the site's
    training rows under the received model, by label (counts, class sums and, for
    lda and ridge, the Gram matrix), in the clear or masked; nothing else leaves
    the site."""
    opened = _open_site(message, context)
    if isinstance(opened, Message):
        return opened
    task, site, global_state = opened
    config = task.config
    from client.sites import TextSite

    if not isinstance(site, TextSite):
        raise TypeError(
            f"head.init = closed-form needs a text classifier, not model.task = "
            f"{config.model.task}"
        )
    site.load_state(
        adapters.site_view(
            global_state, config, adapters.site_lora(config, context.node_config)
        )
    )
    examples, _ = _site_rows(task, context)
    statistics = site.class_statistics(site.encode(examples), len(task.labels))
    log.info(
        "closed-form head: summed the features of %d rows", int(statistics.counts.sum())
    )
    if keys.SECAGG_RECORD in message.content.config_records:
        max_rows = config.secagg.max_weight
        if len(examples) > max_rows:
            raise ValueError(
                f"this site holds {len(examples)} rows, above secagg.max-weight = "
                f"{max_rows:g} that the secure statistics round is sized for; raise "
                "secagg.max-weight"
            )
        masked, notes = secagg.masked_statistics(
            context,
            message.content.config_records[keys.SECAGG_RECORD],
            task.server_round,
            statistics.to_vector(),
            config.head.feature_clip,
            max_rows,
            model_hash=secagg.received_model_hash(message),
        )
        content = RecordDict({keys.MASKED_RECORD: masked, keys.SECAGG_RECORD: notes})
        return Message(content, reply_to=message)
    arrays = {"counts": statistics.counts, "sums": statistics.sums}
    if statistics.gram is not None:
        arrays["gram"] = statistics.gram
    return Message(
        RecordDict({keys.STATISTICS_RECORD: to_array_record(arrays)}),
        reply_to=message,
    )


def _personal_metrics(result: EvalResult) -> dict[str, float]:
    """The personalised model's score: accuracy, or a causal LM's perplexity."""
    if result.perplexity is not None:
        return {keys.PERSONAL_PERPLEXITY: result.perplexity}
    return {keys.PERSONAL_ACCURACY: result.accuracy}


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
