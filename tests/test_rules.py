"""LoRA-aware aggregation rules and server optimisers: each rule against its formula,
the low-rank identities FFA and FlexLoRA rest on, optimiser state across a checkpoint,
the combinations the config refuses, the client side of FedProx and FFA, and what each
rule does in an in-process federation."""

from __future__ import annotations

import json
import re
from collections import defaultdict
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from flwr.app import Context, Message, MessageType, MetricRecord, RecordDict
from flwr.clientapp import ClientApp
from transformers import AutoTokenizer, PreTrainedTokenizerBase

from client import adapters
from client.adapters import SiteConfigError
from client.finetune import LocalTraining, _ProximalTerm, finetune
from common import keys
from common.batching import Encoded, encode
from common.codec import AdapterState, Float32Codec, apply_delta
from common.config import (
    AGGREGATION_RULES,
    ConfigError,
    LoraSettings,
    RunConfig,
)
from common.low_rank import at_rank, factor_pairs, product, rank_of
from common.sharing import LORA_A, LORA_B, is_head
from common.tasks.text_classification.model import (
    TextClassifier,
    adapter_state,
    attach_lora,
    load_adapter_state,
    load_encoder,
)
from common.wire import from_array_record, to_array_record
from server.aggregation import FedAvgM, FlexLoRA, build_rule
from server.checkpoint import Checkpoint, load_checkpoint, save_checkpoint
from server.contribution import Contribution
from server.strategy import AggregationRule, StatefulRule, rule_state
from server.summation import RoundSum
from server.validation import RejectedUpdate, contribution_from_reply
from tests.conftest import InProcessGrid, write_jsonl

A_NAME = "base_model.model.encoder.layer.0.attention.self.query.lora_A.weight"
B_NAME = "base_model.model.encoder.layer.0.attention.self.query.lora_B.weight"
V_A_NAME = "base_model.model.encoder.layer.0.attention.self.value.lora_A.weight"
V_B_NAME = "base_model.model.encoder.layer.0.attention.self.value.lora_B.weight"


# -- hand-built rounds -----------------------------------------------------------------


def round_sum(
    changes: list[AdapterState],
    weights: list[float],
    reference: AdapterState | None = None,
) -> RoundSum:
    """A round as :class:`server.summation.PlainSum` would hand it to a rule."""
    contributions = [
        Contribution(node, change, weight)
        for node, (change, weight) in enumerate(zip(changes, weights, strict=True))
    ]
    names = [
        k for k in changes[0] if all(c[k].shape == changes[0][k].shape for c in changes)
    ]
    total = {
        k: sum(
            w * c[k].astype(np.float64) for c, w in zip(changes, weights, strict=True)
        )
        for k in names
    }
    return RoundSum(
        total={k: np.asarray(v, np.float32) for k, v in total.items()},
        weight=float(sum(weights)),
        count=len(changes),
        contributions=contributions,
        reference=dict(reference or {}),
    )


def rule_for(name: str, **flat: object) -> AggregationRule:
    return build_rule(RunConfig.from_flat({"aggregation": name, **flat}))


#: Three rounds of two clients' deltas (weights 1 and 3). Large and tiny mean deltas
#: alternate, so Yogi's ``v`` both grows (``d^2 > v``) and shrinks (``d^2 < v``), with
#: ``v - d^2`` far enough from 0 that its sign is the same in float32.
OPTIMISER_ROUNDS: list[tuple[list[list[float]], list[float]]] = [
    ([[1.0, -2.0, 0.5], [3.0, 0.0, -0.5]], [1.0, 3.0]),
    ([[0.02, 4.0, -1.0], [0.0, 2.0, 0.01]], [1.0, 3.0]),
    ([[-0.5, 0.001, 2.0], [-1.5, 0.0, 1.0]], [1.0, 3.0]),
]
OPTIMISER_SETTINGS: dict[str, object] = {
    "server.lr": 0.1,
    "server.beta1": 0.8,
    "server.beta2": 0.95,
    "server.tau": 0.01,
    "server.momentum": 0.5,
}


def optimiser_round(index: int) -> RoundSum:
    deltas, weights = OPTIMISER_ROUNDS[index]
    return round_sum([{"lora": np.array(d, np.float32)} for d in deltas], list(weights))


def hand_steps(
    rule: str, lr: float, beta1: float, beta2: float, tau: float, momentum: float
) -> list[np.ndarray]:
    """The optimiser's steps over :data:`OPTIMISER_ROUNDS`, computed in float64
    straight from Reddi et al. (2021): no bias correction, ``v`` starting at tau^2."""
    m, v = np.zeros(3), np.full(3, tau**2)
    steps = []
    for deltas, weights in OPTIMISER_ROUNDS:
        d = np.average(np.array(deltas), axis=0, weights=weights)
        if rule == "fedavgm":
            m = momentum * m + d
            steps.append(lr * m)
            continue
        m = beta1 * m + (1 - beta1) * d
        if rule == "fedadam":
            v = beta2 * v + (1 - beta2) * d**2
        else:
            v = v - (1 - beta2) * d**2 * np.sign(v - d**2)
        steps.append(lr * m / (np.sqrt(v) + tau))
    return steps


# -- 1. each rule against its formula --------------------------------------------------


def test_fedprox_aggregates_the_example_weighted_mean() -> None:
    # Prepare
    changes = [
        {
            "lora": np.array([1.0, -4.0], np.float32),
            "head.bias": np.ones(2, np.float32),
        },
        {
            "lora": np.array([3.0, 0.0], np.float32),
            "head.bias": np.zeros(2, np.float32),
        },
    ]

    # Execute
    step = rule_for("fedprox").aggregate(round_sum(changes, [1.0, 3.0]))

    # Assert
    np.testing.assert_allclose(step["lora"], [2.5, -1.0])
    np.testing.assert_allclose(step["head.bias"], [0.25, 0.25])


