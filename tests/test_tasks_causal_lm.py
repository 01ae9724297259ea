"""Federated LoRA on causal language models (``model.task = causal-lm``): tiny Llama
and GPT-2 backbones built from a config with a word-level tokenizer trained on a
synthetic domain corpus (``conftest.py``), run by the real coordinator and ClientApp
in process."""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest
import torch
from flwr.app import MessageType

from common import keys
from common.config import ConfigError, RunConfig
from common.data import DataError, Example
from common.evaluation import EvalResult
from common.splits import evaluation_examples, site_evaluation_rows
from common.tasks.causal_lm.data import encode_lm, load_lm_examples
from server.checkpoint import load_checkpoint
from simulations.inprocess_grid import InProcessGrid
from simulations.task_demo import domain_sentences, instruction_rows, write_jsonl
from tests.task_runs import DOMAINS, lm_config, read_metrics, run, simulation_nodes


def tokenizer_of(backbone: Path):  # type: ignore[no-untyped-def]
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(str(backbone))


# -- rows and the loss mask ---------------------------------------------------------


def test_instruction_rows_carry_loss_on_the_response_only(
    causal_lms: dict[str, Path],
) -> None:
    # Prepare
    from common.tasks.causal_lm.model import IGNORE, collate_lm

    tokenizer = tokenizer_of(causal_lms["llama"])
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
    causal_lms: dict[str, Path],
) -> None:
    # Prepare
    from common.tasks.causal_lm.model import IGNORE, collate_lm

    tokenizer = tokenizer_of(causal_lms["gpt2"])
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
    from common.tasks.causal_lm.model import IGNORE, token_losses

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
    causal_lms: dict[str, Path],
) -> None:
    # Prepare
    tokenizer = tokenizer_of(causal_lms["llama"])
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
    causal_lms: dict[str, Path], kind: str, targets: str, expected: tuple[str, ...]
) -> None:
    # Prepare
    from transformers import AutoModelForCausalLM

    from common.lora_targets import resolve_targets

    config = RunConfig.from_flat({"lora.target-modules": targets})
    model = AutoModelForCausalLM.from_pretrained(str(causal_lms[kind]))

    # Execute
    resolved = resolve_targets(config.lora, model)

    # Assert
    assert resolved.target_modules == expected


@pytest.mark.parametrize("targets", ["query,value", "all-linear"])
def test_adapter_state_holds_lora_factors_and_no_head(
    causal_lms: dict[str, Path], targets: str
) -> None:
    # Prepare
    from common.tasks.causal_lm.model import lm_adapter_state, load_causal_lm

    settings = RunConfig.from_flat({"lora.target-modules": targets}).lora

    # Execute
    state = lm_adapter_state(load_causal_lm(causal_lms["llama"], settings, seed=3))

    # Assert
    assert state and all(".lora_A." in k or ".lora_B." in k for k in state)
    assert not any(k.startswith("head.") or "lm_head" in k for k in state)


# -- federated runs --------------------------------------------------------------------


@pytest.mark.parametrize("kind", ["llama", "gpt2"])
def test_federated_training_lowers_eval_perplexity(
    causal_lms: dict[str, Path], lm_corpus: Path, tmp_path: Path, kind: str
) -> None:
    # Prepare
    config = lm_config(causal_lms[kind], lm_corpus, tmp_path / "out")

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
    causal_lms: dict[str, Path], tmp_path: Path
) -> None:
    # Prepare
    data = write_jsonl(tmp_path / "instructions.jsonl", instruction_rows(0, 30))
    config = lm_config(
        causal_lms["llama"],
        data,
        tmp_path / "out",
        **{"data.prompt-column": "prompt", "num-server-rounds": 2},
    )

    # Execute
    rows = run(config, tmp_path)

    # Assert
    assert rows[2]["eval_perplexity"] < rows[0]["eval_perplexity"]


