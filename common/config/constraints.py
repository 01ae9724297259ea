"""Rules across sections: each a small named rule with its message.

A rule reads a built :class:`~common.config.run.RunConfig` whose keys have each
passed their own check, and returns the :class:`Refusal` naming the key to change,
or ``None``. What a rule of aggregation is (needs each update, sends factors...) is
read from its :class:`~common.config.aggregation_rules.RuleTraits`; what a task
refuses is its own (:meth:`Task.config_rules <common.tasks.base.Task.config_rules>`,
run after these by :func:`task_rules`).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING

from common.config.aggregation_rules import AGGREGATION_RULES, RuleTraits
from common.config.errors import Refusal, refuse_if
from common.tasks.registry import TASKS

if TYPE_CHECKING:
    from common.config.run import RunConfig

Rule = Callable[["RunConfig"], Refusal | None]


def _traits(config: RunConfig) -> RuleTraits:
    return AGGREGATION_RULES[config.aggregation.rule]


def budget_ends_on_an_evaluated_round(config: RunConfig) -> Refusal | None:
    """A run that a privacy budget may stop early evaluates every round."""
    return refuse_if(
        config.eval_every != 1 and config.dp.enabled and config.dp.target_epsilon > 0,
        "eval.every",
        "a run that dp.target-epsilon may stop early must end on an evaluated "
        "round; set eval.every = 1 with a privacy budget",
    )


def lp_ft_runs_both_phases(config: RunConfig) -> Refusal | None:
    """``lp-ft`` keeps at least one round for each of its two phases."""
    rounds, train = config.num_server_rounds, config.train
    return refuse_if(
        train.mode == "lp-ft" and not 1 <= train.lp_rounds < rounds,
        "train.lp-rounds",
        f"with train.mode = lp-ft it must be at least 1 and below "
        f"num-server-rounds ({rounds}), so that both phases run",
    )


def factor_rule_needs_lora_training(config: RunConfig) -> Refusal | None:
    """A rule that treats LoRA factors is pointless when none train."""
    rule = config.aggregation.rule
    return refuse_if(
        config.train.mode == "head" and _traits(config).treats_lora_factors,
        "aggregation",
        f"aggregation = {rule} changes how LoRA factors train and travel, but "
        "train.mode = head trains no LoRA factors; use train.mode = lora or "
        "lp-ft, or another rule",
    )


def secure_sum_hides_individual_updates(config: RunConfig) -> Refusal | None:
    """Secure aggregation reveals only the sum, which some rules cannot use."""
    rule = config.aggregation.rule
    return refuse_if(
        config.secagg.enabled and _traits(config).needs_individual_updates,
        "aggregation",
        f"aggregation = {rule} needs each client's update, but secure "
        "aggregation (secagg.enabled = true) reveals only their sum; use "
        "aggregation = fedavg or set secagg.enabled = false",
    )


def masks_cannot_sum_topk(config: RunConfig) -> Refusal | None:
    """Top-k coordinates differ per client, so masked vectors cannot be summed."""
    return refuse_if(
        config.secagg.enabled and config.codec.name == "topk",
        "codec",
        "codec = topk sends each client's own choice of coordinates, which masks "
        "cannot sum; with secagg.enabled = true use fp32 (32-bit ring) or "
        "fp16, bf16, int8, int4 (16-bit ring: half the upload)",
    )


def client_dp_behind_secagg_needs_fp32(config: RunConfig) -> Refusal | None:
    """A 16-bit ring's rounding can break the DP clip bound."""
    codec = config.codec.name
    return refuse_if(
        config.secagg.enabled and codec != "fp32" and config.dp.client_level,
        "codec",
        f"codec = {codec} sums in a 16-bit ring, whose coarse stochastic "
        "rounding can push a clipped delta past dp.clip-norm (the noise is "
        "calibrated to it) and has no headroom for distributed noise; use "
        "codec = fp32 with client-level DP behind secure aggregation",
    )


def factors_keep_their_shapes(config: RunConfig) -> Refusal | None:
    """A rule reading ranks from factor shapes needs a codec that keeps them."""
    rule, codec = config.aggregation.rule, config.codec.name
    return refuse_if(
        _traits(config).sends_factors and codec in ("topk", "int4"),
        "codec",
        f"aggregation = {rule} reads each site's rank from the shape of its "
        f"LoRA factors, which codec = {codec} flattens; use a codec that keeps "
        "shapes (fp32, fp16, bf16, int8)",
    )


def client_dp_hides_individual_updates(config: RunConfig) -> Refusal | None:
    """Client-level DP bounds and noises only the sum."""
    summable = ", ".join(
        name
        for name, traits in AGGREGATION_RULES.items()
        if not traits.needs_individual_updates
    )
    return refuse_if(
        config.dp.client_level and _traits(config).needs_individual_updates,
        "aggregation",
        f"aggregation = {config.aggregation.rule} reads each client's update, but "
        "dp.enabled = true bounds and noises only their sum; use a mean-based rule "
        f"({summable}) or set dp.enabled = false",
    )


def dp_releases_no_label_counts(config: RunConfig) -> Refusal | None:
    """Per-label counts and rows would leave the sites outside the DP account."""
    rule = config.aggregation.rule
    return refuse_if(
        config.dp.client_level and _traits(config).sends_label_counts,
        "aggregation",
        f"aggregation = {rule} releases each label's row count and count-weighted "
        "head rows, which dp.enabled = true neither clips, noises nor accounts for; "
        "use aggregation = fedavg with DP, or set dp.enabled = false",
    )


