"""``fedgraft export``: Hugging Face and ONNX copies of a run's merged model."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from client.client_app import app as client_app
from common.config import RunConfig
from common.inference import MergedClassifier, OnnxClassifier, load_classifier
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
