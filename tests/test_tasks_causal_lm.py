"""Federated LoRA on causal language models (``model.task = causal-lm``): tiny Llama
and GPT-2 backbones built from a config with a word-level tokenizer trained on a
synthetic domain corpus, run by the real coordinator and ClientApp in process."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch

from client.client_app import app as client_app
from common.config import ConfigError, RunConfig
from common.data import DataError, Example
from common.lm_data import encode_lm, load_lm_examples
from server.checkpoint import load_checkpoint
from server.server_app import coordinate
from simulations.inprocess_grid import InProcessGrid
from simulations.task_demo import (
    build_causal_lm,
    domain_sentences,
    instruction_rows,
    write_jsonl,
)

DOMAINS = 4


@pytest.fixture(scope="module")
def corpus(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """120 sentences in four domains, each with its own vocabulary."""
    folder = tmp_path_factory.mktemp("lm-corpus")
    return write_jsonl(folder / "corpus.jsonl", domain_sentences(0, 30))


@pytest.fixture(scope="module")
def backbones(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """A tiny Llama and a tiny GPT-2 sharing one word-level tokenizer's corpus."""
    folder = tmp_path_factory.mktemp("tiny-causal-lms")
    texts = [row["text"] for row in domain_sentences(0, 30)] + ["complete :"]
    return {
        kind: build_causal_lm(folder / kind, texts, kind) for kind in ("llama", "gpt2")
    }


def lm_config(
    backbone: Path, data: Path, output: Path, **overrides: object
) -> RunConfig:
    return RunConfig.from_flat(
        {
            "model.task": "causal-lm",
            "model.name": str(backbone),
            "model.max-length": 32,
            "data.path": str(data),
            "data.partition": "column:domain",
            "sim.num-clients": DOMAINS,
            "num-server-rounds": 3,
            "train.batch-size": 8,
            "train.lr": 0.02,
            "output.dir": str(output),
            **overrides,
        }
    )


def run(config: RunConfig, cache: Path) -> list[dict[str, object]]:
    clients = config.sim.num_clients
    nodes = {
        100 + index: {
            "partition-id": index,
            "num-partitions": clients,
            "cache-dir": str(cache / str(index)),
        }
        for index in range(clients)
    }
    output = coordinate(InProcessGrid(client_app, nodes), config)
    return [json.loads(line) for line in (output / "metrics.jsonl").open()]


def tokenizer_of(backbone: Path):  # type: ignore[no-untyped-def]
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(str(backbone))


# -- rows and the loss mask ---------------------------------------------------------


def test_instruction_rows_carry_loss_on_the_response_only(
    backbones: dict[str, Path],
) -> None:
    # Prepare
    from common.causal_lm import IGNORE, collate_lm

    tokenizer = tokenizer_of(backbones["llama"])
    rows = [
        Example("moves the balance today", "", {"prompt": "complete : my account"}),
        Example("bakes bread", "", {"prompt": "complete : the chef"}),
    ]

    # Execute
    encoded = encode_lm(tokenizer, rows, "prompt", max_length=32)
    batch = collate_lm(encoded, [0, 1], tokenizer.pad_token_id)

    # Assert
    prompt_tokens = len(tokenizer("complete : my account")["input_ids"])
    response = tokenizer("moves the balance today", add_special_tokens=False)
    expected = [*response["input_ids"], tokenizer.eos_token_id]
    labels = batch["labels"][0].tolist()
    assert labels[:prompt_tokens] == [IGNORE] * prompt_tokens
    assert labels[prompt_tokens:] == expected
    padding = batch["attention_mask"][1] == 0
    assert padding.any()  # the shorter row is padded, and its padding has no loss
    assert (batch["labels"][1][padding] == IGNORE).all()


def test_plain_text_carries_loss_on_every_token_but_the_first(
    backbones: dict[str, Path],
) -> None:
    # Prepare
    from common.causal_lm import IGNORE, collate_lm

    tokenizer = tokenizer_of(backbones["gpt2"])
    rows = [Example("the bank sends money today", "")]

    # Execute
    encoded = encode_lm(tokenizer, rows, "", max_length=32)
    batch = collate_lm(encoded, [0], tokenizer.pad_token_id)

    # Assert
    ids = batch["input_ids"][0].tolist()
    assert ids[-1] == tokenizer.eos_token_id
    assert batch["labels"][0].tolist() == [IGNORE, *ids[1:]]


