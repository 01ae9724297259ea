"""The causal language model's checks of a whole configuration.

Each message ends with ``(model.task = causal-lm)``: the key named is refused only
because of the task.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from common.config.aggregation_rules import AGGREGATION_RULES
from common.config.errors import Refusal, refuse_if

if TYPE_CHECKING:
    from common.config import RunConfig


def _refuse_if(refused: bool, key: str, message: str) -> Refusal | None:
    return refuse_if(refused, key, f"{message} (model.task = causal-lm)")


def causal_lm_pools_nothing(config: RunConfig) -> Refusal | None:
    """A causal LM has no pooling to choose."""
    return _refuse_if(
        config.model.pooling != "native",
        "model.pooling",
        "a causal language model pools nothing; leave model.pooling = native",
    )


def causal_lm_has_no_head(config: RunConfig) -> Refusal | None:
    """A causal LM has no classification head to describe labels to."""
    return _refuse_if(
        bool(config.head.label_descriptions),
        "head.label-descriptions",
        "a causal language model has no classification head",
    )


def causal_lm_has_no_head_to_solve(config: RunConfig) -> Refusal | None:
    """A causal LM has no classification head for the closed form to solve."""
    return _refuse_if(
        config.head.init == "closed-form",
        "head.init",
        "head.init = closed-form solves a classification head, which a causal "
        "language model does not have",
    )


def causal_lm_trains_adapters_only(config: RunConfig) -> Refusal | None:
    """A causal LM has no head for ``head`` or ``lp-ft`` rounds to train."""
    mode = config.train.mode
    return _refuse_if(
        mode != "lora",
        "train.mode",
        f"train.mode = {mode} trains a classification head, which a causal "
        "language model does not have; use train.mode = lora",
    )


def causal_lm_sends_no_label_counts(config: RunConfig) -> Refusal | None:
    """A causal LM has neither head rows nor labels to average per label."""
    rule = config.aggregation.rule
    return _refuse_if(
        AGGREGATION_RULES[rule].sends_label_counts,
        "aggregation",
        f"{rule} averages head rows per label, but a causal "
        "language model has neither; use fedavg or another rule",
    )


def causal_lm_rows_have_no_labels(config: RunConfig) -> Refusal | None:
    """A label-skewed partition needs labels."""
    return _refuse_if(
        config.data.partition == "dirichlet",
        "data.partition",
        "dirichlet skews labels, but causal language model rows have none; use "
        "iid or column:<name>",
    )


def causal_lm_has_no_label_map(config: RunConfig) -> Refusal | None:
    """A causal LM has no labels to map."""
    return _refuse_if(
        bool(config.data.labels),
        "data.labels",
        "a causal language model has no label map; leave data.labels empty",
    )


def instruction_data_needs_a_path(config: RunConfig) -> Refusal | None:
    """The built-in demo corpus is plain text, not instructions."""
    data = config.data
    return _refuse_if(
        bool(data.prompt_column) and not data.path,
        "data.prompt-column",
        "instruction data needs data.path (the built-in demo corpus is plain "
        "text); set data.path or leave data.prompt-column empty",
    )


def instruction_data_names_its_response(config: RunConfig) -> Refusal | None:
    """Instruction data's loss covers the response column, which must be named."""
    data = config.data
    return _refuse_if(
        bool(data.prompt_column) and not data.response_column,
        "data.response-column",
        "name the response column of the instruction data",
    )


RULES = (
    causal_lm_pools_nothing,
    causal_lm_has_no_head,
    causal_lm_has_no_head_to_solve,
    causal_lm_trains_adapters_only,
    causal_lm_sends_no_label_counts,
    causal_lm_rows_have_no_labels,
    causal_lm_has_no_label_map,
    instruction_data_needs_a_path,
    instruction_data_names_its_response,
)
