"""The baselines for a causal language model and an image classifier: ``fedgraft
centralized`` on the union of the clients' rows, and each client trained alone after
``simulate`` (``sim.local-baseline``), on tiny offline backbones built from a config."""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from common.config import RunConfig
from common.tasks import CAUSAL_LM, IMAGE_CLASSIFICATION, read_task
from simulations.baselines import federated_samples_per_round, local_only_summary
from simulations.cli import main
from simulations.task_demo import (
    IMAGE_CLASSES,
    build_causal_lm,
    build_vision_backbone,
    domain_sentences,
    write_image_folder,
    write_jsonl,
)

DOMAINS = 4
IMAGE_CLIENTS = 3


@pytest.fixture(scope="module")
def corpus(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """120 sentences in four domains, each with its own vocabulary."""
    folder = tmp_path_factory.mktemp("lm-corpus")
    return write_jsonl(folder / "corpus.jsonl", domain_sentences(0, 30))


@pytest.fixture(scope="module")
def tiny_lm(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tiny GPT-2 with a word-level tokenizer trained on the corpus's sentences."""
    texts = [row["text"] for row in domain_sentences(0, 30)] + ["complete :"]
    return build_causal_lm(tmp_path_factory.mktemp("tiny-gpt2"), texts, "gpt2")


@pytest.fixture(scope="module")
def images(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """18 images of each of three colours, in one sub-folder per class."""
    return write_image_folder(tmp_path_factory.mktemp("images") / "images", 18)


@pytest.fixture(scope="module")
def tiny_vit(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return build_vision_backbone(tmp_path_factory.mktemp("tiny-vit"), "vit")


def lm_settings(backbone: Path, data: Path, output: Path) -> dict[str, object]:
    return {
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
    }


def image_settings(backbone: Path, data: Path, output: Path) -> dict[str, object]:
    return {
        "model.task": "image-cls",
        "model.name": str(backbone),
        "head.init": "random",
        "data.path": str(data),
        "data.partition": "iid",
        "sim.num-clients": IMAGE_CLIENTS,
        "num-server-rounds": 3,
        "train.batch-size": 8,
        "train.lr": 0.01,
        "output.dir": str(output),
    }


def centralized(settings: dict[str, object]) -> list[dict[str, Any]]:
    """Run ``fedgraft centralized`` with ``settings``; its metrics lines."""
    code = main(["centralized", *[f"--set={k}={v}" for k, v in settings.items()]])
    assert code == 0
    output = Path(str(settings["output.dir"]))
    return [json.loads(line) for line in (output / "metrics.jsonl").open()]


def samples_per_round(settings: dict[str, object]) -> int:
    """What one federated round of ``settings`` trains on."""
    from common.splits import all_client_examples

    config = RunConfig.from_flat(settings)
    clients = all_client_examples(config.data, config.seed, config.sim.num_clients)
    return federated_samples_per_round(config, [len(rows) for rows in clients])


# -- fedgraft centralized ------------------------------------------------------------


def test_centralized_causal_lm_lowers_perplexity_and_writes_a_generating_model(
    tiny_lm: Path,
    corpus: Path,
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
) -> None:
    # Prepare
    output = tmp_path / "central"
    settings = lm_settings(tiny_lm, corpus, output)

    # Execute
    rows = centralized(settings)
    capsys.readouterr()  # the run's table
    code = main(["generate", str(output), "the chef", "--max-new-tokens", "3"])

    # Assert
    perplexity = [row["eval_perplexity"] for row in rows]
    assert [row["round"] for row in rows] == [0, 1, 2, 3]
    assert all(b < a for a, b in zip(perplexity, perplexity[1:], strict=False))
    assert perplexity[-1] < 0.8 * perplexity[0]
    assert all(row["train_samples"] == samples_per_round(settings) for row in rows[1:])
    summary = json.loads((output / "summary.json").read_text())
    assert summary["kind"] == "centralized" and summary["labels"] == []
    assert summary["best"]["metric"] == "eval_perplexity"
    assert read_task(output / "adapter") == read_task(output / "merged") == CAUSAL_LM
    assert code == 0  # `fedgraft generate` read the run's merged model


def test_centralized_image_classifier_raises_accuracy_and_writes_a_predicting_model(
    tiny_vit: Path,
    images: Path,
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
) -> None:
    # Prepare
    output = tmp_path / "central"
    settings = image_settings(tiny_vit, images, output)
    picture = str(images / "red" / "0.png")

    # Execute
    rows = centralized(settings)
    capsys.readouterr()  # the run's table
    code = main(["predict", str(output / "merged"), picture])

    # Assert
    assert [row["round"] for row in rows] == [0, 1, 2, 3]
    assert rows[-1]["eval_accuracy"] > rows[0]["eval_accuracy"] + 0.2
    assert rows[-1]["eval_loss"] < rows[0]["eval_loss"]
    assert "eval_perplexity" not in rows[-1]
    assert all(row["train_samples"] == samples_per_round(settings) for row in rows[1:])
    summary = json.loads((output / "summary.json").read_text())
    assert summary["kind"] == "centralized"
    assert summary["labels"] == sorted(IMAGE_CLASSES)
    assert read_task(output / "merged") == IMAGE_CLASSIFICATION
    label, _, path = capsys.readouterr().out.strip().split("\t")
    assert code == 0 and label in IMAGE_CLASSES and path == picture


# -- sim.local-baseline --------------------------------------------------------------


def in_process_engine(config: RunConfig, cache: Path) -> Callable[..., None]:
    """A stand-in for Flower's ``run_simulation``: the real coordinator and ClientApp
    over an in-process grid, without Ray."""
    from client.client_app import app as client_app
    from server.server_app import coordinate
    from simulations.inprocess_grid import InProcessGrid

    def run_simulation(*, num_supernodes: int, **_: object) -> None:
        nodes = {
            100 + index: {
                "partition-id": index,
                "num-partitions": num_supernodes,
                "cache-dir": str(cache / str(index)),
            }
            for index in range(num_supernodes)
        }
        coordinate(InProcessGrid(client_app, nodes), config)

    return run_simulation


@pytest.mark.parametrize(
    ("task", "headline", "columns"),
    [
        ("causal-lm", "eval_perplexity", {"eval_perplexity", "eval_loss"}),
        (
            "image-cls",
            "eval_accuracy",
            {"eval_accuracy", "own_domain_accuracy", "own_domain_rows"},
        ),
    ],
)
def test_simulate_adds_the_clients_alone_summary(
    task: str,
    headline: str,
    columns: set[str],
    request: pytest.FixtureRequest,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    # Prepare: one round, run by the real coordinator in process instead of Ray
    import flwr.simulation

    from simulations.cli import simulate

    for name in ("FLWR_HOME", "RAY_TMPDIR"):
        monkeypatch.setenv(name, str(tmp_path / name.lower()))
    monkeypatch.setenv("FLWR_TELEMETRY_ENABLED", "0")
    output = (tmp_path / "federated").resolve()
    if task == "causal-lm":
        settings = lm_settings(
            request.getfixturevalue("tiny_lm"),
            request.getfixturevalue("corpus"),
            output,
        )
    else:
        settings = image_settings(
            request.getfixturevalue("tiny_vit"),
            request.getfixturevalue("images"),
            output,
        )
    config = RunConfig.from_flat({**settings, "num-server-rounds": 1})
    monkeypatch.setattr(
        flwr.simulation, "run_simulation", in_process_engine(config, tmp_path)
    )

    # Execute
    simulate(config)

    # Assert
    baseline = json.loads((output / "summary.json").read_text())["local_baseline"]
    assert len(baseline["clients"]) == config.sim.num_clients
    assert all(columns <= set(client) for client in baseline["clients"])
    values = [client[headline] for client in baseline["clients"]]
    assert baseline[f"mean_{headline}"] == pytest.approx(sum(values) / len(values))
    assert {baseline[f"best_{headline}"], baseline[f"worst_{headline}"]} == {
        min(values),
        max(values),
    }
    assert baseline[f"best_{headline.removeprefix('eval_')}"] == pytest.approx(
        baseline[f"best_{headline}"]
    )
    printed = capsys.readouterr().out
    assert f"federated {headline}" in printed and "clients trained alone" in printed


def test_the_best_client_alone_has_the_lowest_perplexity_and_highest_accuracy() -> None:
    # Prepare
    results = [
        {"client": 0, "eval_perplexity": 9.0, "eval_accuracy": 0.5},
        {"client": 1, "eval_perplexity": 3.0, "eval_accuracy": 0.7},
        {"client": 2, "eval_perplexity": 6.0, "eval_accuracy": 0.6},
    ]

    # Execute
    summary = local_only_summary(results)

    # Assert
    assert summary["best_eval_perplexity"] == 3.0
    assert summary["worst_eval_perplexity"] == 9.0
    assert summary["mean_eval_perplexity"] == pytest.approx(6.0)
    assert summary["best_eval_accuracy"] == 0.7
    assert summary["worst_eval_accuracy"] == 0.5
    assert "mean_own_domain_accuracy" not in summary  # no client has that column
