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
from common.tasks import read_task
from simulations.baselines import federated_samples_per_round, local_only_summary
from simulations.cli import main
from simulations.task_demo import IMAGE_CLASSES
from tests.task_runs import image_settings, lm_settings, read_metrics, simulation_nodes


def centralized(settings: dict[str, object]) -> list[dict[str, Any]]:
    """Run ``fedgraft centralized`` with ``settings``; its metrics lines."""
    code = main(["centralized", *[f"--set={k}={v}" for k, v in settings.items()]])
    assert code == 0
    return read_metrics(Path(str(settings["output.dir"])))


def samples_per_round(settings: dict[str, object]) -> int:
    """What one federated round of ``settings`` trains on."""
    from common.splits import all_client_examples

    config = RunConfig.from_flat(settings)
    clients = all_client_examples(config.data, config.seed, config.sim.num_clients)
    return federated_samples_per_round(config, [len(rows) for rows in clients])


# -- fedgraft centralized ------------------------------------------------------------


def test_centralized_causal_lm_lowers_perplexity_and_writes_a_generating_model(
    causal_lms: dict[str, Path],
    lm_corpus: Path,
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
) -> None:
    # Prepare
    output = tmp_path / "central"
    settings = lm_settings(causal_lms["gpt2"], lm_corpus, output)

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
    assert read_task(output / "adapter") == read_task(output / "merged") == "causal-lm"
    assert code == 0  # `fedgraft generate` read the run's merged model


def test_centralized_image_classifier_raises_accuracy_and_writes_a_predicting_model(
    vision_backbones: dict[str, Path],
    images: Path,
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
) -> None:
    # Prepare
    output = tmp_path / "central"
    settings = image_settings(vision_backbones["vit"], images, output)
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
    assert read_task(output / "merged") == "image-cls"
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
        nodes = simulation_nodes(num_supernodes, cache)
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
            request.getfixturevalue("causal_lms")["gpt2"],
            request.getfixturevalue("lm_corpus"),
            output,
        )
    else:
        settings = image_settings(
            request.getfixturevalue("vision_backbones")["vit"],
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


@pytest.mark.parametrize("task", ["causal-lm", "image-cls"])
def test_the_baselines_train_without_dp_sgd_under_a_private_config(
    task: str,
    causal_lms: dict[str, Path],
    lm_corpus: Path,
    vision_backbones: dict[str, Path],
    images: Path,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    # Prepare: a config whose federated run would train with DP-SGD
    import client.private_training

    def refuse(*args: object, **kwargs: object) -> None:
        raise AssertionError("a baseline ran DP-SGD")

    monkeypatch.setattr(client.private_training, "dp_sgd_steps", refuse)
    output = tmp_path / "central"
    settings = (
        lm_settings(causal_lms["llama"], lm_corpus, output)
        if task == "causal-lm"
        else image_settings(vision_backbones["vit"], images, output)
    ) | {"dp.enabled": True, "dp.level": "sample", "num-server-rounds": 1}

    # Execute
    rows = centralized(settings)

    # Assert: the non-private reference, as for text
    assert [row["round"] for row in rows] == [0, 1]
    assert "sample_epsilon_max" not in rows[-1]


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
