"""Federated evaluation: the sites score the global model on their own rows and the
coordinator adds their totals (in the clear or through the secure sum)."""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any

import pytest
from flwr.app import Context, RecordDict
from rich.console import Console

from client.client_app import app as client_app
from common.config import RunConfig
from common.data import Example
from common.splits import checked_site_rows, client_examples, site_evaluation_rows
from server import server_app
from server.server_app import coordinate
from simulations.cross_site import cross_site_table
from simulations.inprocess_grid import InProcessGrid
from simulations.inspection import inspect_run
from simulations.report import write_report
from tests.conftest import build_tiny_backbone, shared_data, write_jsonl
from tests.task_runs import federate, read_metrics

#: The CLINC150 subset: intents per domain, training and test rows per intent.
DOMAINS, INTENTS, TRAIN_ROWS, TEST_ROWS = 3, 2, 8, 5


def clinc_subset(folder: Path) -> tuple[Path, Path]:
    """A few intents of a few CLINC150 domains: a training and a test file."""
    source = shared_data("clinc150")
    train = [json.loads(line) for line in (source / "train.jsonl").open()]
    test = [json.loads(line) for line in (source / "test.jsonl").open()]
    domains = sorted({row["domain"] for row in train})[:DOMAINS]
    intents = {
        domain: sorted({row["label"] for row in train if row["domain"] == domain})[
            :INTENTS
        ]
        for domain in domains
    }

    def pick(rows: list[dict[str, Any]], per_intent: int) -> list[dict[str, Any]]:
        return [
            row
            for domain in domains
            for label in intents[domain]
            for row in [r for r in rows if r["label"] == label][:per_intent]
        ]

    return (
        write_jsonl(folder / "train.jsonl", pick(train, TRAIN_ROWS)),
        write_jsonl(folder / "test.jsonl", pick(test, TEST_ROWS)),
    )


@pytest.fixture(scope="module")
def clinc(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path, Path]:
    """The subset's training and test files, and a tiny BERT whose word-level
    vocabulary is the subset's words."""
    folder = tmp_path_factory.mktemp("clinc-subset")
    train, test = clinc_subset(folder)
    words = {
        word.strip("?.,!'\"")
        for path in (train, test)
        for line in path.open()
        for word in json.loads(line)["text"].lower().split()
    }
    backbone = build_tiny_backbone(folder / "backbone", words=sorted(words - {""}))
    return train, test, backbone


def clinc_config(
    clinc: tuple[Path, Path, Path], folder: Path, **overrides: object
) -> RunConfig:
    """Two rounds over the subset, one site per domain; ``overrides`` win."""
    train, test, backbone = clinc
    return RunConfig.from_flat(
        {
            "model.name": str(backbone),
            "model.max-length": 32,
            "data.path": str(train),
            "data.test-path": str(test),
            "data.partition": "column:domain",
            "sim.num-clients": DOMAINS,
            "num-server-rounds": 2,
            "train.batch-size": 8,
            "train.lr": 0.02,
            "output.dir": str(folder / "out"),
            **overrides,
        }
    )


@pytest.mark.parametrize("secure", [False, True], ids=["plain", "secagg"])
def test_sites_split_by_column_evaluate_exactly_the_coordinator_test_set(
    clinc: tuple[Path, Path, Path], tmp_path: Path, secure: bool
) -> None:
    # Prepare
    config = clinc_config(
        clinc,
        tmp_path,
        **{"eval.where": "both", "secagg.enabled": secure, "secagg.max-weight": 64.0},
    )
    test_rows = DOMAINS * INTENTS * TEST_ROWS

    # Execute
    _, rows = federate(config, tmp_path / "cache")

    # Assert: after every round the sites' union is the coordinator's test set
    assert [row["round"] for row in rows] == [0, 1, 2]
    for row in rows:
        assert row["sites_evaluated"] == DOMAINS
        assert row["sites_eval_examples"] == test_rows
        assert row["sites_eval_accuracy"] == row["eval_accuracy"]
        assert row["sites_eval_loss"] == pytest.approx(row["eval_loss"], rel=1e-4)
        site_rows = row.get("sites_eval_rows", [])
        if secure:
            assert site_rows == [] and "sites_eval_worst_accuracy" not in row
        else:
            assert sorted(r["examples"] for r in site_rows) == [INTENTS * TEST_ROWS] * 3
            assert row["sites_eval_worst_accuracy"] == min(
                r["accuracy"] for r in site_rows
            )


