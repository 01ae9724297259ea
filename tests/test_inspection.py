"""``fedgraft inspect`` and ``fedgraft report`` on a hand-written run folder."""

from __future__ import annotations

import json
import re
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import pytest
from matplotlib.backends.backend_agg import FigureCanvasAgg
from rich.console import Console

from common.config import DEFAULTS
from common.outputs import METRICS_FILE, SUMMARY_FILE
from simulations.inspection import changed_settings, inspect_run
from simulations.report import (
    REPORT_DIR,
    participation_figure,
    plot_participation,
    write_report,
)

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
FINGERPRINT = "ab12cd34ef56" + "0" * 52

ROWS: tuple[dict[str, Any], ...] = (
    {
        "round": 0,
        "sampled": 0,
        "clients": 0,
        "participants": [],
        "failed": 0,
        "rejected": 0,
        "train_loss": None,
        "train_samples": 0,
        "eval_loss": 2.4,
        "eval_accuracy": 0.125,
        "bytes_up": 0,
        "bytes_down": 0,
        "bytes_backbone": 0,
        "seconds": 1.0,
    },
    {
        "round": 1,
        "sampled": 2,
        "clients": 1,
        "participants": ["7"],
        "failed": 1,
        "rejected": 0,
        "train_loss": 1.5,
        "train_samples": 40,
        "eval_loss": 1.8,
        "eval_accuracy": 0.5625,
        "bytes_up": 500_000,
        "bytes_down": 1_000_000,
        "bytes_backbone": 0,
        "seconds": 2.0,
    },
    {
        "round": 2,
        "sampled": 2,
        "clients": 2,
        "participants": ["7", "12"],
        "failed": 0,
        "rejected": 1,
        "train_loss": 0.9,
        "train_samples": 80,
        "eval_loss": 1.1,
        "eval_accuracy": 0.8125,
        "bytes_up": 1_000_000,
        "bytes_down": 1_000_000,
        "bytes_backbone": 0,
        "seconds": 3.0,
    },
)


def _write_run(
    directory: Path, rows: Sequence[Mapping[str, Any]], summary: bool = True
) -> Path:
    directory.mkdir(parents=True, exist_ok=True)
    (directory / METRICS_FILE).write_text(
        "".join(json.dumps(row) + "\n" for row in rows)
    )
    if summary:
        config = {**DEFAULTS, "lora.r": 4, "aggregation": "median"}
        (directory / SUMMARY_FILE).write_text(
            json.dumps(
                {
                    "kind": "federated",
                    "config": config,
                    "backbone": {
                        "name": "tiny-bert",
                        "fingerprint": FINGERPRINT,
                        "pooling": "mean",
                        "parameters": 1000,
                    },
                    "labels": ["a", "b"],
                    "final": rows[-1],
                    "totals": {
                        "bytes_up": 1_500_000,
                        "bytes_down": 2_000_000,
                        "bytes_backbone": 0,
                        "train_samples": 120,
                        "seconds": 6.0,
                        "rejected": 1,
                        "failed": 1,
                    },
                    "wall_seconds": 7.5,
                }
            )
        )
    return directory


@pytest.fixture
def run_dir(tmp_path: Path) -> Path:
    return _write_run(tmp_path / "run", ROWS)


def _inspected(directory: Path) -> str:
    console = Console(record=True, width=120)
    inspect_run(directory, console)
    return console.export_text()


def _without_participants() -> list[dict[str, Any]]:
    return [{k: v for k, v in row.items() if k != "participants"} for row in ROWS]


@pytest.mark.parametrize("accuracy", ["0.1250", "0.5625", "0.8125"])
def test_inspect_shows_each_rounds_accuracy(run_dir: Path, accuracy: str) -> None:
    text = _inspected(run_dir)

    assert accuracy in text


def test_inspect_lists_settings_that_differ_from_defaults(run_dir: Path) -> None:
    text = _inspected(run_dir)

    assert "lora.r = 4" in text
    assert "aggregation = 'median'" in text


def test_inspect_omits_settings_left_at_default(run_dir: Path) -> None:
    text = _inspected(run_dir)

    assert "seed = " not in text


def test_changed_settings_keeps_unknown_keys_and_skips_missing_ones() -> None:
    config = {"seed": DEFAULTS["seed"], "lora.r": 2, "old.key": 1}

    changed = changed_settings(config)

    assert changed == {"lora.r": 2, "old.key": 1}


