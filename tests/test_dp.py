"""Client-level differential privacy: clipping, noise, accounting and the budget."""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import dp_accounting
import numpy as np
import pytest
from dp_accounting.rdp import RdpAccountant
from flwr.app import MessageType

from client.client_app import app as client_app
from common import dp, keys
from common.codec import l2_norm
from common.config import ConfigError, DpConfig, RunConfig
from common.wire import from_array_record
from server.checkpoint import load_checkpoint
from server.contribution import Contribution
from server.privacy import ClientLevelDP
from server.sampling import Cohort
from server.server_app import coordinate
from server.summation import RoundSum
from simulations.inprocess_grid import InProcessGrid


def reference_epsilon(rounds: int, q: float, sigma: float, delta: float) -> float:
    """dp-accounting's own answer, composed here without fedgraft's wrapper."""
    accountant = RdpAccountant()
    accountant.compose(
        dp_accounting.PoissonSampledDpEvent(q, dp_accounting.GaussianDpEvent(sigma)),
        rounds,
    )
    return accountant.get_epsilon(delta)


def settings(**overrides: Any) -> DpConfig:
    values: dict[str, Any] = {
        "enabled": True,
        "level": "client",
        "mode": "central",
        "clip_norm": 1.0,
        "noise_multiplier": 1.0,
        "delta": 1e-5,
        "target_epsilon": 0.0,
    } | overrides
    return DpConfig(**values)


def cohort(sampled: int, available: int) -> Cohort:
    """A public cohort of ``sampled`` of ``available`` nodes, as the seeded
    sampler draws it (rate and expected size from the count)."""
    return Cohort(list(range(sampled)), available, sampled / available, sampled, True)


@dataclass
class Stats:
    privacy: dict[str, float] = field(default_factory=dict)


def federate(
    backbone: Path, data: Path, output: Path, clients: int, **overrides: Any
) -> tuple[InProcessGrid, list[dict[str, Any]]]:
    """A run over the real ClientApp in this process; returns the grid and rows."""
    config = RunConfig.from_flat(
        {
            "model.name": str(backbone),
            "data.path": str(data),
            "data.partition": "iid",
            "sim.num-clients": clients,
            "num-server-rounds": 1,
            "train.batch-size": 4,
            "train.lr": 0.01,
            "lora.dropout": 0.0,
            "data.holdout-fraction": 0.25,
            "output.dir": str(output),
            "dp.enabled": True,
            **overrides,
        }
    )
    nodes = {
        100 + i: {
            "partition-id": i,
            "num-partitions": clients,
            "cache-dir": str(output.parent / "cache"),
        }
        for i in range(clients)
    }
    grid = InProcessGrid(client_app, nodes)
    coordinate(grid, config)  # type: ignore[arg-type]
    rows = [json.loads(line) for line in (output / "metrics.jsonl").open()]
    return grid, rows


# -- clipping and noise ----------------------------------------------------------------


@pytest.mark.parametrize("clip_norm", [1e-3, 0.5, 1.0, 7.0])
@pytest.mark.parametrize("scale", [1e-4, 1.0, 1e3, 1e6])
def test_clipped_norms_never_exceed_the_clip_norm(
    clip_norm: float, scale: float
) -> None:
    # Prepare
    rng = np.random.default_rng(int(scale * 1e4) + int(clip_norm * 1e3))
    delta = {
        "a": (rng.standard_normal((8, 32)) * scale).astype(np.float32),
        "b": (rng.standard_normal((32, 8)) * scale).astype(np.float32),
        "head.bias": (rng.standard_normal(5) * scale).astype(np.float32),
    }

    # Execute
    clipped = dp.clip_to_norm(delta, clip_norm)

    # Assert
    assert l2_norm(clipped) <= clip_norm
    assert all(clipped[k].dtype == np.float32 for k in delta)
    if l2_norm(delta) <= clip_norm:
        for name in delta:
            np.testing.assert_array_equal(clipped[name], delta[name])
    else:
        assert l2_norm(clipped) == pytest.approx(clip_norm, rel=1e-5)


def test_central_noise_on_a_zero_update_has_std_sigma_times_clip() -> None:
    # Prepare: four clients sent all-zero deltas
    privacy = ClientLevelDP(settings(clip_norm=0.5, noise_multiplier=1.3))
    zero = {"w": np.zeros((400, 500), np.float32)}
    privacy.begin_round(cohort(4, 4))

    # Execute
    released = privacy.release(RoundSum(total=zero, weight=4.0, count=4), Stats())

    # Assert
    assert released is not None and released.weight == 4.0
    noise = released.total["w"].astype(np.float64)
    assert noise.std() == pytest.approx(1.3 * 0.5, rel=0.01)
    assert abs(noise.mean()) < 0.01


def test_the_sum_of_m_distributed_noise_shares_has_the_central_std() -> None:
    # Prepare
    sigma, clip, m, size = 1.3, 0.5, 7, 200_000
    rng = dp.secure_generator()
    std = dp.distributed_noise_std(sigma, clip, m)

    # Execute
    total = sum(dp.gaussian_noise(size, std, rng) for _ in range(m))

    # Assert
    assert total.std() == pytest.approx(sigma * clip, rel=0.01)


