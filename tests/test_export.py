"""``fedgraft export``: Hugging Face and ONNX copies of a run's merged model."""

from __future__ import annotations

import json
import logging
import re
from pathlib import Path

import numpy as np
import pytest

from client.client_app import app as client_app
from common.backbone import portable_name
from common.config import RunConfig
from common.tasks.text_classification.inference import (
    MergedClassifier,
    OnnxClassifier,
    load_classifier,
)
from common.tasks.text_classification.saving import write_sentence_modules
from server.server_app import coordinate
from simulations.cli import main
from simulations.export import ExportError, export_run
from tests.conftest import InProcessGrid


@pytest.fixture(scope="module")
def finished_run(tmp_path_factory: pytest.TempPathFactory, tiny_backbone: Path) -> Path:
    """One short federated run on the demo corpus with the tiny backbone."""
    output = tmp_path_factory.mktemp("run")
    config = RunConfig.from_flat(
        {
            "model.name": str(tiny_backbone),
            "num-server-rounds": 1,
            "train.max-steps": 2,
            "output.dir": str(output),
        }
    )
    nodes = {
        100 + i: {
            "partition-id": i,
            "num-partitions": 4,
            "cache-dir": str(output / "c"),
        }
        for i in range(4)
    }
    coordinate(InProcessGrid(client_app, nodes), config)  # type: ignore[arg-type]
    return output


TEXTS = ["send money to my savings account", "lock doors", "how much is in the account"]


def test_the_onnx_export_reproduces_the_merged_model(
    finished_run: Path, tmp_path: Path
) -> None:
    # Execute
    out = export_run(finished_run, "onnx", tmp_path / "onnx")

    # Assert: same labels and probabilities through onnxruntime
    onnx_model, merged = (
        load_classifier(out),
        MergedClassifier.load(finished_run / "merged"),
    )
    assert isinstance(onnx_model, OnnxClassifier)
    expected, actual = merged.predict(TEXTS), onnx_model.predict(TEXTS)
    assert [label for label, _ in actual] == [label for label, _ in expected]
    np.testing.assert_allclose(
        [p for _, p in actual], [p for _, p in expected], atol=1e-5
    )


def test_the_hf_export_loads_as_a_merged_classifier(
    finished_run: Path, tmp_path: Path
) -> None:
    out = export_run(finished_run, "hf", tmp_path / "hf")
    loaded = load_classifier(out)
    assert isinstance(loaded, MergedClassifier)
    assert loaded.predict(TEXTS) == MergedClassifier.load(
        finished_run / "merged"
    ).predict(TEXTS)


def test_exporting_a_folder_without_a_model_names_it(tmp_path: Path) -> None:
    with pytest.raises(
        ExportError, match="no merged model; point at a run's output.dir"
    ):
        export_run(tmp_path, "hf", tmp_path / "out")


def test_the_export_command_writes_the_folder_and_predict_reads_it(
    finished_run: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    out = tmp_path / "cli-onnx"
    assert (
        main(["export", str(finished_run), "--format", "onnx", "--out", str(out)]) == 0
    )
    assert main(["predict", str(out), "lock doors"]) == 0
    assert capsys.readouterr().out.strip().splitlines()[-1].endswith("\tlock doors")


def test_onnx_export_without_the_extra_says_which_to_install(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    # Prepare: a merged folder, and an environment without onnx
    import simulations.export

    (tmp_path / "merged").mkdir()
    (tmp_path / "merged" / "fedgraft_head.json").write_text("{}")
    monkeypatch.setattr(
        simulations.export,
        "find_spec",
        lambda name: None if name == "onnx" else object(),
    )

    # Execute
    code = main(["export", str(tmp_path), "--format", "onnx", "--out", "x"])

    # Assert
    error = capsys.readouterr().err
    assert code == 2
    assert "--format onnx needs onnx" in error
    assert "pip install 'fedgraft[export]'" in error and "trace" not in error


def test_the_onnx_export_reports_its_check_on_sample_rows(
    finished_run: Path, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    # Execute
    with caplog.at_level(logging.INFO, logger="simulations.export"):
        export_run(finished_run, "onnx", tmp_path / "onnx")

    # Assert
    assert re.search(
        r"ONNX check \(onnxruntime vs PyTorch on 3 sample rows\): 3/3 predictions "
        r"agree, largest logit difference \S+ \(allowed \S+\)",
        caplog.text,
    )
    assert "TracerWarning" not in caplog.text


def test_the_adapter_names_its_base_model_portably(
    finished_run: Path, tiny_backbone: Path
) -> None:
    # Execute
    config = json.loads((finished_run / "adapter" / "adapter_config.json").read_text())

    # Assert
    assert config["base_model_name_or_path"] == str(tiny_backbone.resolve())


@pytest.mark.parametrize(
    ("name", "portable"),
    [
        ("minilm", "sentence-transformers/all-MiniLM-L6-v2"),
        ("bert-base-uncased", "bert-base-uncased"),
    ],
)
def test_portable_name_of_a_backbone(name: str, portable: str) -> None:
    assert portable_name(name) == portable


def test_merged_modules_stop_at_the_pooling_the_head_reads(tmp_path: Path) -> None:
    # Prepare: a backbone whose pipeline normalises after pooling, as MiniLM's does
    backbone, merged = tmp_path / "backbone", tmp_path / "merged"
    (backbone / "1_Pooling").mkdir(parents=True)
    (backbone / "1_Pooling" / "config.json").write_text("{}")
    merged.mkdir()
    modules = [
        {"idx": 0, "name": "0", "path": "", "type": "models.Transformer"},
        {"idx": 1, "name": "1", "path": "1_Pooling", "type": "models.Pooling"},
        {"idx": 2, "name": "2", "path": "2_Normalize", "type": "models.Normalize"},
    ]
    (backbone / "modules.json").write_text(json.dumps(modules))

    # Execute
    write_sentence_modules(backbone, merged)

    # Assert: every module listed is written, and none comes after the pooling
    written = json.loads((merged / "modules.json").read_text())
    assert written == modules[:2]
    assert (merged / "1_Pooling" / "config.json").exists()