def test_the_cross_site_report_lists_every_site_and_names_the_worst(
    tmp_path: Path,
) -> None:
    # Prepare: a plain run's lines, the last with each site's final scores
    sites = [
        {"site": "101", "examples": 10, "accuracy": 0.9, "loss": 0.3},
        {"site": "102", "examples": 12, "accuracy": 0.5, "loss": 0.9},
        {"site": "103", "examples": 0, "accuracy": None, "loss": None},
    ]
    sites[0]["personal_accuracy"] = 0.95
    lines = [
        {"round": 0, "eval_accuracy": 0.2, "sites_eval_rows": sites[:1]},
        {"round": 1, "eval_accuracy": 0.6, "sites_eval_rows": sites},
        {"round": 2, "eval_accuracy": None, "sites_evaluated": 0},
    ]
    write_jsonl(tmp_path / "metrics.jsonl", lines)  # type: ignore[arg-type]

    # Execute
    console = Console(width=120, record=True)
    inspect_run(tmp_path, console)
    plots = write_report(tmp_path)

    # Assert: the table of round 1's sites, the worst of them named, and its plot
    text = console.export_text()
    assert "global model after round 1" in text
    for site in ("101", "102", "103"):
        assert site in text
    assert "0.9500" in text and "worst site: 102 (accuracy 0.5000)" in text
    assert plots[-1] == tmp_path / "report" / "sites.png"
    assert plots[-1].stat().st_size > 0


def test_a_run_without_per_site_rows_has_no_cross_site_report(tmp_path: Path) -> None:
    write_jsonl(tmp_path / "metrics.jsonl", [{"round": 0, "eval_accuracy": 0.5}])

    assert [p.name for p in write_report(tmp_path)][-1] != "sites.png"
    assert cross_site_table(read_metrics(tmp_path)) is None


# -- a coordinator without data: the label map is declared, the sites evaluate ------


def site_files(folder: Path) -> list[Path]:
    """Two sites' own files: a domain each, two labels, six rows a label."""
    files = []
    for index, (domain, labels) in enumerate(
        (("bank", ("send", "balance")), ("travel", ("flight", "hotel")))
    ):
        rows = [
            {"text": f"please {label} my account {n}", "label": label, "domain": domain}
            for label in labels
            for n in range(6)
        ]
        files.append(write_jsonl(folder / f"site{index}.jsonl", rows))
    return files


def deployed(
    backbone: Path, folder: Path, files: list[Path], **flat: object
) -> tuple[InProcessGrid, dict[str, object]]:
    """An in-process grid of sites with their own ``data-path`` (as deployed), and
    the coordinator's run config: no data keys; ``flat`` wins."""
    nodes = {
        100 + index: {"data-path": str(path), "cache-dir": str(folder / f"c{index}")}
        for index, path in enumerate(files)
    }
    run_config = {
        "model.name": str(backbone),
        "num-server-rounds": 1,
        "train.batch-size": 4,
        "train.min-clients": len(files),
        "output.dir": str(folder / "out"),
        **flat,
    }
    return InProcessGrid(client_app, nodes), run_config


def test_a_coordinator_with_only_a_label_file_gets_the_sites_evaluation(
    tiny_backbone: Path, tmp_path: Path
) -> None:
    # Prepare: the label map as a file, one label a line; no data at the coordinator
    files = site_files(tmp_path)
    labels = tmp_path / "labels.txt"
    labels.write_text("send\nbalance\nflight\nhotel\n")
    grid, run_config = deployed(
        tiny_backbone, tmp_path, files, **{"data.labels": str(labels)}
    )

    # Execute: the deployment entry point (any grid but the simulation's)
    server_app.main(grid, Context(1, 0, {}, RecordDict(), run_config))  # type: ignore[arg-type]

    # Assert: the sites evaluated every round on their held-out rows, which they
    # never trained on, and their figures are the run's
    rows = read_metrics(tmp_path / "out")
    config = RunConfig.from_flat(run_config)
    held_out = [
        site_evaluation_rows(config.data, config.seed, 0, 1, str(path))
        for path in files
    ]
    trained = [
        client_examples(config.data, config.seed, 0, 1, str(path), hold_out=True)
        for path in files
    ]
    for evaluated, trained_on in zip(held_out, trained, strict=True):
        assert evaluated and not {e.where for e in evaluated} & {
            e.where for e in trained_on
        }
    for row in rows:
        assert row["sites_evaluated"] == 2
        assert row["sites_eval_examples"] == sum(map(len, held_out))
        assert row["eval_accuracy"] == row["sites_eval_accuracy"]
    assert [row["clients"] for row in rows[1:]] == [2]


def lm_site_files(corpus: Path, folder: Path) -> list[Path]:
    """Two sites' own text files: two of the corpus's four domains each."""
    rows = [json.loads(line) for line in corpus.open()]
    domains = sorted({row["domain"] for row in rows})
    return [
        write_jsonl(
            folder / f"lm-site{index}.jsonl",
            [row for row in rows if row["domain"] in domains[index::2]],
        )
        for index in range(2)
    ]


