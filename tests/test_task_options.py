"""``model.quantize``, ``lora.layers`` and ``dp.level = sample`` for the causal
language model and the image classifier: tiny Llama, GPT-2, ViT and ResNet
backbones built offline from a config, trained at a site (``client.sites``) and by
the real coordinator and ClientApp in process."""

from __future__ import annotations

import importlib.util
import json
import math
import re
from pathlib import Path

import numpy as np
import pytest
import torch
from flwr.app import Context, RecordDict

from client.client_app import SITE_RUNTIME
from client.client_app import app as client_app
from client.finetune import FinetuneResult, LocalTraining
from client.sites import SiteModel, SiteRequest
from common import keys
from common.backbone import fingerprint
from common.config import ConfigError, RunConfig
from common.splits import client_examples, run_labels
from common.wire import from_array_record
from server.checkpoint import load_checkpoint
from server.server_app import coordinate
from simulations.inprocess_grid import InProcessGrid
from tests.task_runs import federate, image_settings, lm_settings

HAS_BITSANDBYTES = importlib.util.find_spec("bitsandbytes") is not None
needs_bitsandbytes = pytest.mark.skipif(
    not HAS_BITSANDBYTES, reason="needs bitsandbytes"
)
CLIENTS = 2
#: Where each tiny backbone keeps its blocks (two of them), as PEFT names them.
BLOCKS = {
    "llama": r"\.model\.layers\.(\d+)\.",
    "gpt2": r"\.transformer\.h\.(\d+)\.",
    "vit": r"\.layers?\.(\d+)\.",
    "resnet": r"\.encoder\.stages\.(\d+)\.",
}


@pytest.fixture(scope="module")
def backbones(
    small_causal_lms: dict[str, Path], vision_backbones: dict[str, Path]
) -> dict[str, Path]:
    """Two-block Llama, GPT-2 and ViT, and a two-stage ResNet."""
    return {**small_causal_lms, **vision_backbones}


def task_of(kind: str) -> str:
    return "causal-lm" if kind in ("llama", "gpt2") else "image-cls"


def options_config(
    kind: str,
    backbones: dict[str, Path],
    corpus: Path,
    images: Path,
    output: Path,
    **overrides: object,
) -> RunConfig:
    """A one-round, two-client run of ``kind``'s task over an IID split;
    ``overrides`` win."""
    lm = task_of(kind) == "causal-lm"
    settings = (lm_settings if lm else image_settings)(
        backbones[kind],
        corpus if lm else images,
        output,
        **{
            "data.partition": "iid",
            "sim.num-clients": CLIENTS,
            "num-server-rounds": 1,
            **overrides,
        },
    )
    return RunConfig.from_flat(settings)


def uploads(grid: InProcessGrid) -> list[dict[str, np.ndarray]]:
    """The adapter tensors of every plain training reply."""
    return [
        from_array_record(reply.content.array_records[keys.ADAPTER_RECORD])
        for reply in grid.received
        if not reply.has_error() and keys.ADAPTER_RECORD in reply.content.array_records
    ]


def open_test_site(config: RunConfig, cache: Path) -> SiteModel:
    """The site model of ``config``'s task, as the ClientApp opens it."""
    backbone = Path(config.model.name)
    labels = run_labels(config.data, config.seed)
    return SITE_RUNTIME.open_site(
        SiteRequest(
            config,
            backbone,
            fingerprint(backbone),
            config.lora,
            config.model.pooling,
            labels,
            cache,
        )
    )


def train_at_site(
    config: RunConfig, cache: Path, context: Context | None = None
) -> tuple[SiteModel, FinetuneResult, float | None]:
    """One round of training at a site holding all of the run's training rows."""
    site = open_test_site(config, cache)
    rows = site.encode(client_examples(config.data, config.seed, 0, 1))
    plan = LocalTraining.from_config(config, "lora", seed=1)
    start = site.state()
    result, epsilon = site.train(rows, plan, "lora", start, context or new_context())
    return site, result, epsilon


def new_context() -> Context:
    return Context(
        run_id=1, node_id=1, node_config={}, state=RecordDict(), run_config={}
    )


def lora_names(state: dict[str, np.ndarray]) -> list[str]:
    return [name for name in state if ".lora_" in name]


