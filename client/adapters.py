"""What a site makes of the global adapter under each rule, and what it sends back.

One round at a site, for the adapter::

    global adapter -> starting adapter (FlexLoRA: refactorised at the site's rank;
    FedSA: the site's own B factors put back) -> train -> upload (the delta of what the
    phase and rule share; FlexLoRA: the trained factors themselves) -> encode (top-k:
    with error feedback) -> keep what stays (FedSA: the B factors; top-k: what it has
    not sent yet; both in the Flower context state, which client.site_state mirrors
    on the site's disk)

Everything here is numpy on named tensors (see :mod:`common.sharing`).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping

import numpy as np
from flwr.app import Context

from common.codec import AdapterState, Codec, TopKCodec, delta
from common.config import AGGREGATION_RULES, LoraSettings, RunConfig
from common.low_rank import at_rank
from common.sharing import is_head, kept_local, shared_subset
from common.wire import from_array_record, to_array_record

#: The Flower context-state record holding a site's own B factors (FedSA).
LOCAL_FACTORS_RECORD = "fedgraft-local-factors"
#: The Flower context-state record holding what top-k has not sent yet.
TOPK_RESIDUAL_RECORD = "fedgraft-topk-residual"
#: Node config key of a FlexLoRA site's rank.
SITE_RANK_KEY = "lora.r"


class SiteConfigError(ValueError):
    """A node config value is invalid; the message names the key."""


def site_lora(config: RunConfig, node_config: Mapping[str, object]) -> LoraSettings:
    """The LoRA settings this site trains with.

    Under a rule with site ranks (``flexlora``) a site may set its own rank with the
    node config ``lora.r`` (at most the run's ``lora.r``); every other rule uses the
    run's settings.

    Raises
    ------
    SiteConfigError
        When the node's rank is not an integer between 1 and the run's rank.
    """
    traits = AGGREGATION_RULES[config.aggregation.rule]
    if not traits.site_ranks or SITE_RANK_KEY not in node_config:
        return config.lora
    value = node_config[SITE_RANK_KEY]
    try:
        rank = int(str(value))
    except ValueError:
        rank = 0
    if not 1 <= rank <= config.lora.r:
        raise SiteConfigError(
            f"node config {SITE_RANK_KEY} = {value!r}: a FlexLoRA site's rank must be "
            f"an integer from 1 to the run's lora.r = {config.lora.r}"
        )
    return dataclasses.replace(config.lora, r=rank)


def starting_state(
    global_state: AdapterState, config: RunConfig, lora: LoraSettings, context: Context
) -> AdapterState:
    """The adapter the site starts this round from: the global one at the site's
    rank, with the factors it keeps (FedSA's B) in place: its personalised model."""
    state = site_view(global_state, config, lora)
    if has_personal_state(context):
        kept = from_array_record(context.state.array_records[LOCAL_FACTORS_RECORD])
        state.update({k: v for k, v in kept.items() if k in state})
    return state


def site_view(
    global_state: AdapterState, config: RunConfig, lora: LoraSettings
) -> AdapterState:
    """The global adapter as this site's model holds it (a FlexLoRA site's rank)."""
    if lora.r != config.lora.r:
        return at_rank(dict(global_state), lora.r, lora.alpha)
    return dict(global_state)


def has_personal_state(context: Context) -> bool:
    """Whether the site keeps tensors of its own (FedSA's B): its personalised
    model then differs from the global one."""
    return LOCAL_FACTORS_RECORD in context.state.array_records


def upload(
    trained: AdapterState, start: AdapterState, phase: str, rule: str
) -> AdapterState:
    """What goes back: the deltas of the tensors the phase and rule share.

    Under a rule that sends factors (``flexlora``) the LoRA factors go up as trained
    (clients of other ranks can only be combined through their products); the head
    still goes as a delta.
    """
    shared = shared_subset(start, phase, rule)
    change = delta(trained, shared)
    if AGGREGATION_RULES[rule].sends_factors:
        change.update(
            {k: np.asarray(trained[k], np.float32) for k in shared if not is_head(k)}
        )
    return change


def encode_upload(
    codec: Codec, change: AdapterState, context: Context
) -> dict[str, np.ndarray]:
    """The wire arrays of ``change``; top-k adds what it left out last time and keeps
    what it leaves out now (error feedback, in the site's context state)."""
    if not isinstance(codec, TopKCodec):
        return codec.encode(change)
    residual: AdapterState = {}
    if TOPK_RESIDUAL_RECORD in context.state.array_records:
        residual = from_array_record(context.state.array_records[TOPK_RESIDUAL_RECORD])
        # A residual of another shape (another phase's tensors) does not apply.
        residual = {
            k: v
            for k, v in residual.items()
            if k in change and v.shape == change[k].shape
        }
    arrays, left_out = codec.encode_with_feedback(change, residual)
    context.state[TOPK_RESIDUAL_RECORD] = to_array_record(left_out)
    return arrays


def keep_local(trained: AdapterState, rule: str, context: Context) -> None:
    """Store the tensors the rule keeps at the site (FedSA's B) in its context."""
    names = kept_local(trained, rule)
    if names:
        context.state[LOCAL_FACTORS_RECORD] = to_array_record(
            {k: trained[k] for k in names}
        )


__all__ = [
    "LOCAL_FACTORS_RECORD",
    "TOPK_RESIDUAL_RECORD",
    "SiteConfigError",
    "encode_upload",
    "has_personal_state",
    "keep_local",
    "site_lora",
    "site_view",
    "starting_state",
    "upload",
]