@pytest.mark.parametrize("task", ["causal-lm", "image-cls"])
def test_a_deployed_coordinator_of_any_task_without_rows_gets_the_sites_evaluation(
    task: str, request: pytest.FixtureRequest, tmp_path: Path
) -> None:
    # Prepare: sites with their own rows; the coordinator names the task, the
    # backbone and (for a classifier) the label map, and holds no rows
    if task == "causal-lm":
        backbone = request.getfixturevalue("small_causal_lms")["llama"]
        files = lm_site_files(request.getfixturevalue("small_lm_corpus"), tmp_path)
        flat: dict[str, object] = {"model.max-length": 32}
        metric = "perplexity"
    else:
        backbone = request.getfixturevalue("vision_backbones")["vit"]
        files = [request.getfixturevalue("few_images")] * 2
        flat = {"data.labels": "red,green,blue", "head.init": "random"}
        metric = "accuracy"
    grid, run_config = deployed(
        backbone, tmp_path, files, **{"model.task": task, **flat}
    )

    # Execute: the deployment entry point
    server_app.main(grid, Context(1, 0, {}, RecordDict(), run_config))  # type: ignore[arg-type]

    # Assert: both sites evaluated rounds 0 and 1 on their held-out rows, and the
    # run's headline metric is theirs
    rows = read_metrics(tmp_path / "out")
    assert [row["round"] for row in rows] == [0, 1]
    assert [row["clients"] for row in rows[1:]] == [2]
    for row in rows:
        assert row["sites_evaluated"] == 2
        assert row["sites_eval_examples"] > 0
        assert row[f"eval_{metric}"] == row[f"sites_eval_{metric}"]
        low, high = (1.0, float("inf")) if metric == "perplexity" else (0.0, 1.0)
        assert low <= row[f"sites_eval_{metric}"] <= high


@pytest.mark.parametrize(
    ("flat", "words"),
    [
        ({}, "data.labels"),
        ({"data.labels": "send,balance", "eval.where": "coordinator"}, "eval.where"),
    ],
    ids=["no-label-map", "no-evaluation-rows"],
)
def test_a_deployment_missing_what_the_coordinator_needs_is_refused_before_any_site(
    tiny_backbone: Path, tmp_path: Path, flat: dict[str, object], words: str
) -> None:
    # Prepare
    grid, run_config = deployed(tiny_backbone, tmp_path, site_files(tmp_path), **flat)

    # Execute
    with pytest.raises(ValueError, match=words) as refused:
        server_app.main(grid, Context(1, 0, {}, RecordDict(), run_config))  # type: ignore[arg-type]

    # Assert: named the key, contacted nobody, wrote nothing
    assert "data.test-path" in str(refused.value) or words == "data.labels"
    assert grid.sent == []
    assert not (tmp_path / "out").exists()


def test_a_site_with_an_undeclared_label_refuses_naming_the_labels(
    tiny_backbone: Path, tmp_path: Path
) -> None:
    # Prepare: the second site holds flight and hotel rows, the map lacks both
    grid, run_config = deployed(
        tiny_backbone,
        tmp_path,
        site_files(tmp_path),
        **{"data.labels": "send,balance", "train.min-clients": 1},
    )

    # Execute
    coordinate(grid, RunConfig.from_flat(run_config), deployment=True)  # type: ignore[arg-type]

    # Assert: that site's every reply is its refusal, naming both labels; the other
    # site trained and evaluated alone
    refusals = [r.error.reason for r in grid.received if r.has_error()]
    assert refusals and all(
        "flight, hotel" in reason and "data.labels" in reason for reason in refusals
    )
    rows = read_metrics(tmp_path / "out")
    assert [row["clients"] for row in rows[1:]] == [1]
    assert all(row["sites_evaluated"] == 1 for row in rows)


@pytest.mark.parametrize(
    ("train_labels", "eval_labels", "kept", "warned"),
    [
        (["a", "b"], ["a", "b"], ["a", "b"], False),
        (["a"], ["a", "z"], ["a"], True),
    ],
    ids=["declared", "undeclared-only-in-evaluation-rows"],
)
def test_evaluation_rows_with_an_undeclared_label_are_left_out_with_a_warning(
    train_labels: list[str],
    eval_labels: list[str],
    kept: list[str],
    warned: bool,
    caplog: pytest.LogCaptureFixture,
) -> None:
    # Prepare
    def rows(labels: list[str]) -> list[Example]:
        return [Example(text=f"row {label}", label=label) for label in labels]

    # Execute
    with caplog.at_level(logging.WARNING, logger="common.splits"):
        checked = checked_site_rows(rows(train_labels), rows(eval_labels), ("a", "b"))

    # Assert
    assert [row.label for row in checked] == kept
    assert ("z" in caplog.text) is warned