def test_two_secure_generators_draw_different_noise() -> None:
    first = dp.gaussian_noise(1000, 1.0, dp.secure_generator())
    second = dp.gaussian_noise(1000, 1.0, dp.secure_generator())
    assert not np.array_equal(first, second)


def test_a_plain_sum_is_clipped_and_unweighted_on_the_coordinator() -> None:
    # Prepare: a big and a small update with very different example counts
    big = {"w": np.full((4,), 10.0, np.float32)}  # norm 20 -> clipped to 1
    small = {"w": np.full((4,), 0.1, np.float32)}  # norm 0.2, within the bound
    summed = RoundSum(
        total={"w": np.zeros(4, np.float32)},
        weight=1001.0,
        count=2,
        contributions=[Contribution(1, big, 1000.0), Contribution(2, small, 1.0)],
    )
    privacy = ClientLevelDP(settings(noise_multiplier=1e-9))
    privacy.begin_round(cohort(3, 6))

    # Execute
    released = privacy.release(summed, Stats())

    # Assert: sum of clipped deltas, weight m = 3 sampled, no individual update left
    assert released is not None
    np.testing.assert_allclose(released.total["w"], 0.5 + 0.1, rtol=1e-5)
    assert released.weight == 3.0 and released.contributions == []


def test_distributed_dropouts_report_the_shortfall_and_charge_the_actual_noise() -> (
    None
):
    # Prepare
    privacy = ClientLevelDP(settings(mode="distributed", noise_multiplier=2.0))
    privacy.begin_round(cohort(4, 8))
    stats = Stats()

    # Execute: 3 of the 4 sampled clients survived
    privacy.release(
        RoundSum(total={"w": np.zeros(3, np.float32)}, weight=3.0, count=3), stats
    )

    # Assert
    assert stats.privacy[dp.NOISE_SHORTFALL] == pytest.approx(0.25)
    assert stats.privacy[dp.NOISE_MULTIPLIER] == pytest.approx(2.0 * np.sqrt(0.75))
    assert stats.privacy[dp.SAMPLING_RATE] == 0.5
    assert stats.privacy[dp.EPSILON] == pytest.approx(
        reference_epsilon(1, 0.5, 2.0 * np.sqrt(0.75), 1e-5)
    )


# -- accounting ------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("rounds", "q", "sigma", "delta"),
    [(10, 0.5, 1.1, 1e-5), (100, 0.1, 1.0, 1e-5), (3, 1.0, 2.0, 1e-6)],
)
def test_epsilon_equals_dp_accountings_reference_value(
    rounds: int, q: float, sigma: float, delta: float
) -> None:
    # Prepare
    accountant = dp.PrivacyAccountant(delta)

    # Execute
    for _ in range(rounds):
        accountant.record(dp.RoundCharge(q, sigma))

    # Assert
    assert accountant.epsilon() == pytest.approx(
        reference_epsilon(rounds, q, sigma, delta), rel=1e-12
    )


def test_the_budget_check_predicts_the_next_round() -> None:
    charge = dp.RoundCharge(1.0, 2.0)
    accountant = dp.PrivacyAccountant(1e-5, [charge, charge])
    after_three = reference_epsilon(3, 1.0, 2.0, 1e-5)
    assert accountant.would_exceed(after_three * 0.99, charge)
    assert not accountant.would_exceed(after_three * 1.01, charge)
    assert not accountant.would_exceed(0.0, charge)  # 0 = no budget


# -- configuration ---------------------------------------------------------------------


@pytest.mark.parametrize(
    ("overrides", "key"),
    [
        ({"dp.mode": "distributed"}, "dp.mode"),
        ({"dp.mode": "local"}, "dp.mode"),
        ({"aggregation": "median"}, "aggregation"),
        ({"aggregation": "trimmed-mean"}, "aggregation"),
        ({"aggregation": "fedavg-per-label"}, "aggregation"),
        ({"aggregation": "flexlora"}, "aggregation"),
        (
            {"secagg.enabled": True, "secagg.clip-norm": 0.5, "dp.clip-norm": 1.0},
            "secagg.clip-norm",
        ),
        ({"dp.noise-multiplier": 0.0}, "dp.noise-multiplier"),
        ({"dp.clip-norm": -1.0}, "dp.clip-norm"),
        ({"dp.delta": 1.0}, "dp.delta"),
        ({"dp.target-epsilon": -1.0}, "dp.target-epsilon"),
        ({"dp.level": "record"}, "dp.level"),
        ({"dp.level": "sample", "train.mode": "head"}, "train.mode"),
        ({"dp.level": "sample", "aggregation": "fedprox"}, "aggregation"),
        ({"dp.level": "sample", "dp.target-epsilon": 3.0}, "dp.target-epsilon"),
    ],
)
def test_incompatible_dp_settings_are_refused_naming_the_key(
    overrides: dict[str, Any], key: str
) -> None:
    with pytest.raises(ConfigError, match=f"config key '{key}'"):
        RunConfig.from_flat({"dp.enabled": True, **overrides})


def test_distributed_dp_behind_secure_aggregation_is_accepted() -> None:
    config = RunConfig.from_flat(
        {"dp.enabled": True, "dp.mode": "distributed", "secagg.enabled": True}
    )
    assert config.dp.mode == "distributed" and config.dp.client_level