def test_token_losses_average_over_the_tokens_that_carry_loss() -> None:
    # Prepare
    from common.causal_lm import IGNORE, token_losses

    torch.manual_seed(0)
    logits = torch.randn(1, 4, 6)
    labels = torch.tensor([[IGNORE, IGNORE, 3, 5]])

    # Execute
    summed, count, _ = token_losses(logits, labels)

    # Assert: positions 1 and 2 predict tokens 3 and 5; position 0 predicts nothing
    manual = -(
        torch.log_softmax(logits[0, 1], -1)[3] + torch.log_softmax(logits[0, 2], -1)[5]
    )
    assert count == 2
    torch.testing.assert_close(summed, manual)


def test_long_rows_keep_half_the_limit_for_the_response(
    backbones: dict[str, Path],
) -> None:
    # Prepare
    tokenizer = tokenizer_of(backbones["llama"])
    prompt = " ".join(["the bank sends money today"] * 6)  # 30 tokens
    rows = [Example("holds the balance at noon", "", {"prompt": prompt})]

    # Execute
    encoded = encode_lm(tokenizer, rows, "prompt", max_length=12)

    # Assert: 5 response tokens and the end token all fit; the prompt keeps its end
    assert len(encoded.ids[0]) == 12
    assert int(encoded.loss_from[0]) == 12 - 6
    assert encoded.ids[0][-1] == tokenizer.eos_token_id


def test_instruction_rows_without_the_prompt_column_name_the_line(
    tmp_path: Path,
) -> None:
    # Prepare
    path = write_jsonl(
        tmp_path / "rows.jsonl",
        [{"prompt": "a", "response": "b"}, {"question": "c", "response": "d"}],
    )

    # Execute / Assert
    with pytest.raises(DataError, match=r"rows.jsonl:2: no column 'prompt'"):
        load_lm_examples(path, "text", "prompt", "response")


# -- the model -----------------------------------------------------------------------


@pytest.mark.parametrize(
    ("kind", "targets", "expected"),
    [
        ("llama", "query,value", ("q_proj", "v_proj")),  # the default resolves
        ("gpt2", "query,value", ("c_attn",)),
        ("llama", "all-linear", ("all-linear",)),
    ],
)
def test_lora_targets_resolve_per_backbone(
    backbones: dict[str, Path], kind: str, targets: str, expected: tuple[str, ...]
) -> None:
    # Prepare
    from transformers import AutoModelForCausalLM

    from common.lora_targets import resolve_targets

    config = RunConfig.from_flat({"lora.target-modules": targets})
    model = AutoModelForCausalLM.from_pretrained(str(backbones[kind]))

    # Execute
    resolved = resolve_targets(config.lora, model)

    # Assert
    assert resolved.target_modules == expected


@pytest.mark.parametrize("targets", ["query,value", "all-linear"])
def test_adapter_state_holds_lora_factors_and_no_head(
    backbones: dict[str, Path], targets: str
) -> None:
    # Prepare
    from common.causal_lm import lm_adapter_state, load_causal_lm

    settings = RunConfig.from_flat({"lora.target-modules": targets}).lora

    # Execute
    state = lm_adapter_state(load_causal_lm(backbones["llama"], settings, seed=3))

    # Assert
    assert state and all(".lora_A." in k or ".lora_B." in k for k in state)
    assert not any(k.startswith("head.") or "lm_head" in k for k in state)


# -- federated runs --------------------------------------------------------------------


@pytest.mark.parametrize("kind", ["llama", "gpt2"])
def test_federated_training_lowers_eval_perplexity(
    backbones: dict[str, Path], corpus: Path, tmp_path: Path, kind: str
) -> None:
    # Prepare
    config = lm_config(backbones[kind], corpus, tmp_path / "out")

    # Execute
    rows = run(config, tmp_path)

    # Assert
    perplexity = [row["eval_perplexity"] for row in rows]
    assert [row["round"] for row in rows] == [0, 1, 2, 3]
    assert all(b < a for a, b in zip(perplexity, perplexity[1:], strict=False))
    assert perplexity[-1] < 0.8 * perplexity[0]  # type: ignore[operator]
    for row in rows:
        assert row["eval_perplexity"] == pytest.approx(math.exp(row["eval_loss"]))
    assert all(row["clients"] == DOMAINS for row in rows[1:])
    summary = json.loads((tmp_path / "out" / "summary.json").read_text())
    assert summary["labels"] == []
    assert summary["best"] == {
        "metric": "eval_perplexity",
        "round": 3,
        "value": perplexity[-1],
    }