@pytest.mark.parametrize("rule", ["fedavgm", "fedadam", "fedyogi"])
def test_a_server_optimiser_steps_as_its_formula_over_three_rounds(rule: str) -> None:
    # Prepare
    optimiser = rule_for(rule, **OPTIMISER_SETTINGS)
    expected = hand_steps(rule, 0.1, 0.8, 0.95, 0.01, 0.5)

    # Execute
    steps = [optimiser.aggregate(optimiser_round(i))["lora"] for i in range(3)]

    # Assert
    for index, (step, want) in enumerate(zip(steps, expected, strict=True)):
        assert step.dtype == np.float32
        np.testing.assert_allclose(step, want, rtol=2e-5, atol=1e-7, err_msg=str(index))


@pytest.mark.parametrize(
    ("rule", "default"), [("fedavgm", 1.0), ("fedadam", 0.01), ("fedyogi", 0.01)]
)
def test_server_lr_zero_takes_the_rules_default_rate(rule: str, default: float) -> None:
    # Prepare
    implicit = rule_for(rule, **{"server.lr": 0.0})
    explicit = rule_for(rule, **{"server.lr": default})
    other = rule_for(rule, **{"server.lr": default / 2})

    # Execute
    steps = [
        r.aggregate(optimiser_round(0))["lora"] for r in (implicit, explicit, other)
    ]

    # Assert
    np.testing.assert_array_equal(steps[0], steps[1])
    assert not np.allclose(steps[0], steps[2])
    assert AGGREGATION_RULES[rule].server_optimiser_lr == default


def test_optimiser_state_of_another_rule_is_refused() -> None:
    with pytest.raises(ValueError, match="another rule"):
        FedAvgM(1.0, 0.9).load_state_arrays({"v/lora": np.zeros(3, np.float32)})


# -- 2. the low-rank identities --------------------------------------------------------


def test_ffa_mean_of_b_deltas_applied_to_the_global_is_the_mean_product() -> None:
    # Prepare: A fixed and shared; each client trains its own B
    rng = np.random.default_rng(0)
    alpha, weights = 8.0, [2.0, 1.0, 5.0]
    a = rng.normal(size=(4, 6)).astype(np.float32)  # (r, in)
    b0 = rng.normal(size=(5, 4)).astype(np.float32)  # (out, r)
    trained = [b0 + rng.normal(size=b0.shape).astype(np.float32) for _ in weights]
    changes = [
        {B_NAME: b - b0, "head.bias": rng.normal(size=3).astype(np.float32)}
        for b in trained
    ]
    global_state = {A_NAME: a, B_NAME: b0, "head.bias": np.zeros(3, np.float32)}

    # Execute
    step = rule_for("ffa").aggregate(round_sum(changes, weights))
    updated = apply_delta(global_state, step)

    # Assert: mean(B_i)·A == mean(B_i·A), and A is untouched
    expected = np.average(
        [product(a, b, alpha) for b in trained], axis=0, weights=weights
    )
    assert A_NAME not in step
    np.testing.assert_array_equal(updated[A_NAME], a)
    np.testing.assert_allclose(
        product(updated[A_NAME], updated[B_NAME], alpha), expected, rtol=1e-5, atol=1e-5
    )


def random_factors(
    rng: np.random.Generator, rank: int, used: int, shape: tuple[int, int]
) -> tuple[np.ndarray, np.ndarray]:
    """``(A, B)`` of ``rank`` whose product has rank ``used`` (B's other columns 0)."""
    out, inp = shape
    a = rng.normal(size=(rank, inp)).astype(np.float32)
    b = rng.normal(size=(out, rank)).astype(np.float32)
    b[:, used:] = 0.0
    return a, b


def best_rank_k(matrix: np.ndarray, k: int) -> np.ndarray:
    u, s, vt = np.linalg.svd(matrix, full_matrices=False)
    return (u[:, :k] * s[:k]) @ vt[:k]


def test_flexlora_at_full_rank_reproduces_the_mean_product_exactly() -> None:
    # Prepare: three clients at the run's rank 4, each product of rank 1, so the
    # mean product has rank at most 3 <= 4
    rng = np.random.default_rng(1)
    alpha, rank, weights = 16.0, 4, [3.0, 1.0, 2.0]
    pairs = [random_factors(rng, rank, 1, (7, 6)) for _ in weights]
    heads = [rng.normal(size=3).astype(np.float32) for _ in weights]
    changes = [
        {A_NAME: a, B_NAME: b, "head.bias": h}
        for (a, b), h in zip(pairs, heads, strict=True)
    ]
    reference = {
        A_NAME: rng.normal(size=(rank, 6)).astype(np.float32),
        B_NAME: rng.normal(size=(7, rank)).astype(np.float32),
        "head.bias": np.ones(3, np.float32),
    }

    # Execute
    step = FlexLoRA(rank, alpha).aggregate(round_sum(changes, weights, reference))
    updated = apply_delta(reference, step)

    # Assert
    expected = np.average(
        [product(a, b, alpha) for a, b in pairs], axis=0, weights=weights
    )
    assert updated[A_NAME].shape == (rank, 6) and updated[B_NAME].shape == (7, rank)
    np.testing.assert_allclose(
        product(updated[A_NAME], updated[B_NAME], alpha), expected, atol=1e-5
    )
    np.testing.assert_allclose(
        step["head.bias"], np.average(heads, axis=0, weights=weights), rtol=1e-6
    )