def test_sample_level_dp_accepts_rules_that_read_each_update() -> None:
    config = RunConfig.from_flat(
        {"dp.enabled": True, "dp.level": "sample", "aggregation": "median"}
    )
    assert config.dp.sample_level and not config.dp.client_level


# -- through the coordinator and the ClientApp -----------------------------------------


@pytest.mark.parametrize("mode", ["central", "distributed"])
def test_behind_secure_aggregation_the_mean_carries_noise_of_std_sigma_c_over_m(
    mode: str,
    tiny_backbone: Path,
    small_jsonl: Path,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    # Prepare: noise std sigma * C = 1 swamps updates clipped to C = 1e-3, so the
    # global step times m is (almost exactly) the aggregate's noise; and the sum the
    # DP step receives must weigh each client 1
    weights: list[tuple[float, int]] = []
    release = ClientLevelDP.release

    def spy(self: ClientLevelDP, summed: RoundSum | None, stats: Any) -> Any:
        if summed is not None:
            weights.append((summed.weight, summed.count))
        return release(self, summed, stats)

    monkeypatch.setattr(ClientLevelDP, "release", spy)
    output = tmp_path / mode

    # Execute
    grid, rows = federate(
        tiny_backbone,
        small_jsonl,
        output,
        clients=3,
        **{
            "secagg.enabled": True,
            "secagg.max-weight": 10.0,
            "dp.mode": mode,
            "dp.clip-norm": 1e-3,
            "dp.noise-multiplier": 1000.0,
        },
    )

    # Assert
    assert rows[1]["clients"] == 3 and rows[1][dp.NOISE_SHORTFALL] == 0.0
    assert weights and weights[0][0] == pytest.approx(3.0, abs=1e-6)
    sent = next(
        m for m in grid.sent if m.metadata.message_type == MessageType.TRAIN
    ).content
    assert sent.config_records[keys.CONFIG_RECORD][keys.CFG_EXPECTED_CLIENTS] == 3
    start = from_array_record(sent.array_records[keys.ADAPTER_RECORD])
    final = load_checkpoint(output).state
    noise = np.concatenate(
        [(final[k].astype(np.float64) - start[k]).ravel() * 3 for k in sorted(start)]
    )
    assert noise.size > 2000
    assert noise.std() == pytest.approx(1.0, rel=0.1)
    assert abs(noise.mean()) < 0.1


def test_a_budget_stops_the_run_before_the_round_that_would_exceed_it(
    tiny_backbone: Path, small_jsonl: Path, tmp_path: Path
) -> None:
    # Prepare: two clients, both sampled (q = 1); the budget affords two rounds
    sigma = 2.0
    two, three = (reference_epsilon(r, 1.0, sigma, 1e-5) for r in (2, 3))
    output = tmp_path / "budget"

    # Execute
    _, rows = federate(
        tiny_backbone,
        small_jsonl,
        output,
        clients=2,
        **{
            "num-server-rounds": 5,
            "dp.noise-multiplier": sigma,
            "dp.target-epsilon": (two + three) / 2,
        },
    )

    # Assert
    assert [row["round"] for row in rows] == [0, 1, 2]
    assert rows[-1][dp.EPSILON] == pytest.approx(two, rel=1e-9)
    summary = json.loads((output / "summary.json").read_text())
    assert summary["stopped_early"] is True
    assert "before round 3" in summary["stop_reason"]
    assert "dp.target-epsilon" in summary["stop_reason"]
    assert summary["privacy"]["epsilon"] == pytest.approx(two, rel=1e-9)
    assert summary["privacy"]["rounds_charged"] == 2


def test_epsilon_is_in_every_metrics_line_and_a_resume_continues_the_account(
    tiny_backbone: Path, small_jsonl: Path, tmp_path: Path
) -> None:
    # Prepare: two rounds, then the same run resumed for a third
    sigma = 1.5
    output = tmp_path / "resumed"
    settings = {"dp.noise-multiplier": sigma, "num-server-rounds": 2}
    federate(tiny_backbone, small_jsonl, output, clients=2, **settings)

    # Execute
    _, rows = federate(
        tiny_backbone,
        small_jsonl,
        output,
        clients=2,
        **{**settings, "num-server-rounds": 3, "resume": True},
    )

    # Assert
    assert [row["round"] for row in rows] == [0, 1, 2, 3]
    assert rows[0][dp.EPSILON] == 0.0
    for row in rows[1:]:
        assert row[dp.EPSILON] == pytest.approx(
            reference_epsilon(row["round"], 1.0, sigma, 1e-5), rel=1e-9
        )
    assert load_checkpoint(output).rows[-1][dp.EPSILON] == rows[-1][dp.EPSILON]
    summary = json.loads((output / "summary.json").read_text())
    assert summary["stopped_early"] is False
    assert summary["privacy"]["epsilon"] == rows[-1][dp.EPSILON]


# -- sample level: DP-SGD through Opacus ---------------------------------------------


def tiny_lora_classifier(backbone: Path, num_labels: int = 3) -> Any:
    """The tiny BERT with LoRA on query and value, every dropout off, B random (so
    that A has gradients too)."""
    import torch

    from common.config import LoraSettings
    from common.tasks.text_classification.model import attach_lora, load_encoder

    model = attach_lora(
        load_encoder(backbone),
        LoraSettings(4, 8, 0.0, ("query", "value")),
        "mean",
        num_labels,
        0,
    )
    generator = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for name, parameter in model.named_parameters():
            if "lora_B" in name:
                parameter.copy_(torch.randn(parameter.shape, generator=generator))
    for module in model.modules():
        if isinstance(module, torch.nn.Dropout):
            module.p = 0.0
    return model


def test_opacus_per_sample_gradients_equal_per_example_backward_passes(
    tiny_backbone: Path,
) -> None:
    # Prepare: five rows of different lengths (padding in the batch)
    import torch
    from opacus import GradSampleModule
    from torch.nn import functional as F

    model = tiny_lora_classifier(tiny_backbone)
    model.train()
    ids = torch.randint(5, 40, (5, 9), generator=torch.Generator().manual_seed(1))
    mask = torch.ones_like(ids)
    mask[0, 4:], mask[3, 7:] = 0, 0
    labels = torch.tensor([0, 1, 2, 1, 0])
    trained = [(n, p) for n, p in model.named_parameters() if p.requires_grad]

    # Execute: per-sample gradients from one batched pass, then one pass per row
    wrapped = GradSampleModule(model, loss_reduction="sum")
    F.cross_entropy(wrapped(ids, mask), labels, reduction="sum").backward()
    per_sample = {n: p.grad_sample.detach().clone() for n, p in trained}
    wrapped._close()
    per_example = [
        torch.autograd.grad(
            F.cross_entropy(model(ids[i : i + 1], mask[i : i + 1]), labels[i : i + 1]),
            [p for _, p in trained],
        )
        for i in range(len(labels))
    ]

    # Assert
    assert any("lora_A" in n for n, _ in trained) and any(
        "head" in n for n, _ in trained
    )
    for i, gradients in enumerate(per_example):
        for (name, _), gradient in zip(trained, gradients, strict=True):
            assert gradient.abs().sum() > 0 or "lora" in name
            torch.testing.assert_close(
                per_sample[name][i], gradient, rtol=1e-4, atol=1e-6, msg=name
            )


def test_dp_sgd_steps_are_accounted_by_opacus_and_the_site_keeps_its_history(
    tiny_backbone: Path,
) -> None:
    # Prepare
    from opacus.accountants import RDPAccountant
    from transformers import AutoTokenizer

    from client.finetune import LocalTraining
    from client.private_training import dp_sgd, sample_rate
    from common.batching import encode
    from common.tasks.text_classification.model import adapter_state

    model = tiny_lora_classifier(tiny_backbone)
    texts = ["send money to my account", "book flight", "lights on please"] * 4
    encoded = encode(
        AutoTokenizer.from_pretrained(str(tiny_backbone)), texts, [0, 1, 2] * 4, 16
    )
    plan = LocalTraining(
        epochs=1, max_steps=0, batch_size=3, lr=0.01, head_lr=0.01,
        weight_decay=0.0, seed=1,
    )  # fmt: skip
    private = settings(level="sample", clip_norm=0.5, noise_multiplier=1.1)
    before = adapter_state(model)

    # Execute: two rounds at the same site
    first, history, _ = dp_sgd(model, encoded, 0, plan, private, [])
    second, history, epsilon = dp_sgd(model, encoded, 0, plan, private, history)

    # Assert
    q = sample_rate(12, 3)
    assert q == 0.25 and first.steps == second.steps == 4
    assert history == [(1.1, q, 8)]
    reference = RDPAccountant()
    reference.history = [(1.1, q, 8)]
    assert epsilon == pytest.approx(reference.get_epsilon(delta=1e-5), rel=1e-12)
    after = adapter_state(model)
    assert any(not np.array_equal(after[k], before[k]) for k in before)
    # The hooks are gone: the model is shared by the clients of a process.
    assert not any(hasattr(p, "grad_sample") for p in model.parameters())
    assert not any(m._forward_hooks or m._backward_hooks for m in model.modules())


def test_dp_sgd_batches_follow_a_secret_seed_not_the_runs_seed(
    tiny_backbone: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Poisson sampling must not be predictable from ``plan.seed`` (which the
    coordinator can derive): the accountant assumes the batches are secret."""
    # Prepare
    from transformers import AutoTokenizer

    from client import private_training
    from client.finetune import LocalTraining
    from common.batching import encode

    texts = [f"row number {i}" for i in range(40)]
    encoded = encode(
        AutoTokenizer.from_pretrained(str(tiny_backbone)), texts, [0, 1] * 20, 16
    )
    private = settings(level="sample", clip_norm=0.5, noise_multiplier=1.1)

    def samples(secret: int, plan_seed: int) -> int:
        monkeypatch.setattr(private_training.secrets, "randbits", lambda _: secret)
        plan = LocalTraining(
            epochs=2, max_steps=0, batch_size=4, lr=0.01, head_lr=0.01,
            weight_decay=0.0, seed=plan_seed,
        )  # fmt: skip
        model = tiny_lora_classifier(tiny_backbone)
        return private_training.dp_sgd(model, encoded, 0, plan, private, [])[0].samples

    # Execute
    same_secret = {samples(7, plan_seed) for plan_seed in (1, 2)}
    other_secrets = {samples(secret, 1) for secret in (7, 8, 9)}

    # Assert: 20 Poisson batches of rate 0.1 over 40 rows: the plan's seed changes
    # nothing, the secret changes the draws
    assert len(same_secret) == 1
    assert len(other_secrets) > 1


def test_sample_level_runs_report_each_sites_epsilon_every_round(
    tiny_backbone: Path, small_jsonl: Path, tmp_path: Path
) -> None:
    # Execute
    output = tmp_path / "dp-sgd"
    _, rows = federate(
        tiny_backbone,
        small_jsonl,
        output,
        clients=2,
        **{"num-server-rounds": 2, "dp.level": "sample", "aggregation": "median"},
    )

    # Assert: the sites' accounts grow; no client-level account is kept
    assert [row["round"] for row in rows] == [0, 1, 2]
    first, second = (row["sample_epsilon_max"] for row in rows[1:])
    assert 0 < first < second
    assert all(dp.EPSILON not in row for row in rows)
    summary = json.loads((output / "summary.json").read_text())
    assert summary["privacy"]["level"] == "sample"
    assert summary["privacy"]["sample_epsilon_max"] == second


# -- adaptive clipping (Andrew et al. 2021) ----------------------------------------


def plain_round(norms: list[float], size: int = 4) -> RoundSum:
    """A plain round whose clients sent deltas of the given L2 norms."""
    contributions = [
        Contribution(i, {"w": np.full(size, norm / np.sqrt(size), np.float32)}, 1.0)
        for i, norm in enumerate(norms)
    ]
    return RoundSum(
        total={"w": np.zeros(size, np.float32)},
        weight=float(len(norms)),
        count=len(norms),
        contributions=contributions,
    )


def adaptive(**overrides: Any) -> DpConfig:
    """Adaptive clipping with (almost) no noise: z = sigma_b = 1e-6."""
    return settings(
        **{
            "adaptive_clip": True,
            "noise_multiplier": 1e-6,
            "clipped_count_stddev": 1e-6,
            **overrides,
        }
    )


@pytest.mark.parametrize(
    ("unclipped", "gamma", "factor"),
    [
        (0.0, 0.5, np.exp(0.2 * 0.5)),  # every update clipped: C grows
        (1.0, 0.5, np.exp(-0.2 * 0.5)),  # every update fits: C shrinks
        (0.5, 0.5, 1.0),  # at the target quantile: C stays
        (0.0, 0.9, np.exp(0.2 * 0.9)),
        (1.0, 0.9, np.exp(-0.2 * 0.1)),
    ],
)
def test_the_clip_norm_update_is_geometric_in_the_unclipped_share(
    unclipped: float, gamma: float, factor: float
) -> None:
    assert dp.next_clip_norm(2.0, unclipped, gamma, 0.2) == pytest.approx(2.0 * factor)


@pytest.mark.parametrize(
    ("norm_over_clip", "factor"),
    [(10.0, np.exp(0.2 * 0.5)), (0.1, np.exp(-0.2 * 0.5))],
)
def test_the_clip_norm_moves_geometrically_while_all_updates_sit_on_one_side(
    norm_over_clip: float, factor: float
) -> None:
    # Prepare: every client's norm is a fixed multiple of the current C
    privacy = ClientLevelDP(adaptive(clip_norm=1.0), rng=np.random.default_rng(0))
    clips = [privacy.clip_norm]

    # Execute: three rounds of four clients
    for _ in range(3):
        privacy.begin_round(cohort(4, 4))
        stats = Stats()
        privacy.release(plain_round([norm_over_clip * privacy.clip_norm] * 4), stats)
        assert stats.privacy[dp.CLIP_NORM] == clips[-1]
        clips.append(privacy.clip_norm)

    # Assert
    np.testing.assert_allclose(np.diff(np.log(clips)), np.log(factor), rtol=1e-4)


@pytest.mark.parametrize("gamma", [0.2, 0.5, 0.8])
def test_the_clip_norm_settles_at_the_target_quantile_of_the_norms(
    gamma: float,
) -> None:
    # Prepare: ten clients with norms 1..10 every round
    norms = [float(n) for n in range(1, 11)]
    privacy = ClientLevelDP(
        adaptive(clip_norm=0.1, target_quantile=gamma, clip_lr=0.5),
        rng=np.random.default_rng(1),
    )

    # Execute
    for _ in range(80):
        privacy.begin_round(cohort(10, 10))
        privacy.release(plain_round(norms), Stats())

    # Assert: within one client of the gamma quantile
    assert 10 * gamma - 1 <= privacy.clip_norm <= 10 * gamma + 1


@pytest.mark.parametrize(
    ("z", "count_stddev", "expected"),
    [(1.0, 1.0, (1 - 0.25) ** -0.5), (1.0, 5.0, (1 - 0.01) ** -0.5), (0.6, 0.5, 0.75)],
)
def test_the_delta_noise_multiplier_keeps_the_round_at_z_theorem_1(
    z: float, count_stddev: float, expected: float
) -> None:
    sigma_delta = dp.delta_noise_multiplier(z, count_stddev)
    assert sigma_delta == pytest.approx(expected)
    assert sigma_delta > z
    assert sigma_delta**-2 + (2 * count_stddev) ** -2 == pytest.approx(z**-2)


def test_the_coordinator_noises_the_delta_with_the_raised_multiplier() -> None:
    # Prepare: z = 1, sigma_b = 1 -> sigma_delta = 2 / sqrt(3), C = 0.5
    privacy = ClientLevelDP(
        settings(
            adaptive_clip=True,
            noise_multiplier=1.0,
            clipped_count_stddev=1.0,
            clip_norm=0.5,
        )
    )
    zero = {"w": np.zeros((400, 500), np.float32)}
    privacy.begin_round(cohort(4, 4))
    stats = Stats()

    # Execute: a secure round (no individual updates) whose clients all fit
    released = privacy.release(
        RoundSum(total=zero, weight=4.0, count=4, unclipped=4.0), stats
    )

    # Assert: the delta's noise is raised, the charge stays z
    assert released is not None
    noise = released.total["w"].astype(np.float64)
    assert noise.std() == pytest.approx(2 / np.sqrt(3) * 0.5, rel=0.01)
    assert stats.privacy[dp.NOISE_MULTIPLIER] == 1.0
    assert stats.privacy[dp.COUNT_STDDEV] == 1.0
    assert stats.privacy[dp.EPSILON] == pytest.approx(
        reference_epsilon(1, 1.0, 1.0, 1e-5)
    )


@pytest.mark.parametrize("count_stddev", [0.5, 0.25, 0.1])
def test_a_clipped_count_noise_too_small_for_the_noise_multiplier_is_refused(
    count_stddev: float,
) -> None:
    with pytest.raises(ValueError, match="sigma_b"):
        dp.delta_noise_multiplier(1.0, count_stddev)
    with pytest.raises(ConfigError, match="config key 'dp.clipped-count-stddev'"):
        RunConfig.from_flat(
            {
                "dp.enabled": True,
                "dp.adaptive-clip": True,
                "dp.noise-multiplier": 1.0,
                "dp.clipped-count-stddev": count_stddev,
            }
        )


def test_the_default_clipped_count_noise_is_refused_when_too_few_clients_sample() -> (
    None
):
    # Prepare: sigma_b = m / 20 = 0.2 for m = 4, below z / 2 = 0.5
    privacy = ClientLevelDP(settings(adaptive_clip=True, noise_multiplier=1.0))

    # Execute / Assert
    with pytest.raises(ConfigError, match="dp.clipped-count-stddev") as refusal:
        privacy.begin_round(cohort(4, 10))
    assert "dp.noise-multiplier" in str(refusal.value)
    assert "10 clients per round" in str(refusal.value)


def test_the_default_clipped_count_noise_is_m_over_20_of_the_first_round() -> None:
    # Prepare
    privacy = ClientLevelDP(settings(adaptive_clip=True, noise_multiplier=1.0))

    # Execute: 40 sampled, then fewer
    privacy.begin_round(cohort(40, 100))
    privacy.release(None, Stats())
    privacy.begin_round(cohort(30, 100))

    # Assert: fixed at 40 / 20 for the run
    assert privacy.count_stddev == 2.0
    assert privacy.delta_noise_multiplier == pytest.approx((1 - 1 / 16) ** -0.5)


@pytest.mark.parametrize(
    ("overrides", "key"),
    [
        ({"dp.target-quantile": 1.5}, "dp.target-quantile"),
        ({"dp.clip-lr": 0.0}, "dp.clip-lr"),
        ({"dp.clipped-count-stddev": -1.0}, "dp.clipped-count-stddev"),
        ({"dp.adaptive-clip": True, "dp.level": "sample"}, "dp.adaptive-clip"),
    ],
)
def test_invalid_adaptive_clipping_settings_are_refused_naming_the_key(
    overrides: dict[str, Any], key: str
) -> None:
    with pytest.raises(ConfigError, match=f"config key '{key}'"):
        RunConfig.from_flat({"dp.enabled": True, **overrides})


@pytest.mark.parametrize(("secure", "bound"), [(False, 0.0), (True, 5.0)])
def test_a_plain_sum_under_adaptive_clipping_leaves_the_norm_bound_to_the_clip(
    secure: bool, bound: float
) -> None:
    # Execute: the coordinator clips each plain delta to the round's C itself
    config = RunConfig.from_flat(
        {
            "dp.enabled": True,
            "dp.adaptive-clip": True,
            "secagg.enabled": secure,
            "train.max-update-norm": 5.0,
        }
    )

    # Assert
    assert config.update_norm_bound == bound


def test_adaptive_clipping_without_dp_is_refused_naming_the_key() -> None:
    with pytest.raises(ConfigError, match="config key 'dp.adaptive-clip'"):
        RunConfig.from_flat({"dp.enabled": False, "dp.adaptive-clip": True})


@pytest.mark.parametrize(
    ("unclipped", "share"), [(10, 1.0), (0, 0.0), (4, 0.4), (7, 0.7)]
)
def test_the_released_share_is_rebuilt_from_centred_bits(
    unclipped: int, share: float
) -> None:
    # Prepare: ten clients, each adding b_i - 1/2 (one client moves the sum by 1/2)
    bits = [dp.centred_bit(i < unclipped) for i in range(10)]

    # Execute
    released = dp.noisy_unclipped_fraction(sum(bits), 10, 0.0, np.random.default_rng(0))

    # Assert
    assert {abs(b) for b in bits} == {0.5}
    assert released == pytest.approx(share)


def test_the_adaptive_clip_norm_is_rebuilt_from_the_metrics_rows() -> None:
    # Prepare: three rounds, their lines kept as a checkpoint keeps them
    config = adaptive(clip_norm=1.0)
    privacy = ClientLevelDP(config, rng=np.random.default_rng(2))
    rows: list[dict[str, Any]] = [{"round": 0, **privacy.metrics()}]
    for norms in ([5.0, 5.0, 0.1], [0.1, 0.1, 0.1], [9.0, 9.0, 9.0]):
        privacy.begin_round(cohort(3, 3))
        stats = Stats()
        privacy.release(plain_round(norms), stats)
        rows.append(json.loads(json.dumps(stats.privacy)))

    # Execute
    resumed = ClientLevelDP(config, rows)

    # Assert
    assert resumed.clip_norm == privacy.clip_norm
    assert resumed.count_stddev == privacy.count_stddev
    assert resumed.epsilon == privacy.epsilon


def test_a_capped_adaptive_clip_norm_stays_at_the_ceiling() -> None:
    privacy = ClientLevelDP(adaptive(clip_norm=1.0), clip_ceiling=1.05)
    for _ in range(3):
        privacy.begin_round(cohort(2, 2))
        privacy.release(plain_round([100.0, 100.0]), Stats())
    assert privacy.clip_norm == 1.05


ADAPTIVE_RUNS = {
    "plain": {},
    "secagg-central": {"secagg.enabled": True, "secagg.max-weight": 10.0},
    "secagg-distributed": {
        "secagg.enabled": True,
        "secagg.max-weight": 10.0,
        "dp.mode": "distributed",
    },
}


@pytest.mark.parametrize("summing", sorted(ADAPTIVE_RUNS))
@pytest.mark.parametrize(("initial", "all_fit"), [(1e-4, False), (50.0, True)])
def test_adaptive_clipping_moves_the_clip_norm_in_a_federated_run(
    summing: str,
    initial: float,
    all_fit: bool,
    tiny_backbone: Path,
    small_jsonl: Path,
    tmp_path: Path,
) -> None:
    # Prepare: C far below (or above) every client's update norm, almost no noise
    output = tmp_path / summing

    # Execute
    grid, rows = federate(
        tiny_backbone,
        small_jsonl,
        output,
        clients=3,
        **{
            "num-server-rounds": 2,
            "secagg.clip-norm": 50.0,
            "dp.clip-norm": initial,
            "dp.adaptive-clip": True,
            "dp.noise-multiplier": 1e-3,
            "dp.clipped-count-stddev": 1e-3,
            **ADAPTIVE_RUNS[summing],
        },
    )

    # Assert: each round's C reached the clients and moved by the released share
    assert [row["round"] for row in rows] == [0, 1, 2]
    assert rows[0][dp.CLIP_NORM] == rows[1][dp.CLIP_NORM] == initial
    for row in rows[1:]:
        assert row["clients"] == 3
        assert row[dp.UNCLIPPED_FRACTION] == pytest.approx(
            1.0 if all_fit else 0.0, abs=0.01
        )
    first, second = rows[1], rows[2]
    assert second[dp.CLIP_NORM] == min(
        50.0,
        dp.next_clip_norm(first[dp.CLIP_NORM], first[dp.UNCLIPPED_FRACTION], 0.5, 0.2),
    )
    assert (second[dp.CLIP_NORM] > initial) != all_fit
    sent: dict[Any, set[Any]] = {}
    for message in grid.sent:
        if message.metadata.message_type == MessageType.TRAIN:
            record = message.content.config_records[keys.CONFIG_RECORD]
            sent.setdefault(record[keys.CFG_ROUND], set()).add(
                record[keys.CFG_DP_CLIP_NORM]
            )
    assert sent == {1: {first[dp.CLIP_NORM]}, 2: {second[dp.CLIP_NORM]}}
    summary = json.loads((output / "summary.json").read_text())
    assert summary["privacy"]["adaptive_clip"] is True


def test_the_adaptive_clip_norm_survives_a_resume(
    tiny_backbone: Path, small_jsonl: Path, tmp_path: Path
) -> None:
    # Prepare: two rounds, then the same run resumed for a third
    output = tmp_path / "resumed"
    settings = {
        "num-server-rounds": 2,
        "dp.clip-norm": 1e-4,
        "dp.adaptive-clip": True,
        "dp.noise-multiplier": 0.5,
        "dp.clipped-count-stddev": 1.0,
    }
    _, before = federate(tiny_backbone, small_jsonl, output, clients=2, **settings)

    # Execute
    grid, rows = federate(
        tiny_backbone,
        small_jsonl,
        output,
        clients=2,
        **{**settings, "num-server-rounds": 3, "resume": True},
    )

    # Assert: round 3 clipped at C moved by round 2's released share
    assert rows[:3] == before
    expected = dp.next_clip_norm(
        rows[2][dp.CLIP_NORM], rows[2][dp.UNCLIPPED_FRACTION], 0.5, 0.2
    )
    assert rows[3][dp.CLIP_NORM] == expected
    sent = next(
        m for m in grid.sent if m.metadata.message_type == MessageType.TRAIN
    ).content.config_records[keys.CONFIG_RECORD]
    assert sent[keys.CFG_DP_CLIP_NORM] == expected
    assert sent[keys.CFG_DP_NOISE_MULTIPLIER] == pytest.approx(
        dp.delta_noise_multiplier(0.5, 1.0)
    )
    assert rows[3][dp.EPSILON] == pytest.approx(
        reference_epsilon(3, 1.0, 0.5, 1e-5), rel=1e-9
    )


# -- the ready secagg-dp config ------------------------------------------------------

CONFIGS = Path(__file__).resolve().parent.parent / "simulations" / "configs"
SECAGG_DP = CONFIGS / "secagg-dp.toml"


def test_the_secagg_dp_config_is_valid_and_its_budget_affords_rounds() -> None:
    # Execute
    from simulations.cli import load_config

    config = load_config(str(SECAGG_DP), [])

    # Assert: secure aggregation, distributed client-level DP, a budget, offline data
    assert config.secagg.enabled and config.dp.client_level
    assert config.dp.mode == "distributed" and config.dp.target_epsilon > 0
    assert config.data.path == ""  # the built-in demo corpus
    every_round = dp.RoundCharge(config.train.fraction, config.dp.noise_multiplier)
    assert dp.PrivacyAccountant(config.dp.delta, [every_round]).epsilon() < (
        config.dp.target_epsilon
    )


@pytest.mark.slow
def test_the_secagg_dp_config_runs_until_its_budget_stops_it(
    tiny_backbone: Path, tmp_path: Path
) -> None:
    # Prepare: the config as written, on the tiny backbone with one step per round
    from simulations.cli import load_config

    config = load_config(str(SECAGG_DP), [])
    flat = {
        **config.flat,
        "model.name": str(tiny_backbone),
        "model.max-length": 16,
        "train.max-steps": 1,
        "output.dir": str(tmp_path / "run"),
    }
    clients = config.sim.num_clients
    cache = str(tmp_path / "cache")
    nodes = {
        100 + i: {"partition-id": i, "num-partitions": clients, "cache-dir": cache}
        for i in range(clients)
    }

    # Execute
    coordinate(InProcessGrid(client_app, nodes), RunConfig.from_flat(flat))  # type: ignore[arg-type]

    # Assert: the budget affords five of the six rounds; noise shares all present
    rows = [json.loads(line) for line in (tmp_path / "run/metrics.jsonl").open()]
    assert [row["round"] for row in rows] == [0, 1, 2, 3, 4, 5]
    assert all(row[dp.EPSILON] <= config.dp.target_epsilon for row in rows)
    summary = json.loads((tmp_path / "run/summary.json").read_text())
    assert summary["stopped_early"] is True
    assert "before round 6" in summary["stop_reason"]
    assert all(row[dp.NOISE_SHORTFALL] == 0.0 for row in rows[1:])
    assert all(row["clients"] == clients for row in rows[1:])


# -- noise from the OS's CSPRNG --------------------------------------------------------


def test_secure_noise_is_gaussian_and_every_bit_comes_from_the_os_csprng(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    # Prepare: count the bytes drawn from secrets
    drawn: list[int] = []
    original = dp.secrets.token_bytes

    def counting(n: int) -> bytes:
        drawn.append(n)
        return original(n)

    monkeypatch.setattr(dp.secrets, "token_bytes", counting)

    # Execute
    noise = dp.secure_generator().normal(0.0, 1.5, size=(400, 501))

    # Assert: 8 bytes per draw; the std, and the share within one std, of N(0, 1.5^2)
    assert noise.shape == (400, 501) and sum(drawn) == 8 * noise.size
    assert noise.std() == pytest.approx(1.5, rel=0.01)
    assert abs(noise.mean()) < 0.01
    assert np.mean(np.abs(noise) < 1.5) == pytest.approx(0.6827, abs=0.005)


def test_dp_sgd_draws_its_noise_from_the_sites_noise_source(
    tiny_backbone: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Opacus's torch generator is bypassed: with the batches fixed, the trained
    adapter follows the noise source alone."""
    # Prepare
    from transformers import AutoTokenizer

    from client import private_training
    from client.finetune import LocalTraining
    from common.batching import encode
    from common.tasks.text_classification.model import adapter_state

    texts = [f"row number {i}" for i in range(12)]
    encoded = encode(
        AutoTokenizer.from_pretrained(str(tiny_backbone)), texts, [0, 1] * 6, 16
    )
    plan = LocalTraining(
        epochs=1, max_steps=2, batch_size=4, lr=0.05, head_lr=0.05,
        weight_decay=0.0, seed=1,
    )  # fmt: skip
    private = settings(level="sample", clip_norm=0.5, noise_multiplier=1.0)
    monkeypatch.setattr(private_training.secrets, "randbits", lambda _: 7)

    def trained(noise_seed: int) -> dict[str, np.ndarray]:
        monkeypatch.setattr(
            private_training.dp,
            "secure_generator",
            lambda: np.random.default_rng(noise_seed),
        )
        model = tiny_lora_classifier(tiny_backbone)
        private_training.dp_sgd(model, encoded, 0, plan, private, [])
        return adapter_state(model)

    # Execute
    first, again, other = trained(1), trained(1), trained(2)

    # Assert
    assert all(np.array_equal(first[k], again[k]) for k in first)
    assert any(not np.array_equal(first[k], other[k]) for k in first)