def test_instruction_data_run_lowers_perplexity_of_the_responses(
    backbones: dict[str, Path], tmp_path: Path
) -> None:
    # Prepare
    data = write_jsonl(tmp_path / "instructions.jsonl", instruction_rows(0, 30))
    config = lm_config(
        backbones["llama"],
        data,
        tmp_path / "out",
        **{"data.prompt-column": "prompt", "num-server-rounds": 2},
    )

    # Execute
    rows = run(config, tmp_path)

    # Assert
    assert rows[2]["eval_perplexity"] < rows[0]["eval_perplexity"]


def test_secure_aggregation_gives_the_plain_run_up_to_fixed_point(
    backbones: dict[str, Path], corpus: Path, tmp_path: Path
) -> None:
    # Prepare
    plain = lm_config(
        backbones["llama"], corpus, tmp_path / "plain", **{"num-server-rounds": 2}
    )
    secure = lm_config(
        backbones["llama"],
        corpus,
        tmp_path / "secure",
        **{"num-server-rounds": 2, "secagg.enabled": True},
    )

    # Execute
    plain_rows = run(plain, tmp_path / "plain-cache")
    secure_rows = run(secure, tmp_path / "secure-cache")

    # Assert
    plain_state = load_checkpoint(tmp_path / "plain").state
    secure_state = load_checkpoint(tmp_path / "secure").state
    assert set(plain_state) == set(secure_state)
    for name, value in plain_state.items():
        np.testing.assert_allclose(secure_state[name], value, atol=1e-4)
    assert secure_rows[-1]["eval_perplexity"] < secure_rows[0]["eval_perplexity"]
    assert secure_rows[-1]["eval_perplexity"] == pytest.approx(
        plain_rows[-1]["eval_perplexity"], rel=1e-3
    )


def test_client_level_dp_run_reports_epsilon(
    backbones: dict[str, Path], corpus: Path, tmp_path: Path
) -> None:
    # Prepare
    config = lm_config(
        backbones["gpt2"],
        corpus,
        tmp_path / "out",
        **{
            "num-server-rounds": 2,
            "dp.enabled": True,
            "dp.clip-norm": 0.5,
            "dp.noise-multiplier": 0.1,
        },
    )

    # Execute
    rows = run(config, tmp_path)

    # Assert
    assert all(row["clients"] == DOMAINS for row in rows[1:])
    assert 0 < rows[1]["epsilon"] < rows[2]["epsilon"]
    assert all(math.isfinite(row["eval_perplexity"]) for row in rows)


@pytest.mark.parametrize("codec", ["int8", "topk"])
def test_compressed_uploads_still_lower_perplexity(
    backbones: dict[str, Path], corpus: Path, tmp_path: Path, codec: str
) -> None:
    # Prepare
    config = lm_config(
        backbones["llama"],
        corpus,
        tmp_path / "out",
        **{"num-server-rounds": 2, "codec": codec, "codec.topk-fraction": 0.3},
    )

    # Execute
    rows = run(config, tmp_path)

    # Assert
    assert rows[2]["eval_perplexity"] < rows[0]["eval_perplexity"]
    assert rows[1]["rejected"] == 0 and rows[1]["clients"] == DOMAINS


def test_resumed_run_ends_with_the_uninterrupted_adapter(
    backbones: dict[str, Path], corpus: Path, tmp_path: Path
) -> None:
    # Prepare
    whole = lm_config(backbones["llama"], corpus, tmp_path / "whole")
    run(whole, tmp_path / "whole-cache")
    first = lm_config(
        backbones["llama"], corpus, tmp_path / "split", **{"num-server-rounds": 2}
    )
    run(first, tmp_path / "split-cache")

    # Execute
    rest = first.with_overrides(**{"num-server-rounds": 3, "resume": True})
    rows = run(rest, tmp_path / "split-cache")

    # Assert
    assert [row["round"] for row in rows] == [0, 1, 2, 3]
    expected = load_checkpoint(tmp_path / "whole").state
    resumed = load_checkpoint(tmp_path / "split").state
    for name, value in expected.items():
        np.testing.assert_array_equal(resumed[name], value)