def test_flexlora_keeps_the_best_rank_r_approximation_of_mixed_rank_products() -> None:
    # Prepare: a rank-2 and a rank-4 client; their mean has rank 6 > the run's 4
    rng = np.random.default_rng(2)
    alpha, weights = 8.0, [1.0, 2.0]
    low, full = random_factors(rng, 2, 2, (9, 8)), random_factors(rng, 4, 4, (9, 8))
    changes = [{A_NAME: a, B_NAME: b} for a, b in (low, full)]
    reference = {
        A_NAME: np.zeros((4, 8), np.float32),
        B_NAME: np.zeros((9, 4), np.float32),
    }

    # Execute
    updated = apply_delta(
        reference, FlexLoRA(4, alpha).aggregate(round_sum(changes, weights, reference))
    )

    # Assert: (alpha / 2)·B1·A1 and (alpha / 4)·B2·A2 averaged, then truncated
    mean = (1 * product(*low, alpha) + 2 * product(*full, alpha)) / 3
    assert np.linalg.matrix_rank(mean) == 6
    np.testing.assert_allclose(
        product(updated[A_NAME], updated[B_NAME], alpha),
        best_rank_k(mean, 4),
        atol=1e-5,
    )


def six_rank_state(seed: int = 3) -> AdapterState:
    rng = np.random.default_rng(seed)
    return {
        A_NAME: rng.normal(size=(6, 8)).astype(np.float32),
        B_NAME: rng.normal(size=(10, 6)).astype(np.float32),
        "head.weight": rng.normal(size=(3, 8)).astype(np.float32),
    }


def test_at_rank_gives_the_best_rank_k_approximation_and_keeps_other_tensors() -> None:
    # Prepare
    state, alpha = six_rank_state(), 16.0

    # Execute
    truncated = at_rank(state, 2, alpha)

    # Assert
    assert rank_of(truncated) == 2
    assert truncated[A_NAME].shape == (2, 8) and truncated[B_NAME].shape == (10, 2)
    np.testing.assert_allclose(
        product(truncated[A_NAME], truncated[B_NAME], alpha),
        best_rank_k(product(state[A_NAME], state[B_NAME], alpha), 2),
        atol=1e-5,
    )
    np.testing.assert_array_equal(truncated["head.weight"], state["head.weight"])


def test_truncations_are_nested() -> None:
    # Prepare
    state, alpha = six_rank_state(4), 8.0

    # Execute
    direct = at_rank(state, 2, alpha)
    via_four = at_rank(at_rank(state, 4, alpha), 2, alpha)

    # Assert
    np.testing.assert_allclose(
        product(via_four[A_NAME], via_four[B_NAME], alpha),
        product(direct[A_NAME], direct[B_NAME], alpha),
        atol=1e-5,
    )


def test_mixed_ranks_in_one_state_are_refused() -> None:
    state = {
        A_NAME: np.zeros((2, 4)),
        B_NAME: np.zeros((4, 2)),
        V_A_NAME: np.zeros((3, 4)),
        V_B_NAME: np.zeros((4, 3)),
    }
    with pytest.raises(ValueError, match=r"mixed ranks \[2, 3\]"):
        rank_of(state)


# -- 3. optimiser state across a checkpoint --------------------------------------------


@pytest.mark.parametrize("rule", ["fedavgm", "fedadam", "fedyogi"])
def test_a_restored_server_optimiser_takes_the_uninterrupted_next_step(
    rule: str, tmp_path: Path
) -> None:
    # Prepare: two rounds, then a checkpoint with the optimiser's state
    uninterrupted = rule_for(rule, **OPTIMISER_SETTINGS)
    steps = [uninterrupted.aggregate(optimiser_round(i))["lora"] for i in range(3)]
    expected = steps[2]
    interrupted = rule_for(rule, **OPTIMISER_SETTINGS)
    for index in range(2):
        interrupted.aggregate(optimiser_round(index))
    state = {"lora": np.zeros(3, np.float32)}
    save_checkpoint(tmp_path, Checkpoint(2, state, {}, [], rule_state(interrupted)))

    # Execute
    restored = rule_for(rule, **OPTIMISER_SETTINGS)
    assert isinstance(restored, StatefulRule)
    loaded = load_checkpoint(tmp_path)
    restored.load_state_arrays(loaded.rule_state)
    step = restored.aggregate(optimiser_round(2))["lora"]

    # Assert: bit for bit; a fresh optimiser would step otherwise
    assert set(loaded.state) == {"lora"}
    np.testing.assert_array_equal(step, expected)
    fresh = rule_for(rule, **OPTIMISER_SETTINGS).aggregate(optimiser_round(2))["lora"]
    assert not np.allclose(fresh, expected)


def test_a_stateless_rule_adds_no_state_to_the_checkpoint() -> None:
    assert rule_state(rule_for("fedprox")) == {}
    assert rule_state(rule_for("ffa")) == {}


# -- 4. refused combinations -----------------------------------------------------------


@pytest.mark.parametrize("rule", ["flexlora", "median", "trimmed-mean"])
def test_a_rule_reading_each_update_is_refused_behind_secure_aggregation(
    rule: str,
) -> None:
    with pytest.raises(
        ConfigError,
        match=f"config key 'aggregation': aggregation = {rule} needs each client's "
        "update.*secagg.enabled = true",
    ):
        RunConfig.from_flat({"aggregation": rule, "secagg.enabled": True})


@pytest.mark.parametrize(
    "rule",
    ["fedprox", "fedavgm", "fedadam", "fedyogi", "ffa", "fedsa", "fedavg-per-label"],
)
def test_a_rule_needing_only_the_sum_runs_behind_secure_aggregation(rule: str) -> None:
    config = RunConfig.from_flat({"aggregation": rule, "secagg.enabled": True})
    assert not build_rule(config).traits.needs_individual_updates


