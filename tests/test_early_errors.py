"""Bad input is refused before Ray starts, naming the file, line or key; a user file
without the default partition column is split iid with a message instead."""

from __future__ import annotations

import logging
import re
from pathlib import Path

import flwr.simulation
import pytest

from simulations.cli import check_data, load_config, main
from tests.conftest import write_jsonl

ROWS = [
    {"text": f"words {i} for {label}", "label": label}
    for i in range(6)
    for label in ("yes", "no")
]


def _refuse_engine(*args: object, **kwargs: object) -> None:
    raise AssertionError("the simulation engine was started")


def _toml_typo(tmp: Path) -> list[str]:
    (tmp / "run.toml").write_text('num-server-rounds = 2\n\n"train.lrr" = 0.1\n')
    return ["--config", str(tmp / "run.toml")]


def _toml_syntax(tmp: Path) -> list[str]:
    (tmp / "run.toml").write_text('"train.lr" = 0.1\n"lora.r" = \n')
    return ["--config", str(tmp / "run.toml")]


def _test_label_outside_map(tmp: Path) -> list[str]:
    write_jsonl(tmp / "train.jsonl", ROWS)
    write_jsonl(tmp / "test.jsonl", [*ROWS[:2], {"text": "odd one", "label": "maybe"}])
    return [
        "--set",
        f"data.path={tmp / 'train.jsonl'}",
        "--set",
        f"data.test-path={tmp / 'test.jsonl'}",
        "--set",
        "data.labels=yes,no",
        "--set",
        "data.partition=iid",
        "--set",
        "sim.num-clients=2",
    ]


def _missing_label_descriptions(tmp: Path) -> list[str]:
    return ["--set", f"head.label-descriptions={tmp / 'labels.json'}"]


def _missing_backbone(tmp: Path) -> list[str]:
    return ["--set", f"model.name={tmp / 'no-model'}"]


def _rows_without_partition_column(tmp: Path) -> list[str]:
    write_jsonl(tmp / "train.jsonl", ROWS)
    return [
        "--set",
        f"data.path={tmp / 'train.jsonl'}",
        "--set",
        "data.partition=column:site",
    ]


def _images_without_a_path(tmp: Path) -> list[str]:
    # data.labels alone is what a deployed coordinator needs; a simulation needs images
    return [
        "--set",
        "model.task=image-cls",
        "--set",
        "head.init=random",
        "--set",
        "data.labels=red,green",
    ]


@pytest.mark.parametrize(
    ("arguments", "named"),
    [
        (_toml_typo, r"run\.toml:3: unknown config key\(s\): 'train\.lrr'"),
        (_toml_syntax, r"run\.toml: not valid TOML \(.* \(at line 2, column 12\)"),
        (_test_label_outside_map, r"test\.jsonl:3: label 'maybe'"),
        (_missing_label_descriptions, r"labels\.json: label-description file not"),
        (_missing_backbone, r"model\.name = '.*no-model': no model directory"),
        (_rows_without_partition_column, r"train\.jsonl:\d+: no column 'site'"),
        (_images_without_a_path, r"data\.path: a simulation of model\.task = image"),
    ],
)
def test_bad_input_is_refused_before_the_engine_starts(
    arguments,
    named: str,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    # Prepare
    monkeypatch.setattr(flwr.simulation, "run_simulation", _refuse_engine)
    out = tmp_path / "run"
    argv = ["simulate", *arguments(tmp_path), "--set", f"output.dir={out}"]

    # Execute
    code = main(argv)

    # Assert
    assert code == 2
    assert re.search(named, capsys.readouterr().err)
    assert not out.exists(), "nothing may be written for a refused run"


def test_default_partition_on_a_file_without_domains_splits_iid_and_says_so(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    # Prepare
    data = write_jsonl(tmp_path / "mine.jsonl", ROWS * 4)
    config = load_config(None, [f"data.path={data}", "sim.num-clients=3"])

    # Execute
    with caplog.at_level(logging.WARNING, logger="fedgraft"):
        clients = check_data(config)

    # Assert
    assert clients == 3
    assert "data.partition = column:domain (the default)" in caplog.text
    assert "split iid over sim.num-clients = 3" in caplog.text


def test_a_label_only_in_the_test_file_is_warned_of_naming_its_line(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    # Prepare: 'maybe' is in the test file alone (no data.labels, so the map has it)
    train = write_jsonl(tmp_path / "train.jsonl", ROWS)
    test = write_jsonl(
        tmp_path / "test.jsonl", [*ROWS[:2], {"text": "odd one", "label": "maybe"}]
    )
    settings = [f"data.path={train}", f"data.test-path={test}", "data.partition=iid"]
    config = load_config(None, [*settings, "sim.num-clients=2"])

    # Execute
    with caplog.at_level(logging.WARNING, logger="fedgraft"):
        check_data(config)

    # Assert
    assert "1 label(s) appear only in the evaluation rows" in caplog.text
    assert re.search(r"'maybe' \(\S*test\.jsonl:3\)", caplog.text)


def test_labels_every_client_set_trains_on_are_not_warned_of(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    # Prepare
    train = write_jsonl(tmp_path / "train.jsonl", ROWS)
    test = write_jsonl(tmp_path / "test.jsonl", ROWS[:4])
    settings = [f"data.path={train}", f"data.test-path={test}", "data.partition=iid"]
    config = load_config(None, [*settings, "sim.num-clients=2"])

    # Execute
    with caplog.at_level(logging.WARNING, logger="fedgraft"):
        check_data(config)

    # Assert
    assert "appear only in the evaluation rows" not in caplog.text


def test_default_partition_keeps_one_client_per_domain_on_the_demo() -> None:
    # Prepare
    config = load_config(None, [])

    # Execute
    clients = check_data(config)

    # Assert
    assert clients == 4