def coordinator_state(config: RunConfig) -> dict[str, np.ndarray]:
    """The coordinator's full-precision initial adapter for ``config``."""
    from common.tasks.causal_lm.model import lm_adapter_state, load_causal_lm
    from common.tasks.image_classification.model import (
        image_adapter_state,
        load_image_classifier,
    )

    backbone = Path(config.model.name)
    if config.model.task == "causal-lm":
        return lm_adapter_state(load_causal_lm(backbone, config.lora, config.seed))
    labels = run_labels(config.data, config.seed)
    return image_adapter_state(
        load_image_classifier(backbone, config.lora, "native", len(labels), config.seed)
    )


# -- the settings validate for every task ----------------------------------------------


@pytest.mark.parametrize("task", ["causal-lm", "image-cls"])
@pytest.mark.parametrize(
    "setting",
    [
        {"model.quantize": "4bit"},
        {"model.quantize": "8bit"},
        {"lora.layers": 2},
        {"dp.enabled": True, "dp.level": "sample"},
    ],
)
def test_the_three_options_validate_for_every_task(
    task: str, setting: dict[str, object]
) -> None:
    # Prepare
    flat = {"model.task": task, "data.path": "rows.jsonl", **setting}
    if task == "image-cls":
        flat["head.init"] = "random"

    # Execute
    config = RunConfig.from_flat(flat)

    # Assert
    assert {key: config.flat[key] for key in setting} == setting


@pytest.mark.parametrize(
    ("task", "overrides", "key"),
    [
        ("image-cls", {"train.mode": "lp-ft"}, "train.mode"),
        ("image-cls", {"aggregation": "fedavg-per-label"}, "aggregation"),
        ("causal-lm", {"aggregation": "fedprox"}, "aggregation"),
        ("causal-lm", {"dp.target-epsilon": 3.0}, "dp.target-epsilon"),
    ],
)
def test_dp_sgd_settings_that_do_not_fit_stay_refused_naming_the_key(
    task: str, overrides: dict[str, object], key: str
) -> None:
    flat = {
        "model.task": task,
        "data.path": "rows.jsonl",
        "head.init": "random" if task == "image-cls" else "label-names",
        "dp.enabled": True,
        "dp.level": "sample",
        **overrides,
    }
    with pytest.raises(ConfigError, match=f"config key '{key}'"):
        RunConfig.from_flat(flat)


# -- model.quantize --------------------------------------------------------------------


@needs_bitsandbytes
@pytest.mark.parametrize(
    ("kind", "mode", "layer_class"),
    [
        ("llama", "4bit", "Linear4bit"),
        ("llama", "8bit", "Linear8bitLt"),
        ("gpt2", "4bit", "Linear4bit"),  # its Conv1D projections are quantised too
        ("vit", "4bit", "Linear4bit"),
        ("vit", "8bit", "Linear8bitLt"),
    ],
)
def test_a_quantised_backbone_trains_its_adapters_on_a_cpu(
    backbones: dict[str, Path],
    small_lm_corpus: Path,
    few_images: Path,
    tmp_path: Path,
    kind: str,
    mode: str,
    layer_class: str,
) -> None:
    # Prepare: the site starts from the coordinator's full-precision adapter
    config = options_config(
        kind,
        backbones,
        small_lm_corpus,
        few_images,
        tmp_path,
        **{"model.quantize": mode},
    )
    site = open_test_site(config, tmp_path)
    start = coordinator_state(config)
    site.load_state(start)

    # Execute
    _, result, epsilon = train_at_site(config, tmp_path)

    # Assert: the frozen linear layers are bitsandbytes' ...
    assert layer_class in {type(m).__name__ for m in site.model.modules()}  # type: ignore[attr-defined]
    # ... and the float32 factors on top of them, the same as the coordinator's, learnt
    after = site.state()
    assert {k: v.shape for k, v in after.items()} == {
        k: v.shape for k, v in start.items()
    }
    assert all(v.dtype == np.float32 for v in after.values())
    assert any(not np.array_equal(after[k], start[k]) for k in start if "lora_B" in k)
    assert result.device == "cpu" and math.isfinite(result.train_loss)
    assert epsilon is None


@needs_bitsandbytes
def test_a_run_with_4bit_sites_lowers_perplexity(
    backbones: dict[str, Path], small_lm_corpus: Path, few_images: Path, tmp_path: Path
) -> None:
    # Prepare
    config = options_config(
        "llama",
        backbones,
        small_lm_corpus,
        few_images,
        tmp_path / "out",
        **{"model.quantize": "4bit", "num-server-rounds": 2},
    )

    # Execute
    _, rows = federate(config, tmp_path)

    # Assert: the sites trained the model their process holds, a 4-bit one
    site = open_test_site(config, tmp_path)
    assert "Linear4bit" in {type(m).__name__ for m in site.model.modules()}  # type: ignore[attr-defined]
    assert all(row["clients"] == CLIENTS and row["rejected"] == 0 for row in rows[1:])
    assert rows[-1]["eval_perplexity"] < rows[0]["eval_perplexity"]