@pytest.mark.parametrize("rule", ["ffa", "fedsa", "flexlora"])
def test_a_factor_rule_is_refused_when_no_lora_factor_trains(rule: str) -> None:
    with pytest.raises(
        ConfigError,
        match=f"config key 'aggregation': aggregation = {rule} .*train.mode = head",
    ):
        RunConfig.from_flat({"aggregation": rule, "train.mode": "head"})


def test_flexlora_refuses_the_topk_codec_naming_the_codec_key() -> None:
    with pytest.raises(ConfigError, match="config key 'codec'.*flexlora"):
        RunConfig.from_flat({"aggregation": "flexlora", "codec": "topk"})


@pytest.mark.parametrize(
    ("key", "value"),
    [
        ("server.beta1", 1.0),
        ("server.beta1", -0.1),
        ("server.beta2", 1.0),
        ("server.momentum", 1.5),
        ("server.tau", 0.0),
        ("server.tau", -0.001),
        ("server.lr", -1.0),
        ("fedprox.mu", -0.01),
    ],
)
def test_a_bad_rule_setting_is_refused_naming_its_key(key: str, value: float) -> None:
    with pytest.raises(ConfigError, match=f"config key '{re.escape(key)}'"):
        RunConfig.from_flat({"aggregation": "fedadam", key: value})


# -- 5. the client side: FedProx's proximal term, FFA's frozen A -----------------------

LORA = LoraSettings(r=4, alpha=8, dropout=0.0, target_modules=("query", "value"))


@pytest.fixture(scope="module")
def tokenizer_of(tiny_backbone: Path) -> PreTrainedTokenizerBase:
    return AutoTokenizer.from_pretrained(str(tiny_backbone))


def perturbed_classifier(backbone: Path) -> TextClassifier:
    """A seeded classifier whose B factors are noise, so every A gets a gradient."""
    model = attach_lora(load_encoder(backbone), LORA, "mean", 2, 0)
    rng = np.random.default_rng(1)
    state = adapter_state(model)
    for name in state:
        if LORA_B in name:
            state[name] = rng.normal(0, 0.5, state[name].shape).astype(np.float32)
    load_adapter_state(model, state)
    return model


def sentiment_rows(tokenizer: PreTrainedTokenizerBase) -> Encoded:
    return encode(tokenizer, ["good great love", "bad awful hate"] * 8, [0, 1] * 8, 32)


def local_plan(**changes: Any) -> LocalTraining:
    settings: dict[str, Any] = {
        "epochs": 1,
        "max_steps": 0,
        "batch_size": 4,
        "lr": 0.01,
        "head_lr": 0.01,
        "weight_decay": 0.0,
        "seed": 0,
    }
    return LocalTraining(**{**settings, **changes})


def distance(a: AdapterState, b: AdapterState) -> float:
    return float(np.sqrt(sum(np.square(a[k] - b[k]).sum() for k in a)))


def test_the_proximal_term_keeps_a_client_closer_to_its_start(
    tiny_backbone: Path, tokenizer_of: PreTrainedTokenizerBase
) -> None:
    # Prepare
    rows = sentiment_rows(tokenizer_of)
    moved = {}

    # Execute
    for mu in (0.0, 10.0):
        model = perturbed_classifier(tiny_backbone)
        start = adapter_state(model)
        finetune(model, rows, tokenizer_of.pad_token_id, local_plan(proximal_mu=mu))
        moved[mu] = distance(adapter_state(model), start)

    # Assert
    assert 0 < moved[10.0] < moved[0.0] / 2


def test_the_proximal_term_is_half_mu_squared_distance_with_gradient_mu_delta() -> None:
    # Prepare
    mu = 0.3
    weight = torch.tensor([[1.0, -2.0], [0.5, 3.0]], requires_grad=True)
    bias = torch.tensor([0.25, -1.0], requires_grad=True)
    term = _ProximalTerm([weight, bias], mu)
    moves = (torch.tensor([[0.1, 0.0], [-0.4, 2.0]]), torch.tensor([1.0, -0.5]))
    with torch.no_grad():
        weight += moves[0]
        bias += moves[1]

    # Execute
    value = term()
    assert isinstance(value, torch.Tensor)
    value.backward()

    # Assert
    expected = mu / 2 * sum(float(m.pow(2).sum()) for m in moves)
    assert value.item() == pytest.approx(expected, rel=1e-6)
    torch.testing.assert_close(weight.grad, mu * moves[0])
    torch.testing.assert_close(bias.grad, mu * moves[1])
    assert _ProximalTerm([weight], 0.0)() == 0.0


@pytest.mark.parametrize(
    ("rule", "mu", "frozen"),
    [
        ("fedprox", 0.25, None),
        ("fedavg", 0.0, None),
        ("fedadam", 0.0, None),
        ("ffa", 0.0, LORA_A),
        ("fedsa", 0.0, None),
    ],
)
def test_the_local_plan_takes_mu_only_under_fedprox_and_freezes_a_only_under_ffa(
    rule: str, mu: float, frozen: str | None
) -> None:
    config = RunConfig.from_flat({"aggregation": rule, "fedprox.mu": 0.25})
    plan = LocalTraining.from_config(config, "lora", seed=0)
    assert (plan.proximal_mu, plan.frozen) == (mu, frozen)


