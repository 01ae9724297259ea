"""The ClientApp: what a data-owning site does with the coordinator's messages.

One training round, as data::

    instructions -> locate backbone (or ask for it) -> set global adapter
    -> local rows -> finetune -> delta = local - global -> encode -> reply

Only the encoded delta, ``num-examples`` and training metrics leave the site.

Node config keys (``--node-config``): ``data-path`` (the site's own file),
``partition-id`` / ``num-partitions`` (simulation), ``backbone-path`` (the site's own
copy of the backbone) and ``cache-dir`` (received backbones and tokenised data).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from flwr.app import ConfigRecord, Context, Message, MetricRecord, RecordDict
from flwr.clientapp import ClientApp

from client import secagg
from common import keys
from common.backbone import (
    BackboneError,
    backbone_cache,
    default_cache_dir,
    locate_on_site,
    store_bundle,
)
from common.codec import Float32Codec, delta
from common.config import RunConfig
from common.secagg.encoding import flatten
from common.splits import client_examples
from common.wire import from_array_record, json_field, to_array_record

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

    @classmethod
    def from_record(cls, record: ConfigRecord) -> Instructions:
        """Decode and validate (the run config is re-validated on this side)."""
        return cls(
            config=RunConfig.from_flat(json_field(record, keys.CFG_RUN_CONFIG)),
            backbone_ref=str(record[keys.CFG_BACKBONE_REF]),
            fingerprint=str(record[keys.CFG_BACKBONE_FINGERPRINT]),
            pooling=str(record[keys.CFG_POOLING]),
            labels=tuple(json_field(record, keys.CFG_LABELS)),
            server_round=int(record[keys.CFG_ROUND]),  # type: ignore[arg-type]
        )


def _cache_dir(context: Context) -> Path:
    configured = str(context.node_config.get("cache-dir", ""))
    return Path(configured).expanduser() if configured else default_cache_dir()


def _partition(context: Context) -> tuple[int, int]:
    node = context.node_config
    return int(node.get("partition-id", 0)), int(node.get("num-partitions", 1))  # type: ignore[arg-type]


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

    # torch and transformers load only here: a SuperNode starts a fresh process for
    # every message, and the secure-aggregation stages need neither.
    from client.finetune import LocalTraining, finetune
    from client.runtime import encoded_examples, loaded_backbone
    from common.model import adapter_state, load_adapter_state

    backbone = loaded_backbone(
        backbone_dir,
        task.fingerprint,
        config.lora,
        task.pooling,
        len(task.labels),
        config.seed,
    )
    partition_id, num_partitions = _partition(context)
    examples = client_examples(
        config.data,
        config.seed,
        partition_id,
        num_partitions,
        site_data_path=str(context.node_config.get("data-path", "")),
    )
    encoded = encoded_examples(
        examples,
        task.labels,
        backbone,
        task.fingerprint,
        config.model.max_length,
        cache_dir,
    )
    codec = Float32Codec()
    global_state = codec.decode(
        from_array_record(message.content.array_records[keys.ADAPTER_RECORD])
    )
    load_adapter_state(backbone.model, global_state)
    plan = LocalTraining(
        epochs=config.train.local_epochs,
        max_steps=config.train.max_steps,
        batch_size=config.train.batch_size,
        lr=config.train.lr,
        weight_decay=config.train.weight_decay,
        seed=config.seed * 100_003 + task.server_round * 1_009 + partition_id,
    )
    result = finetune(backbone.model, encoded, backbone.pad_id, plan)
    change = delta(adapter_state(backbone.model), global_state)
    log.info(
        "round %d: trained %d samples on %s in %.1fs, loss %.4f",
        task.server_round,
        result.samples,
        result.device,
        result.seconds,
        result.train_loss,
    )
    metrics = {
        keys.TRAIN_LOSS: result.train_loss,
        keys.TRAIN_SECONDS: result.seconds,
        keys.ON_CUDA: int(result.device == "cuda"),
    }
    if keys.SECAGG_RECORD in message.content.config_records:
        # The example count travels only inside the masked vector.
        masked, notes = secagg.masked_update(
            context,
            message.content.config_records[keys.SECAGG_RECORD],
            task.server_round,
            flatten(change),
            result.num_examples,
        )
        content = RecordDict(
            {
                keys.MASKED_RECORD: masked,
                keys.METRICS_RECORD: MetricRecord(metrics),
                keys.SECAGG_RECORD: notes,
            }
        )
        return Message(content, reply_to=message)
    metrics.update(
        {keys.NUM_EXAMPLES: result.num_examples, keys.TRAIN_SAMPLES: result.samples}
    )
    content = RecordDict(
        {
            keys.ADAPTER_RECORD: to_array_record(codec.encode(change)),
            keys.METRICS_RECORD: MetricRecord(metrics),
        }
    )
    if config.aggregation.rule == "fedavg-per-label":
        counts = np.bincount(encoded.labels, minlength=len(task.labels))
        content[keys.LABEL_COUNTS_RECORD] = to_array_record(
            {"counts": counts.astype(np.float32)}
        )
    return Message(content, reply_to=message)


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
app.query(keys.ACTION_SECAGG_UNMASK)(secagg.unmask)