def label_sums_need_a_wide_ring(config: RunConfig) -> Refusal | None:
    """The 16-bit ring's steps are too coarse for per-label counts."""
    rule, codec = config.aggregation.rule, config.codec.name
    return refuse_if(
        config.secagg.enabled
        and _traits(config).sends_label_counts
        and codec != "fp32",
        "codec",
        f"aggregation = {rule} sums per-label counts inside the masked vector, "
        f"which the 16-bit ring of codec = {codec} rounds too coarsely; use codec = "
        "fp32 (32-bit ring) with secagg.enabled = true",
    )


def distributed_noise_needs_secagg(config: RunConfig) -> Refusal | None:
    """A client's share of distributed noise is too small to show it alone."""
    dp = config.dp
    return refuse_if(
        dp.client_level and dp.mode == "distributed" and not config.secagg.enabled,
        "dp.mode",
        "dp.mode = distributed splits the noise among the clients, so each "
        "client's own share is too small to hide its update from a coordinator "
        "that sees it alone; set secagg.enabled = true, or use dp.mode = central",
    )


def secagg_clip_covers_dp_clip(config: RunConfig) -> Refusal | None:
    """Secure aggregation must not clip DP updates a second time."""
    dp, secagg = config.dp, config.secagg
    return refuse_if(
        dp.client_level and secagg.enabled and secagg.clip_norm < dp.clip_norm,
        "secagg.clip-norm",
        f"must be at least dp.clip-norm = {dp.clip_norm:g} (got "
        f"{secagg.clip_norm:g}), or secure aggregation would clip the DP "
        "updates again; set secagg.clip-norm to dp.clip-norm",
    )


def dp_sgd_trains_end_to_end(config: RunConfig) -> Refusal | None:
    """DP-SGD needs gradients through the model, not cached features."""
    mode = config.train.mode
    return refuse_if(
        config.dp.sample_level and mode != "lora",
        "train.mode",
        f"dp.level = sample runs DP-SGD end to end, but train.mode = {mode} "
        "trains the head on cached features; use train.mode = lora",
    )


def dp_sgd_rule_has_private_parts(config: RunConfig) -> Refusal | None:
    """Under DP-SGD, nothing the rule adds may escape per-example noise."""
    rule, traits = config.aggregation.rule, _traits(config)
    reason = (
        "its proximal term has no per-example gradient"
        if traits.proximal_term
        else "its label counts leave the site without noise"
    )
    return refuse_if(
        config.dp.sample_level and (traits.proximal_term or traits.sends_label_counts),
        "aggregation",
        f"aggregation = {rule} does not fit dp.level = sample ({reason}); use "
        "another rule or dp.level = client",
    )


def dp_sgd_keeps_site_budgets(config: RunConfig) -> Refusal | None:
    """Under DP-SGD each site keeps its own account; no coordinator budget."""
    return refuse_if(
        config.dp.sample_level and config.dp.target_epsilon != 0,
        "dp.target-epsilon",
        "with dp.level = sample each site keeps its own account (reported as "
        "sample_epsilon_max); the coordinator's budget stop needs dp.level = "
        "client, so set dp.target-epsilon = 0",
    )


def closed_form_statistics_are_unaccounted_under_dp(
    config: RunConfig,
) -> Refusal | None:
    """The closed-form head's statistics are released without noise."""
    return refuse_if(
        config.head.init == "closed-form" and config.dp.enabled,
        "head.init",
        "head.init = closed-form releases each label's row count, feature sums and "
        "(lda, ridge) the Gram matrix of the sites' rows, which dp.enabled = true "
        "neither clips, noises nor accounts for; use head.init = label-names with "
        "DP, or set dp.enabled = false",
    )


def prompt_column_needs_instruction_task(config: RunConfig) -> Refusal | None:
    """Only a task that reads instructions (a causal LM) reads a prompt column."""
    task = config.model.task
    readers = [name for name, kind in TASKS.items() if kind.reads_instructions]
    return refuse_if(
        not TASKS[task].reads_instructions and bool(config.data.prompt_column),
        "data.prompt-column",
        f"is read only with model.task = {' or '.join(readers)} (instruction data); "
        f"model.task = {task} reads data.text-column or data.image-column",
    )


def task_rules(config: RunConfig) -> tuple[Rule, ...]:
    """The checks of ``config``'s task (:meth:`Task.config_rules
    <common.tasks.base.Task.config_rules>`), run after :data:`RULES`."""
    return TASKS[config.model.task].config_rules()


RULES: tuple[Rule, ...] = (
    budget_ends_on_an_evaluated_round,
    lp_ft_runs_both_phases,
    factor_rule_needs_lora_training,
    secure_sum_hides_individual_updates,
    masks_cannot_sum_topk,
    client_dp_behind_secagg_needs_fp32,
    factors_keep_their_shapes,
    client_dp_hides_individual_updates,
    dp_releases_no_label_counts,
    label_sums_need_a_wide_ring,
    distributed_noise_needs_secagg,
    secagg_clip_covers_dp_clip,
    dp_sgd_trains_end_to_end,
    dp_sgd_rule_has_private_parts,
    dp_sgd_keeps_site_budgets,
    closed_form_statistics_are_unaccounted_under_dp,
    prompt_column_needs_instruction_task,
)