@needs_bitsandbytes
def test_quantising_a_resnet_is_refused_naming_the_key_and_the_family(
    backbones: dict[str, Path], small_lm_corpus: Path, few_images: Path, tmp_path: Path
) -> None:
    # Prepare
    config = options_config(
        "resnet",
        backbones,
        small_lm_corpus,
        few_images,
        tmp_path / "out",
        **{"model.quantize": "4bit"},
    )
    grid = InProcessGrid(client_app, {100: {"cache-dir": str(tmp_path)}})
    message = r"config key 'model.quantize': 4bit .* resnet backbone"

    # Execute / Assert: a site refuses, and the coordinator before any round
    with pytest.raises(ConfigError, match=message):
        open_test_site(config, tmp_path)
    with pytest.raises(ConfigError, match=message):
        coordinate(grid, config)  # type: ignore[arg-type]
    assert grid.sent == []


# -- lora.layers -----------------------------------------------------------------------


@pytest.mark.parametrize("kind", ["llama", "gpt2", "vit", "resnet"])
@pytest.mark.parametrize(("top", "blocks"), [(1, {1}), (2, {0, 1}), (0, {0, 1})])
def test_lora_layers_puts_adapters_on_the_top_blocks_only(
    backbones: dict[str, Path],
    small_lm_corpus: Path,
    few_images: Path,
    tmp_path: Path,
    kind: str,
    top: int,
    blocks: set[int],
) -> None:
    # Prepare
    config = options_config(
        kind, backbones, small_lm_corpus, few_images, tmp_path, **{"lora.layers": top}
    )

    # Execute
    names = lora_names(coordinator_state(config))

    # Assert: a ResNet's "blocks" are its stages; its stem never adapts with N > 0
    found = [re.search(BLOCKS[kind], name) for name in names]
    if top:
        assert names and all(found)
    assert {int(match.group(1)) for match in found if match} == blocks


def test_all_linear_with_lora_layers_covers_every_linear_layer_of_the_top_blocks(
    backbones: dict[str, Path], small_lm_corpus: Path, few_images: Path, tmp_path: Path
) -> None:
    # Prepare
    config = options_config(
        "llama",
        backbones,
        small_lm_corpus,
        few_images,
        tmp_path,
        **{"lora.layers": 1, "lora.target-modules": "all-linear"},
    )

    # Execute
    names = lora_names(coordinator_state(config))

    # Assert
    modules = {name.split(".lora_")[0] for name in names}
    assert {module.rsplit(".", 1)[-1] for module in modules} == {
        "q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"
    }  # fmt: skip
    assert all(".layers.1." in module for module in modules)


@pytest.mark.parametrize("kind", ["llama", "vit"])
def test_a_round_with_lora_layers_sends_only_the_top_blocks_tensors(
    backbones: dict[str, Path],
    small_lm_corpus: Path,
    few_images: Path,
    tmp_path: Path,
    kind: str,
) -> None:
    # Prepare
    config = options_config(
        kind,
        backbones,
        small_lm_corpus,
        few_images,
        tmp_path / "out",
        **{"lora.layers": 1},
    )

    # Execute
    grid, rows = federate(config, tmp_path)

    # Assert
    sent = uploads(grid)
    assert len(sent) == CLIENTS and rows[1]["clients"] == CLIENTS
    for upload in sent:
        lora = lora_names(upload)
        assert lora and all(
            int(re.search(BLOCKS[kind], name).group(1)) == 1  # type: ignore[union-attr]
            for name in lora
        )
        assert set(upload) - set(lora) <= {"head.weight", "head.bias"}
    assert set(load_checkpoint(tmp_path / "out").state) == set(sent[0])


@pytest.mark.parametrize(
    ("kind", "where"),
    [("llama", "2 in model.layers"), ("resnet", "2 in encoder.stages")],
)
def test_lora_layers_beyond_the_backbones_blocks_is_refused_naming_the_key(
    backbones: dict[str, Path],
    small_lm_corpus: Path,
    few_images: Path,
    tmp_path: Path,
    kind: str,
    where: str,
) -> None:
    config = options_config(
        kind, backbones, small_lm_corpus, few_images, tmp_path, **{"lora.layers": 3}
    )
    with pytest.raises(ConfigError, match=f"config key 'lora.layers': 3 .*{where}"):
        coordinator_state(config)