def test_ffa_finetune_keeps_every_a_bit_identical_and_restores_requires_grad(
    tiny_backbone: Path, tokenizer_of: PreTrainedTokenizerBase
) -> None:
    # Prepare
    model = perturbed_classifier(tiny_backbone)
    before = adapter_state(model)

    # Execute
    finetune(
        model,
        sentiment_rows(tokenizer_of),
        tokenizer_of.pad_token_id,
        local_plan(frozen=LORA_A, weight_decay=0.01),
    )

    # Assert
    after = adapter_state(model)
    a_names = [k for k in before if LORA_A in k]
    b_names = [k for k in before if LORA_B in k]
    assert a_names and b_names
    for name in a_names:
        np.testing.assert_array_equal(after[name], before[name])
    assert all(not np.array_equal(after[k], before[k]) for k in b_names)
    lora = [p for n, p in model.named_parameters() if "lora_" in n]
    assert lora and all(p.requires_grad for p in lora)


# -- the site's side of the rules (client.adapters) ------------------------------------


def global_adapter() -> AdapterState:
    rng = np.random.default_rng(5)
    return {
        A_NAME: rng.normal(size=(4, 6)).astype(np.float32),
        B_NAME: rng.normal(size=(5, 4)).astype(np.float32),
        "head.weight": rng.normal(size=(3, 6)).astype(np.float32),
        "head.bias": np.zeros(3, np.float32),
    }


def empty_context() -> Context:
    return Context(
        run_id=1,
        node_id=7,
        node_config={},
        state=RecordDict(),
        run_config={},
    )


FLEX = {"aggregation": "flexlora", "lora.r": 4}


def test_only_a_flexlora_site_takes_its_rank_from_the_node_config() -> None:
    flex = RunConfig.from_flat(FLEX)
    assert adapters.site_lora(flex, {"lora.r": "2"}).r == 2
    assert adapters.site_lora(flex, {}).r == 4
    fedavg = RunConfig.from_flat({"lora.r": 4})
    assert adapters.site_lora(fedavg, {"lora.r": 2}).r == 4


@pytest.mark.parametrize("value", [5, 0, "two"])
def test_a_bad_site_rank_is_refused_naming_the_node_config_key(value: object) -> None:
    with pytest.raises(SiteConfigError, match="node config lora.r"):
        adapters.site_lora(RunConfig.from_flat(FLEX), {"lora.r": value})


def test_a_lower_rank_site_starts_from_the_best_approximation_of_the_global() -> None:
    # Prepare
    config = RunConfig.from_flat(FLEX)
    lora = adapters.site_lora(config, {"lora.r": 2})
    state = global_adapter()

    # Execute
    start = adapters.starting_state(state, config, lora, empty_context())

    # Assert
    alpha = config.lora.alpha
    assert rank_of(start) == 2
    np.testing.assert_allclose(
        product(start[A_NAME], start[B_NAME], alpha),
        best_rank_k(product(state[A_NAME], state[B_NAME], alpha), 2),
        atol=1e-5,
    )
    full = adapters.starting_state(state, config, config.lora, empty_context())
    assert all(np.array_equal(full[k], state[k]) for k in state)


@pytest.mark.parametrize(
    ("rule", "shared"),
    [
        ("fedavg", {A_NAME, B_NAME, "head.weight", "head.bias"}),
        ("ffa", {B_NAME, "head.weight", "head.bias"}),
        ("fedsa", {A_NAME, "head.weight", "head.bias"}),
        ("flexlora", {A_NAME, B_NAME, "head.weight", "head.bias"}),
    ],
)
def test_a_site_uploads_what_its_rule_shares(rule: str, shared: set[str]) -> None:
    # Prepare
    start = global_adapter()
    trained = {k: v + np.float32(0.5) for k, v in start.items()}

    # Execute
    up = adapters.upload(trained, start, "lora", rule)

    # Assert: deltas, except FlexLoRA's factors, which go up as trained
    assert set(up) == shared
    for name, value in up.items():
        sent_as_is = rule == "flexlora" and not is_head(name)
        np.testing.assert_array_equal(
            value, trained[name] if sent_as_is else trained[name] - start[name]
        )


def test_a_fedsa_site_keeps_its_b_and_starts_the_next_round_from_it() -> None:
    # Prepare
    config = RunConfig.from_flat({"aggregation": "fedsa", "lora.r": 4})
    context = empty_context()
    trained = {k: v + np.float32(1.0) for k, v in global_adapter().items()}
    new_global = {k: v - np.float32(2.0) for k, v in global_adapter().items()}

    # Execute
    adapters.keep_local(trained, "fedsa", context)
    start = adapters.starting_state(new_global, config, config.lora, context)

    # Assert
    kept = from_array_record(context.state.array_records[adapters.LOCAL_FACTORS_RECORD])
    assert set(kept) == {B_NAME}
    np.testing.assert_array_equal(start[B_NAME], trained[B_NAME])
    for name in (A_NAME, "head.weight", "head.bias"):
        np.testing.assert_array_equal(start[name], new_global[name])


def test_a_rule_without_local_factors_keeps_nothing_at_the_site() -> None:
    context = empty_context()
    adapters.keep_local(global_adapter(), "ffa", context)
    assert adapters.LOCAL_FACTORS_RECORD not in context.state.array_records


# -- the coordinator's check of FlexLoRA replies ---------------------------------------


def reply_carrying(arrays: AdapterState, node: int = 101) -> Message:
    InProcessGrid(ClientApp(), {})  # sets the sender identity messages read
    instruction = Message(RecordDict(), node, MessageType.TRAIN)
    content = RecordDict(
        {
            keys.ADAPTER_RECORD: to_array_record(arrays),
            keys.METRICS_RECORD: MetricRecord({keys.NUM_EXAMPLES: 3}),
        }
    )
    return Message(content, reply_to=instruction)


def two_module_factors(ranks: tuple[int, int, int, int]) -> AdapterState:
    """Factors of two modules (in 6, out 5) with the given first/last dimensions."""
    a_q, b_q, a_v, b_v = ranks
    return {
        A_NAME: np.ones((a_q, 6), np.float32),
        B_NAME: np.ones((5, b_q), np.float32),
        V_A_NAME: np.ones((a_v, 6), np.float32),
        V_B_NAME: np.ones((5, b_v), np.float32),
        "head.bias": np.zeros(3, np.float32),
    }