def test_export_and_generate_commands_use_the_merged_model(
    backbones: dict[str, Path],
    corpus: Path,
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
) -> None:
    # Prepare
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    from simulations.cli import main

    config = lm_config(
        backbones["gpt2"], corpus, tmp_path / "run", **{"num-server-rounds": 1}
    )
    run(config, tmp_path)
    exported = tmp_path / "exported"

    # Execute
    assert main(["export", str(tmp_path / "run"), "--out", str(exported)]) == 0
    capsys.readouterr()
    code = main(["generate", str(exported), "the chef", "--max-new-tokens", "4"])
    printed = capsys.readouterr().out.strip()

    # Assert: the merged folder computes what backbone + adapter compute
    assert code == 0
    tokenizer = tokenizer_of(exported)
    batch = tokenizer("the chef", return_tensors="pt")
    merged = AutoModelForCausalLM.from_pretrained(str(exported)).eval()
    adapted = PeftModel.from_pretrained(
        AutoModelForCausalLM.from_pretrained(str(backbones["gpt2"])),
        str(tmp_path / "run" / "adapter"),
    ).eval()
    with torch.no_grad():
        torch.testing.assert_close(
            merged(**batch).logits, adapted(**batch).logits, rtol=1e-4, atol=1e-4
        )
        greedy = merged.generate(
            **batch, max_new_tokens=4, do_sample=False, pad_token_id=0
        )
    new = greedy[0, batch["input_ids"].shape[1] :]
    assert printed == tokenizer.decode(new, skip_special_tokens=True)


# -- refused settings --------------------------------------------------------------


@pytest.mark.parametrize(
    ("overrides", "key"),
    [
        ({"train.mode": "head"}, "train.mode"),
        ({"train.mode": "lp-ft"}, "train.mode"),
        ({"aggregation": "fedavg-per-label"}, "aggregation"),
        ({"data.partition": "dirichlet"}, "data.partition"),
        ({"data.labels": "a,b"}, "data.labels"),
        ({"model.pooling": "mean"}, "model.pooling"),
        ({"head.label-descriptions": "labels.json"}, "head.label-descriptions"),
        ({"data.prompt-column": "prompt"}, "data.prompt-column"),  # no data.path
    ],
)
def test_head_and_label_settings_are_refused_naming_the_key(
    overrides: dict[str, object], key: str
) -> None:
    # Prepare
    flat = {"model.task": "causal-lm", **overrides}

    # Execute
    with pytest.raises(ConfigError) as caught:
        RunConfig.from_flat(flat)

    # Assert
    assert f"config key '{key}'" in str(caught.value)


def test_prompt_column_is_refused_for_classifiers() -> None:
    with pytest.raises(ConfigError, match="config key 'data.prompt-column'"):
        RunConfig.from_flat({"data.prompt-column": "prompt"})


def test_unknown_task_is_refused() -> None:
    with pytest.raises(ConfigError, match="config key 'model.task'"):
        RunConfig.from_flat({"model.task": "seq2seq"})


@pytest.mark.parametrize(
    ("config_file", "clients"),
    [("causal-lm-demo.toml", DOMAINS), ("image-cls-demo.toml", 3)],
)
def test_demo_configs_read_what_make_task_demo_writes(
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
    config_file: str,
    clients: int,
) -> None:
    # Prepare
    from common.backbone import coordinator_backbone_dir
    from simulations.cli import check_data, load_config, main

    configs = Path(__file__).resolve().parents[1] / "simulations" / "configs"
    monkeypatch.chdir(tmp_path)
    assert main(["make-task-demo"]) == 0

    # Execute
    config = load_config(str(configs / config_file), [])

    # Assert
    assert check_data(config) == clients
    assert (coordinator_backbone_dir(config.model.name) / "config.json").exists()
    assert "runs/task-demo/tiny-llama" in capsys.readouterr().out
