"""The image classifier's checks of a whole configuration."""

from __future__ import annotations

from typing import TYPE_CHECKING

from common.config.aggregation_rules import AGGREGATION_RULES
from common.config.errors import Refusal, refuse_if

if TYPE_CHECKING:
    from common.config import RunConfig


def image_head_starts_random(config: RunConfig) -> Refusal | None:
    """An image backbone has no text encoder to embed label names with, and the
    closed-form head is solved for a text classifier only."""
    init = config.head.init
    reason = (
        "embeds the label names with a text encoder, which an image backbone does "
        "not have"
        if init == "label-names"
        else "is solved from a text classifier's pooled features only, for now"
    )
    return refuse_if(
        init != "random",
        "head.init",
        f"head.init = {init} {reason}; set head.init = random for "
        "model.task = image-cls",
    )


def images_need_a_path(config: RunConfig) -> Refusal | None:
    """There is no built-in image corpus: a run names its images, or (a deployment
    whose sites hold them) the label map alone."""
    return refuse_if(
        not config.data.path and not config.data.labels,
        "data.path",
        "model.task = image-cls needs images: an image folder (one sub-folder "
        "per class) or a .csv/.jsonl file listing image paths and labels; a "
        "deployment whose sites hold the images needs only data.labels",
    )


def image_factors_may_be_convolutions(config: RunConfig) -> Refusal | None:
    """Refactorising needs 2-D factors; an image backbone's may be 4-D."""
    rule = config.aggregation.rule
    return refuse_if(
        AGGREGATION_RULES[rule].sends_factors,
        "aggregation",
        f"aggregation = {rule} refactorises 2-D LoRA factors, but an image "
        "backbone's adapters may sit on convolutions (4-D factors); use "
        "another rule with model.task = image-cls",
    )


RULES = (
    image_head_starts_random,
    images_need_a_path,
    image_factors_may_be_convolutions,
)