REFERENCE_RANK_4 = two_module_factors((4, 4, 4, 4))


def test_a_lower_rank_flexlora_reply_is_accepted_at_its_rank() -> None:
    contribution = contribution_from_reply(
        reply_carrying(two_module_factors((2, 2, 2, 2))),
        REFERENCE_RANK_4,
        Float32Codec(),
        flexible_rank=True,
    )
    assert rank_of(contribution.change) == 2
    assert contribution.change[B_NAME].shape == (5, 2)
    assert (contribution.node_id, contribution.weight) == (101, 3.0)


@pytest.mark.parametrize(
    ("ranks", "reason"),
    [
        ((6, 6, 6, 6), "one rank between 1 and lora.r = 4"),
        ((2, 2, 3, 3), "one rank between 1 and lora.r = 4"),
        ((2, 3, 2, 2), "shape"),
    ],
)
def test_a_flexlora_reply_above_the_run_rank_or_of_mixed_ranks_is_rejected(
    ranks: tuple[int, int, int, int], reason: str
) -> None:
    with pytest.raises(RejectedUpdate, match=reason):
        contribution_from_reply(
            reply_carrying(two_module_factors(ranks)),
            REFERENCE_RANK_4,
            Float32Codec(),
            flexible_rank=True,
        )


def test_a_lower_rank_reply_is_rejected_when_ranks_are_not_flexible() -> None:
    with pytest.raises(RejectedUpdate, match="shape"):
        contribution_from_reply(
            reply_carrying(two_module_factors((2, 2, 2, 2))),
            REFERENCE_RANK_4,
            Float32Codec(),
        )


# -- 6./7. in-process federations ------------------------------------------------------

NODES = (101, 202)
DOMAINS = {
    "bank": ("send", "balance"),
    "travel": ("flight", "hotel"),
}