# -- dp.level = sample -----------------------------------------------------------------


def test_sequence_losses_average_each_sequences_own_tokens() -> None:
    # Prepare
    from common.tasks.causal_lm.model import IGNORE, sequence_losses, token_losses

    torch.manual_seed(0)
    logits = torch.randn(2, 4, 6)
    labels = torch.tensor([[IGNORE, 1, 2, 3], [IGNORE, IGNORE, 5, IGNORE]])

    # Execute
    losses = sequence_losses(logits, labels)

    # Assert: each entry is its own row's token mean, whatever the other row holds
    for row in range(2):
        summed, count, _ = token_losses(logits[row : row + 1], labels[row : row + 1])
        torch.testing.assert_close(losses[row], summed / count)
    logits[1] += 1.0
    torch.testing.assert_close(sequence_losses(logits, labels)[0], losses[0])


@pytest.mark.parametrize("kind", ["llama", "gpt2", "vit", "resnet"])
def test_dp_sgd_trains_the_adapters_and_accounts_every_round(
    backbones: dict[str, Path],
    small_lm_corpus: Path,
    few_images: Path,
    tmp_path: Path,
    kind: str,
) -> None:
    # Prepare
    from opacus.accountants import RDPAccountant

    from client.private_training import load_history, sample_rate

    config = options_config(
        kind,
        backbones,
        small_lm_corpus,
        few_images,
        tmp_path,
        **{
            "dp.enabled": True,
            "dp.level": "sample",
            "dp.clip-norm": 0.5,
            "dp.noise-multiplier": 1.1,
            "train.max-steps": 3,
        },
    )
    context = new_context()
    site = open_test_site(config, tmp_path)
    before = site.state()
    norms = {
        name: module.running_mean.clone()
        for name, module in site.model.named_modules()  # type: ignore[attr-defined]
        if isinstance(module, torch.nn.BatchNorm2d)
    }

    # Execute: two rounds at the same site
    _, first_result, first = train_at_site(config, tmp_path, context)
    _, second_result, second = train_at_site(config, tmp_path, context)

    # Assert: the site's own accountant counted both rounds' steps
    rows = len(client_examples(config.data, config.seed, 0, 1))
    q = sample_rate(rows, config.train.batch_size)
    assert first_result.steps == second_result.steps == 3
    assert load_history(context) == [(1.1, q, 6)]
    reference = RDPAccountant()
    reference.history = [(1.1, q, 6)]
    assert first is not None and second is not None
    assert 0 < first < second
    assert second == pytest.approx(reference.get_epsilon(delta=1e-5))
    after = site.state()
    assert any(not np.array_equal(after[k], before[k]) for k in before if "lora_B" in k)
    # The hooks are off (the model is shared by a process's clients) and the frozen
    # batch norms kept the backbone's statistics.
    model = site.model  # type: ignore[attr-defined]
    assert not any(hasattr(p, "grad_sample") for p in model.parameters())
    assert not any(m._forward_hooks or m._backward_hooks for m in model.modules())
    for name, module in model.named_modules():
        if name in norms:
            torch.testing.assert_close(module.running_mean, norms[name])


@pytest.mark.parametrize("kind", ["llama", "vit"])
def test_sample_level_runs_report_each_sites_epsilon(
    backbones: dict[str, Path],
    small_lm_corpus: Path,
    few_images: Path,
    tmp_path: Path,
    kind: str,
) -> None:
    # Prepare
    config = options_config(
        kind,
        backbones,
        small_lm_corpus,
        few_images,
        tmp_path / "out",
        **{
            "num-server-rounds": 2,
            "dp.enabled": True,
            "dp.level": "sample",
            "train.max-steps": 2,
        },
    )

    # Execute
    _, rows = federate(config, tmp_path)

    # Assert: the sites' accounts grow; no client-level account is kept
    assert all(row["clients"] == CLIENTS for row in rows[1:])
    first, second = (row["sample_epsilon_max"] for row in rows[1:])
    assert 0 < first < second  # type: ignore[operator]
    assert all("epsilon" not in row for row in rows)
    summary = json.loads((tmp_path / "out" / "summary.json").read_text())
    assert summary["privacy"]["level"] == "sample"
    assert summary["privacy"]["sample_epsilon_max"] == second