def test_secure_aggregation_gives_the_plain_run_up_to_fixed_point(
    causal_lms: dict[str, Path], lm_corpus: Path, tmp_path: Path
) -> None:
    # Prepare
    plain = lm_config(
        causal_lms["llama"], lm_corpus, tmp_path / "plain", **{"num-server-rounds": 2}
    )
    secure = lm_config(
        causal_lms["llama"],
        lm_corpus,
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
    causal_lms: dict[str, Path], lm_corpus: Path, tmp_path: Path
) -> None:
    # Prepare
    config = lm_config(
        causal_lms["gpt2"],
        lm_corpus,
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
    causal_lms: dict[str, Path], lm_corpus: Path, tmp_path: Path, codec: str
) -> None:
    # Prepare
    config = lm_config(
        causal_lms["llama"],
        lm_corpus,
        tmp_path / "out",
        **{"num-server-rounds": 2, "codec": codec, "codec.topk-fraction": 0.3},
    )

    # Execute
    rows = run(config, tmp_path)

    # Assert
    assert rows[2]["eval_perplexity"] < rows[0]["eval_perplexity"]
    assert rows[1]["rejected"] == 0 and rows[1]["clients"] == DOMAINS


def test_resumed_run_ends_with_the_uninterrupted_adapter(
    causal_lms: dict[str, Path], lm_corpus: Path, tmp_path: Path
) -> None:
    # Prepare
    whole = lm_config(causal_lms["llama"], lm_corpus, tmp_path / "whole")
    run(whole, tmp_path / "whole-cache")
    first = lm_config(
        causal_lms["llama"], lm_corpus, tmp_path / "split", **{"num-server-rounds": 2}
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
    causal_lms: dict[str, Path],
    lm_corpus: Path,
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
) -> None:
    # Prepare
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    from simulations.cli import main

    config = lm_config(
        causal_lms["gpt2"], lm_corpus, tmp_path / "run", **{"num-server-rounds": 1}
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
        AutoModelForCausalLM.from_pretrained(str(causal_lms["gpt2"])),
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


# -- FedSA: each site's personal perplexity -------------------------------------------


def test_a_sites_personal_perplexity_is_that_of_its_own_b_with_the_shared_a(
    causal_lms: dict[str, Path], lm_corpus: Path, tmp_path: Path
) -> None:
    # Prepare: the coordinator's held-out rows, and a site whose B is its own
    from client.causal_lm_site import LmCaches, open_causal_lm_site
    from client.sites import SiteRequest
    from common.backbone import fingerprint
    from common.tasks.causal_lm.bench import CausalLMWorkbench

    backbone = causal_lms["llama"]
    config = lm_config(backbone, lm_corpus, tmp_path / "out", aggregation="fedsa")
    rows = evaluation_examples(config.data, config.seed)
    coordinator = CausalLMWorkbench.open(config, (), rows)
    request = SiteRequest(
        config,
        backbone,
        fingerprint(backbone),
        config.lora,
        config.model.pooling,
        (),
        tmp_path / "cache",
    )
    site = open_causal_lm_site(LmCaches(), request)
    shared = coordinator.state()
    rng = np.random.default_rng(0)
    personal = {
        name: rng.normal(0.0, 0.3, value.shape).astype(np.float32)
        if ".lora_B." in name
        else value
        for name, value in shared.items()
    }
    site.load_state(personal)

    # Execute
    result = site.evaluate(rows)

    # Assert: the coordinator's perplexity of the same model on the same rows, which
    # the site's B moves away from the shared model's
    own = result.perplexity
    assert own is not None and math.isfinite(own) and own > 1.0
    assert result.tokens > 0
    assert own == pytest.approx(coordinator.evaluate(personal).perplexity, rel=1e-5)
    assert own != pytest.approx(coordinator.evaluate(shared).perplexity, rel=1e-3)


@dataclass
class FedSARun:
    """A two-round FedSA run whose first site has its own ``eval-path``."""

    config: RunConfig
    grid: InProcessGrid
    rows: list[dict[str, object]]
    own_rows: list[str]
    #: The texts each site evaluation (global and personalised) read, in call order.
    evaluated: list[list[str]]


@pytest.fixture(scope="module")
def fedsa_run(
    causal_lms: dict[str, Path],
    lm_corpus: Path,
    tmp_path_factory: pytest.TempPathFactory,
) -> FedSARun:
    from client.causal_lm_site import CausalLMSite
    from client.client_app import app as client_app
    from server.server_app import coordinate

    folder = tmp_path_factory.mktemp("fedsa")
    config = lm_config(
        causal_lms["llama"],
        lm_corpus,
        folder / "out",
        **{"aggregation": "fedsa", "num-server-rounds": 2},
    )
    own_rows = domain_sentences(1, 1)
    own = write_jsonl(folder / "own.jsonl", own_rows)
    nodes = simulation_nodes(DOMAINS, folder / "cache")
    nodes[100]["eval-path"] = str(own)
    evaluated: list[list[str]] = []
    original = CausalLMSite.evaluate

    def recording(site: CausalLMSite, examples: list[Example]) -> EvalResult:
        evaluated.append([example.text for example in examples])
        return original(site, examples)

    grid = InProcessGrid(client_app, nodes)
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(CausalLMSite, "evaluate", recording)
        output = coordinate(grid, config)  # type: ignore[arg-type]
    own_texts = [row["text"] for row in own_rows]
    return FedSARun(config, grid, read_metrics(output), own_texts, evaluated)


def test_fedsa_metrics_report_the_sites_personal_perplexity(
    fedsa_run: FedSARun,
) -> None:
    # Prepare: the evaluate replies of rounds 1 and 2 (round 0 has no own B yet)
    replies = [
        reply.content.metric_records[keys.METRICS_RECORD]
        for reply in fedsa_run.grid.received
        if not reply.has_error()
        and reply.metadata.message_type == MessageType.EVALUATE
        and keys.METRICS_RECORD in reply.content.metric_records
    ]

    # Assert: every site sent its perplexity up after each round, and each round's
    # line carries the mean and the worst (no accuracy: a language model has no
    # labels)
    personal = [keys.PERSONAL_PERPLEXITY in metrics for metrics in replies]
    assert personal == [False] * DOMAINS + [True] * 2 * DOMAINS
    assert "personal_perplexity_mean" not in fedsa_run.rows[0]
    for row in fedsa_run.rows[1:]:
        assert row["clients"] == DOMAINS
        mean, worst = row["personal_perplexity_mean"], row["personal_perplexity_max"]
        assert math.isfinite(mean) and 1.0 < mean <= worst  # type: ignore[arg-type, operator]
        assert "personal_accuracy_mean" not in row
    # The shared model is the bare backbone (the global B stays zero); the sites' own
    # models beat it, and more so each round.
    first, second = (row["personal_perplexity_mean"] for row in fedsa_run.rows[1:])
    assert second < first < fedsa_run.rows[0]["eval_perplexity"]  # type: ignore[operator]


def test_a_site_evaluates_its_eval_path_or_else_its_domain_of_the_held_out_rows(
    fedsa_run: FedSARun,
) -> None:
    # Prepare: each site's share of the coordinator's held-out rows (its domain)
    config = fedsa_run.config
    data, seed = config.data, config.seed
    shares = [
        [row.text for row in site_evaluation_rows(data, seed, site, DOMAINS)]
        for site in range(1, DOMAINS)
    ]
    held_out = evaluation_examples(config.data, config.seed)

    # Assert: after rounds 0, 1 and 2 the site with an eval-path scored its own file,
    # the others their own domain's held-out rows (the global model each time, the
    # personalised one too after rounds 1 and 2), and together the others' shares
    # are the held-out rows of their domains
    evaluations = 3 + 2
    assert sorted(fedsa_run.evaluated) == sorted(
        [fedsa_run.own_rows] * evaluations
        + [share for share in shares for _ in range(evaluations)]
    )
    for share in shares:
        domains = {row.extra["domain"] for row in held_out if row.text in share}
        assert len(domains) == 1
    assert sum(map(len, shares)) < len(held_out)


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