@pytest.fixture(scope="module")
def corpus(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    """Training rows (four per label) and test rows (two per label), one domain per
    client under ``column:domain``."""
    folder = tmp_path_factory.mktemp("rules-data")
    train: list[dict[str, object]] = []
    test: list[dict[str, object]] = []
    for domain, labels in DOMAINS.items():
        for label in labels:
            for index in range(6):
                row = {
                    "text": f"please {label} my account {index}",
                    "label": label,
                    "domain": domain,
                }
                (train if index < 4 else test).append(row)
    return write_jsonl(folder / "train.jsonl", train), write_jsonl(
        folder / "test.jsonl", test
    )


@dataclass
class Federation:
    """An in-process run: its grid, metrics lines and final global adapter."""

    grid: InProcessGrid
    rows: list[dict[str, Any]]
    final: AdapterState
    starts: dict[int, list[AdapterState]] = field(default_factory=dict)
    trained: dict[int, list[AdapterState]] = field(default_factory=dict)

    def sent(self) -> dict[int, AdapterState]:
        """The global adapter each round started from, by round."""
        sent = {}
        for message in self.grid.sent:
            content = message.content
            if message.metadata.message_type == MessageType.TRAIN:
                round_ = int(content.config_records[keys.CONFIG_RECORD][keys.CFG_ROUND])  # type: ignore[arg-type]
                sent[round_] = from_array_record(
                    content.array_records[keys.ADAPTER_RECORD]
                )
        return sent

    def replies(self) -> list[Message]:
        """The plain training replies, in order (round 1's two, then round 2's)."""
        return [
            r
            for r in self.grid.received
            if keys.ADAPTER_RECORD in r.content.array_records
        ]


def run_config(
    backbone: Path, corpus: tuple[Path, Path], output: Path, **overrides: object
) -> RunConfig:
    train, test = corpus
    return RunConfig.from_flat(
        {
            "model.name": str(backbone),
            "data.path": str(train),
            "data.test-path": str(test),
            "data.partition": "column:domain",
            "sim.num-clients": 2,
            "num-server-rounds": 2,
            "train.batch-size": 4,
            "train.lr": 0.01,
            "lora.r": 4,
            "lora.dropout": 0.0,
            "output.dir": str(output),
            **overrides,
        }
    )


def federate(
    backbone: Path,
    corpus: tuple[Path, Path],
    output: Path,
    node_extra: Mapping[int, Mapping[str, object]] | None = None,
    **overrides: object,
) -> Federation:
    """Run the coordinator over two in-process clients."""
    from client.client_app import app as client_app
    from server.server_app import coordinate

    nodes = {
        node: {
            "partition-id": index,
            "num-partitions": len(NODES),
            "cache-dir": str(output.parent / "cache"),
            **(node_extra or {}).get(node, {}),
        }
        for index, node in enumerate(NODES)
    }
    grid = InProcessGrid(client_app, nodes)
    coordinate(grid, run_config(backbone, corpus, output, **overrides))  # type: ignore[arg-type]
    rows = [
        json.loads(line) for line in (output / "metrics.jsonl").read_text().splitlines()
    ]
    return Federation(grid, rows, load_checkpoint(output).state)


def names_with(state: Mapping[str, object], part: str) -> set[str]:
    return {k for k in state if part in k}


def same(a: AdapterState, b: AdapterState, names: set[str]) -> bool:
    return all(np.array_equal(a[k], b[k]) for k in names)


@pytest.fixture(scope="module")
def ffa_run(
    tiny_backbone: Path,
    corpus: tuple[Path, Path],
    tmp_path_factory: pytest.TempPathFactory,
) -> Federation:
    return federate(
        tiny_backbone, corpus, tmp_path_factory.mktemp("ffa") / "out", aggregation="ffa"
    )


def test_ffa_clients_send_only_lora_b_and_the_head(ffa_run: Federation) -> None:
    expected = names_with(ffa_run.final, LORA_B) | {"head.weight", "head.bias"}
    replies = ffa_run.replies()
    assert len(replies) == 4 and names_with(ffa_run.final, LORA_A)
    for reply in replies:
        assert set(reply.content.array_records[keys.ADAPTER_RECORD]) == expected


def test_ffa_never_changes_the_global_lora_a(ffa_run: Federation) -> None:
    sent = ffa_run.sent()
    a_names, b_names = names_with(sent[1], LORA_A), names_with(sent[1], LORA_B)
    assert [row["clients"] for row in ffa_run.rows[1:]] == [2, 2]
    assert same(sent[2], sent[1], a_names) and same(ffa_run.final, sent[1], a_names)
    assert not same(ffa_run.final, sent[1], b_names)
    assert "personal_accuracy_mean" not in ffa_run.rows[2]


def test_ffa_uploads_fewer_bytes_than_fedavg(
    ffa_run: Federation, tiny_backbone: Path, corpus: tuple[Path, Path], tmp_path: Path
) -> None:
    fedavg = federate(
        tiny_backbone, corpus, tmp_path / "out", **{"num-server-rounds": 1}
    )
    ffa_bytes, fedavg_bytes = ffa_run.rows[1]["bytes_up"], fedavg.rows[1]["bytes_up"]
    assert 0 < ffa_bytes < fedavg_bytes
    assert fedavg.rows[1]["clients"] == ffa_run.rows[1]["clients"] == 2


@pytest.fixture(scope="module")
def fedsa_run(
    tiny_backbone: Path,
    corpus: tuple[Path, Path],
    tmp_path_factory: pytest.TempPathFactory,
) -> Federation:
    """A FedSA run that records each site's starting and trained adapter per round."""
    starts: dict[int, list[AdapterState]] = defaultdict(list)
    trained: dict[int, list[AdapterState]] = defaultdict(list)
    original_start, original_keep = adapters.starting_state, adapters.keep_local

    def recording_start(
        global_state: AdapterState,
        config: RunConfig,
        lora: LoraSettings,
        context: Context,
    ) -> AdapterState:
        state = original_start(global_state, config, lora, context)
        starts[context.node_id].append({k: v.copy() for k, v in state.items()})
        return state

    def recording_keep(state: AdapterState, rule: str, context: Context) -> None:
        trained[context.node_id].append({k: v.copy() for k, v in state.items()})
        original_keep(state, rule, context)

    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(adapters, "starting_state", recording_start)
        patch.setattr(adapters, "keep_local", recording_keep)
        run = federate(
            tiny_backbone,
            corpus,
            tmp_path_factory.mktemp("fedsa") / "out",
            aggregation="fedsa",
        )
    run.starts, run.trained = dict(starts), dict(trained)
    return run


def test_fedsa_clients_send_only_lora_a_and_the_head(fedsa_run: Federation) -> None:
    expected = names_with(fedsa_run.final, LORA_A) | {"head.weight", "head.bias"}
    replies = fedsa_run.replies()
    assert len(replies) == 4 and names_with(fedsa_run.final, LORA_B)
    for reply in replies:
        assert set(reply.content.array_records[keys.ADAPTER_RECORD]) == expected


def test_fedsa_leaves_the_global_lora_b_at_its_initial_value(
    fedsa_run: Federation,
) -> None:
    initial = fedsa_run.sent()[1]
    a_names, b_names = names_with(initial, LORA_A), names_with(initial, LORA_B)
    assert same(fedsa_run.final, initial, b_names)
    assert not same(fedsa_run.final, initial, a_names)


def test_a_fedsa_client_starts_round_two_from_its_own_trained_b(
    fedsa_run: Federation,
) -> None:
    # Assert: per node, round 1 starts from the global B and round 2 from its own
    # round-1 B (the two sites' differ), with round 2's global A. The evaluation
    # after each round builds the same personalised model to score it: every
    # second start.
    sent = fedsa_run.sent()
    b_names, a_names = names_with(sent[1], LORA_B), names_with(sent[1], LORA_A)
    assert sorted(fedsa_run.starts) == sorted(NODES)
    for node in NODES:
        first, scored, second, _ = fedsa_run.starts[node]
        assert same(scored, second, set(second))
        trained_first = fedsa_run.trained[node][0]
        assert same(first, sent[1], b_names)
        assert same(second, trained_first, b_names)
        assert not same(trained_first, sent[1], b_names)
        assert same(second, sent[2], a_names)
    assert not same(fedsa_run.starts[101][1], fedsa_run.starts[202][1], b_names)


def test_fedsa_metrics_report_the_sites_personal_accuracy(
    fedsa_run: Federation,
) -> None:
    # Assert: the evaluate replies after rounds 1 and 2 score the personalised model
    # (round 0's sites have no own B yet)
    evaluations = [
        reply.content.metric_records[keys.METRICS_RECORD]
        for reply in fedsa_run.grid.received
        if reply.metadata.message_type == MessageType.EVALUATE
        and keys.METRICS_RECORD in reply.content.metric_records
    ]
    personal = [keys.PERSONAL_ACCURACY in metrics for metrics in evaluations]
    assert personal == [False, False, True, True, True, True]
    assert "personal_accuracy_mean" not in fedsa_run.rows[0]
    for row in fedsa_run.rows[1:]:
        assert (
            0.0 <= row["personal_accuracy_min"] <= row["personal_accuracy_mean"] <= 1.0
        )
    # Assert: the cross-site report's rows carry each site's personalised score
    final_sites = fedsa_run.rows[-1]["sites_eval_rows"]
    assert len(final_sites) == 2
    assert all(0.0 <= site["personal_accuracy"] <= 1.0 for site in final_sites)
    assert min(site["personal_accuracy"] for site in final_sites) == (
        fedsa_run.rows[-1]["personal_accuracy_min"]
    )


@pytest.fixture(scope="module")
def flexlora_run(
    tiny_backbone: Path,
    corpus: tuple[Path, Path],
    tmp_path_factory: pytest.TempPathFactory,
) -> Federation:
    """FlexLoRA at run rank 4, node 101 training rank 2."""
    return federate(
        tiny_backbone,
        corpus,
        tmp_path_factory.mktemp("flexlora") / "out",
        node_extra={101: {"lora.r": 2}},
        aggregation="flexlora",
    )


def test_flexlora_sites_reply_at_their_own_rank_and_are_accepted(
    flexlora_run: Federation,
) -> None:
    ranks = {
        (
            r.metadata.src_node_id,
            rank_of(from_array_record(r.content.array_records[keys.ADAPTER_RECORD])),
        )
        for r in flexlora_run.replies()
    }
    assert ranks == {(101, 2), (202, 4)}
    assert [(row["clients"], row["rejected"]) for row in flexlora_run.rows[1:]] == [
        (2, 0),
        (2, 0),
    ]


def test_flexlora_keeps_the_global_adapter_at_the_runs_rank(
    flexlora_run: Federation,
) -> None:
    sent = flexlora_run.sent()
    assert rank_of(sent[2]) == rank_of(flexlora_run.final) == 4
    assert not same(flexlora_run.final, sent[1], names_with(sent[1], LORA_B))


def test_the_flexlora_global_is_the_truncated_mean_of_the_sites_products(
    flexlora_run: Federation,
) -> None:
    # Prepare: round 2's trained factors and example counts, from the replies
    alpha = RunConfig.from_flat({}).lora.alpha
    second_round = flexlora_run.replies()[2:]
    weights = [
        float(r.content.metric_records[keys.METRICS_RECORD][keys.NUM_EXAMPLES])  # type: ignore[arg-type]
        for r in second_round
    ]
    factors = [
        from_array_record(r.content.array_records[keys.ADAPTER_RECORD])
        for r in second_round
    ]
    final = flexlora_run.final

    # Assert
    for a_name, b_name in factor_pairs(final).values():
        mean = np.average(
            [product(f[a_name], f[b_name], alpha) for f in factors],
            axis=0,
            weights=weights,
        )
        np.testing.assert_allclose(
            product(final[a_name], final[b_name], alpha),
            best_rank_k(mean, 4),
            atol=2e-5,
        )


def test_flexlora_holds_no_update_norm_bound() -> None:
    # FlexLoRA replies carry factors, not deltas: a norm bound would reject them all.
    config = RunConfig.from_flat({"aggregation": "flexlora"})
    assert config.train.max_update_norm > 0 and config.update_norm_bound == 0.0


@pytest.mark.parametrize("rule", ["fedprox", "fedavgm", "fedadam", "fedyogi"])
def test_a_rule_runs_a_round_and_moves_the_global_adapter(
    rule: str, tiny_backbone: Path, corpus: tuple[Path, Path], tmp_path: Path
) -> None:
    # Execute
    run = federate(
        tiny_backbone,
        corpus,
        tmp_path / "out",
        aggregation=rule,
        **{"num-server-rounds": 1},
    )

    # Assert
    initial = run.sent()[1]
    assert run.rows[1]["clients"] == 2 and run.rows[1]["rejected"] == 0
    for part in (LORA_A, LORA_B, "head."):
        assert not same(run.final, initial, names_with(initial, part)), part
    assert all(np.isfinite(v).all() for v in run.final.values())


@pytest.mark.slow
def test_a_resumed_fedadam_run_ends_at_the_uninterrupted_adapter_bit_for_bit(
    tiny_backbone: Path, corpus: tuple[Path, Path], tmp_path: Path
) -> None:
    # Prepare: an uninterrupted two-round run, and one stopped after round 1
    settings: dict[str, object] = {"aggregation": "fedadam", "server.lr": 0.05}
    reference = federate(tiny_backbone, corpus, tmp_path / "reference", **settings)
    stopped = tmp_path / "stopped"
    federate(tiny_backbone, corpus, stopped, **settings, **{"num-server-rounds": 1})
    assert load_checkpoint(stopped).rule_state

    # Execute
    resumed = federate(tiny_backbone, corpus, stopped, **settings, resume=True)

    # Assert
    assert [row["round"] for row in resumed.rows] == [0, 1, 2]
    assert reference.final.keys() == resumed.final.keys()
    for name in reference.final:
        np.testing.assert_array_equal(resumed.final[name], reference.final[name], name)


@pytest.mark.slow
def test_a_resumed_int8_run_sends_and_ends_as_the_uninterrupted_one(
    tiny_backbone: Path, corpus: tuple[Path, Path], tmp_path: Path
) -> None:
    # The int8 downlink's rounding noise is seeded by the round, so a resumed run
    # encodes round 2's global adapter exactly as an uninterrupted run does, although
    # the checkpoint hands the state back in another key order.
    settings: dict[str, object] = {"codec": "int8"}
    reference = federate(tiny_backbone, corpus, tmp_path / "reference", **settings)
    stopped = tmp_path / "stopped"
    federate(tiny_backbone, corpus, stopped, **settings, **{"num-server-rounds": 1})

    resumed = federate(tiny_backbone, corpus, stopped, **settings, resume=True)

    for name in reference.final:
        np.testing.assert_array_equal(resumed.final[name], reference.final[name], name)