def test_inspect_shows_kind_backbone_and_short_fingerprint(run_dir: Path) -> None:
    text = _inspected(run_dir)

    assert "federated run, backbone tiny-bert (ab12cd34ef56, mean pooling)" in text
    assert FINGERPRINT not in text


@pytest.mark.parametrize(
    ("quantity", "value"),
    [
        ("bytes up", "1.50 MB"),
        ("bytes down", "2.00 MB"),
        ("wall time", "7.5 s"),
        ("rejected updates", "1"),
        ("failed replies", "1"),
        ("final eval accuracy", "0.8125"),
    ],
)
def test_inspect_shows_totals(run_dir: Path, quantity: str, value: str) -> None:
    text = _inspected(run_dir)

    assert re.search(rf"{quantity}\s*│\s*{re.escape(value)}\s*│", text)


def test_inspect_sums_totals_from_rounds_without_summary(tmp_path: Path) -> None:
    directory = _write_run(tmp_path / "running", ROWS, summary=False)

    text = _inspected(directory)

    assert "no summary.json yet" in text
    assert re.search(r"bytes up\s*│\s*1\.50 MB", text)


def test_inspect_missing_folder_names_path(tmp_path: Path) -> None:
    missing = tmp_path / "nowhere"

    with pytest.raises(FileNotFoundError, match="output.dir") as caught:
        inspect_run(missing, Console(quiet=True))

    assert str(missing) in str(caught.value)


def test_inspect_missing_metrics_names_file(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError) as caught:
        inspect_run(tmp_path, Console(quiet=True))

    assert str(tmp_path / METRICS_FILE) in str(caught.value)


@pytest.mark.parametrize("bad_line", ["{not json", "[1, 2]", '{"eval_loss": 1.0}'])
def test_inspect_malformed_line_names_file_and_line(
    run_dir: Path, bad_line: str
) -> None:
    metrics = run_dir / METRICS_FILE
    lines = metrics.read_text().splitlines()
    lines.insert(1, bad_line)
    metrics.write_text("\n".join(lines) + "\n")

    with pytest.raises(ValueError, match=f"{metrics}:2:"):
        inspect_run(run_dir, Console(quiet=True))


@pytest.fixture(scope="module")
def report_paths(tmp_path_factory: pytest.TempPathFactory) -> list[Path]:
    # Drawing is the slow part: the report is written once for the checks on it.
    directory = _write_run(tmp_path_factory.mktemp("reported") / "run", ROWS)
    return write_report(directory)


def test_write_report_returns_three_pngs_in_report_folder(
    report_paths: list[Path],
) -> None:
    names = [path.name for path in report_paths]

    assert names == ["accuracy_loss.png", "bytes.png", "participation.png"]
    assert all(path.parent.name == REPORT_DIR for path in report_paths)


def test_write_report_files_are_non_empty_pngs(report_paths: list[Path]) -> None:
    contents = [path.read_bytes() for path in report_paths]

    assert all(content.startswith(PNG_SIGNATURE) for content in contents)
    assert all(len(content) > len(PNG_SIGNATURE) for content in contents)


def test_participation_plot_works_without_participants(tmp_path: Path) -> None:
    path = tmp_path / "participation.png"

    plot_participation(_without_participants(), path, "old run")

    assert path.read_bytes().startswith(PNG_SIGNATURE)


def test_write_report_rejects_empty_metrics(tmp_path: Path) -> None:
    directory = _write_run(tmp_path / "empty", [], summary=False)

    with pytest.raises(ValueError, match="no rounds"):
        write_report(directory)


def test_participation_plot_shows_short_site_indices_with_a_key_to_node_ids() -> None:
    # Prepare: Flower's node ids are up to 20 digits long
    ids = ["5601218217620854168", "12093820938209382093", "4432"]
    rows = [{"round": r, "participants": ids[: r + 1]} for r in range(3)]

    # Execute
    figure = participation_figure(rows, "federated-20261204-160250 (federated)\nrun")
    FigureCanvasAgg(figure).draw()

    # Assert: indices on the axis, ids in the key, and the title inside the figure
    (axes,) = figure.axes
    assert [label.get_text() for label in axes.get_yticklabels()] == ["0", "1", "2"]
    assert "0: node 4432" in axes.get_xlabel() and ids[1] in axes.get_xlabel()
    renderer = figure.canvas.get_renderer()
    title = axes.title.get_window_extent(renderer)
    assert 0 <= title.x0 and title.x1 <= figure.bbox.x1 and title.y1 <= figure.bbox.y1
