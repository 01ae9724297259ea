"""``fedgraft export --format onnx`` of causal LMs and image classifiers: tiny Llama,
GPT-2, ViT and ResNet backbones built from a config (``conftest.py``), merged the way
a run's coordinator writes ``merged/`` (the adapter state loaded, then the merged
save), and the graphs run with onnxruntime against PyTorch on batches they were not
traced on."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import onnx
import onnxruntime
import pytest
import torch

from common.config import RunConfig
from common.tasks import TASK_FILE
from simulations.cli import main
from simulations.export import ONNX_FILE, ExportError, check_onnx, export_run
from simulations.task_demo import IMAGE_CLASSES, write_image_folder

LABELS = tuple(sorted(IMAGE_CLASSES))
PROMPTS = [
    "the chef bakes bread slowly",
    "my account",
    "the pilot boards the plane at dawn for paris in june",
    "a",
]


def trained_state(state: dict[str, np.ndarray], seed: int) -> dict[str, np.ndarray]:
    """``state`` with every tensor replaced by seeded noise, so that merging the LoRA
    factors changes the backbone (B starts at zero) as training would."""
    rng = np.random.default_rng(seed)
    return {
        k: rng.normal(0.0, 0.2, v.shape).astype(np.float32) for k, v in state.items()
    }


def write_merged_lm(backbone: Path, run_dir: Path) -> Path:
    """``run_dir/merged`` as a causal-lm run writes it."""
    from common.tasks.causal_lm.model import (
        lm_adapter_state,
        load_causal_lm,
        load_lm_adapter_state,
        load_lm_tokenizer,
        save_merged_lm,
    )

    model = load_causal_lm(backbone, RunConfig.from_flat({}).lora, seed=0)
    load_lm_adapter_state(model, trained_state(lm_adapter_state(model), seed=1))
    merged = run_dir / "merged"
    merged.mkdir(parents=True)
    save_merged_lm(model, load_lm_tokenizer(backbone)[0], merged)
    return merged


def write_merged_image_classifier(backbone: Path, run_dir: Path) -> Path:
    """``run_dir/merged`` as an image-cls run writes it."""
    from common.tasks.image_classification.model import (
        image_adapter_state,
        load_image_adapter_state,
        load_image_classifier,
        load_image_processor,
        save_merged_image_classifier,
    )

    settings = RunConfig.from_flat({}).lora
    model = load_image_classifier(backbone, settings, "native", len(LABELS), seed=0)
    load_image_adapter_state(model, trained_state(image_adapter_state(model), seed=1))
    merged = run_dir / "merged"
    merged.mkdir(parents=True)
    save_merged_image_classifier(model, load_image_processor(backbone), merged, LABELS)
    return merged


def right_padded(tokenizer, texts: list[str]) -> dict[str, np.ndarray]:  # type: ignore[no-untyped-def]
    """Right-padded ``input_ids`` and ``attention_mask`` (int64) for ``texts``."""
    rows = [tokenizer(text)["input_ids"] for text in texts]
    width = max(len(row) for row in rows)
    ids = np.full((len(rows), width), tokenizer.pad_token_id, dtype=np.int64)
    mask = np.zeros((len(rows), width), dtype=np.int64)
    for line, row in enumerate(rows):
        ids[line, : len(row)], mask[line, : len(row)] = row, 1
    return {"input_ids": ids, "attention_mask": mask}


def run_onnx(folder: Path, inputs: dict[str, np.ndarray]) -> np.ndarray:
    session = onnxruntime.InferenceSession(
        str(folder / ONNX_FILE), providers=["CPUExecutionProvider"]
    )
    (logits,) = session.run(None, inputs)
    return np.asarray(logits)


def free_axes(folder: Path) -> dict[str, list[bool]]:
    """Per graph input and output: which axes are symbolic (left free)."""
    graph = onnx.load(str(folder / ONNX_FILE), load_external_data=False).graph
    return {
        value.name: [bool(d.dim_param) for d in value.type.tensor_type.shape.dim]
        for value in [*graph.input, *graph.output]
    }


@pytest.fixture(scope="module")
def lm_runs(
    small_causal_lms: dict[str, Path], tmp_path_factory: pytest.TempPathFactory
) -> dict[str, Path]:
    """Run folders holding the ``merged/`` of a tiny Llama and a tiny GPT-2."""
    folder = tmp_path_factory.mktemp("lm-export")
    return {
        kind: write_merged_lm(backbone, folder / kind).parent
        for kind, backbone in small_causal_lms.items()
    }


@pytest.fixture(scope="module")
def vision_runs(
    vision_backbones: dict[str, Path], tmp_path_factory: pytest.TempPathFactory
) -> dict[str, Path]:
    """Run folders holding the ``merged/`` of a tiny ViT and a tiny ResNet."""
    folder = tmp_path_factory.mktemp("vision-export")
    return {
        kind: write_merged_image_classifier(backbone, folder / kind).parent
        for kind, backbone in vision_backbones.items()
    }


@pytest.fixture(scope="module")
def lm_exports(
    lm_runs: dict[str, Path], tmp_path_factory: pytest.TempPathFactory
) -> dict[str, Path]:
    folder = tmp_path_factory.mktemp("lm-onnx")
    return {
        kind: export_run(run_dir, "onnx", folder / kind)
        for kind, run_dir in lm_runs.items()
    }


@pytest.fixture(scope="module")
def vision_exports(
    vision_runs: dict[str, Path], tmp_path_factory: pytest.TempPathFactory
) -> dict[str, Path]:
    folder = tmp_path_factory.mktemp("vision-onnx")
    return {
        kind: export_run(run_dir, "onnx", folder / kind)
        for kind, run_dir in vision_runs.items()
    }


@pytest.fixture(scope="module")
def pictures(tmp_path_factory: pytest.TempPathFactory) -> list[Path]:
    folder = write_image_folder(tmp_path_factory.mktemp("pictures") / "images", 2)
    return sorted(folder.glob("*/*.png"))


# -- causal language models ----------------------------------------------------------


@pytest.mark.parametrize("kind", ["llama", "gpt2"])
def test_causal_lm_graph_reproduces_the_merged_model_on_a_new_batch(
    lm_runs: dict[str, Path], lm_exports: dict[str, Path], kind: str
) -> None:
    # Prepare
    from transformers import AutoModelForCausalLM, AutoTokenizer

    out = lm_exports[kind]
    inputs = right_padded(AutoTokenizer.from_pretrained(str(out)), PROMPTS)
    merged = AutoModelForCausalLM.from_pretrained(str(lm_runs[kind] / "merged"))

    # Execute
    logits = run_onnx(out, inputs)

    # Assert: equal at every real token (padding positions mean nothing)
    with torch.no_grad():
        expected = merged.eval()(
            **{k: torch.from_numpy(v) for k, v in inputs.items()}
        ).logits.numpy()
    width, vocab = inputs["input_ids"].shape[1], merged.config.vocab_size
    assert logits.shape == expected.shape == (len(PROMPTS), width, vocab)
    keep = inputs["attention_mask"].astype(bool)
    np.testing.assert_allclose(logits[keep], expected[keep], atol=1e-4, rtol=1e-4)
    assert np.abs(expected).max() > 1.0  # the merged adapter gives real logits


@pytest.mark.parametrize("kind", ["llama", "gpt2"])
def test_causal_lm_graph_leaves_batch_and_sequence_free(
    lm_exports: dict[str, Path], kind: str
) -> None:
    # Execute
    axes = free_axes(lm_exports[kind])

    # Assert
    assert axes == {
        "input_ids": [True, True],
        "attention_mask": [True, True],
        "logits": [True, True, False],
    }


def test_causal_lm_export_carries_the_tokenizer_and_the_task(
    lm_runs: dict[str, Path], lm_exports: dict[str, Path]
) -> None:
    # Prepare
    from transformers import AutoTokenizer

    merged = AutoTokenizer.from_pretrained(str(lm_runs["llama"] / "merged"))

    # Execute
    exported = AutoTokenizer.from_pretrained(str(lm_exports["llama"]))

    # Assert
    assert exported(PROMPTS)["input_ids"] == merged(PROMPTS)["input_ids"]
    assert exported.pad_token == merged.pad_token
    task = json.loads((lm_exports["llama"] / TASK_FILE).read_text())
    assert task == {"task": "causal-lm"}


def test_export_command_writes_a_causal_lm_graph(
    lm_runs: dict[str, Path], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    # Prepare
    out = tmp_path / "cli-onnx"

    # Execute
    code = main(["export", str(lm_runs["gpt2"]), "--format", "onnx", "--out", str(out)])

    # Assert
    assert code == 0
    assert (out / ONNX_FILE).exists()
    assert capsys.readouterr().out.strip() == f"exported (onnx): {out}"


# -- image classifiers -----------------------------------------------------------------


@pytest.mark.parametrize("kind", ["vit", "resnet"])
def test_image_graph_reproduces_the_merged_classifier_on_new_images(
    vision_runs: dict[str, Path],
    vision_exports: dict[str, Path],
    pictures: list[Path],
    kind: str,
) -> None:
    # Prepare
    from PIL import Image

    from common.tasks.image_classification.model import MergedImageClassifier

    merged = MergedImageClassifier.load(vision_runs[kind] / "merged")
    images = [Image.open(path).convert("RGB") for path in pictures]
    pixels = merged.processor(images=images, return_tensors="pt")["pixel_values"]

    # Execute
    logits = run_onnx(vision_exports[kind], {"pixel_values": pixels.numpy()})

    # Assert
    with torch.no_grad():
        expected = merged.model(pixels).numpy()
    assert logits.shape == (len(pictures), len(LABELS))
    np.testing.assert_allclose(logits, expected, atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("kind", ["vit", "resnet"])
def test_image_graph_leaves_the_batch_free(
    vision_exports: dict[str, Path], kind: str
) -> None:
    # Execute
    axes = free_axes(vision_exports[kind])

    # Assert: the processor fixes channels and size
    assert axes == {
        "pixel_values": [True, False, False, False],
        "logits": [True, False],
    }


def test_image_export_carries_the_processor_and_the_label_map(
    vision_runs: dict[str, Path],
    vision_exports: dict[str, Path],
    pictures: list[Path],
) -> None:
    # Prepare
    from PIL import Image
    from transformers import AutoImageProcessor

    merged = vision_runs["vit"] / "merged"
    out = vision_exports["vit"]
    images = [Image.open(path).convert("RGB") for path in pictures[:2]]

    # Execute
    processor = AutoImageProcessor.from_pretrained(str(out))

    # Assert
    expected = AutoImageProcessor.from_pretrained(str(merged))
    torch.testing.assert_close(
        processor(images=images, return_tensors="pt")["pixel_values"],
        expected(images=images, return_tensors="pt")["pixel_values"],
    )
    head = json.loads((out / "fedgraft_head.json").read_text())
    assert head["labels"] == list(LABELS) and head["pooling"] == "cls"
    assert json.loads((out / TASK_FILE).read_text()) == {"task": "image-cls"}


def test_predict_on_an_image_graph_says_it_needs_onnxruntime(
    vision_exports: dict[str, Path],
    pictures: list[Path],
    capsys: pytest.CaptureFixture[str],
) -> None:
    # Execute
    code = main(["predict", str(vision_exports["resnet"]), str(pictures[0])])

    # Assert
    assert code == 2
    assert "no config.json" in capsys.readouterr().err


# -- refusals --------------------------------------------------------------------------


def test_exporting_a_missing_folder_names_it(tmp_path: Path) -> None:
    # Execute / Assert
    with pytest.raises(ExportError, match=r"nowhere: no merged model; point at a run"):
        export_run(tmp_path / "nowhere", "onnx", tmp_path / "out")


def test_exporting_an_unknown_task_names_the_task_file_and_the_known_tasks(
    lm_runs: dict[str, Path], tmp_path: Path
) -> None:
    # Prepare
    merged = shutil.copytree(lm_runs["llama"] / "merged", tmp_path / "merged")
    (merged / TASK_FILE).write_text(json.dumps({"task": "seq2seq"}))

    # Execute
    with pytest.raises(ExportError) as caught:
        export_run(merged, "onnx", tmp_path / "out")

    # Assert
    message = str(caught.value)
    assert f"{merged / TASK_FILE}: task 'seq2seq' has no ONNX export" in message
    assert "text-cls, causal-lm, image-cls" in message
    assert not (tmp_path / "out").exists()


def test_a_model_the_exporter_cannot_trace_is_refused_naming_its_family(
    lm_runs: dict[str, Path], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Prepare
    def refuse(*args: object, **kwargs: object) -> None:
        raise RuntimeError("unsupported operator")

    monkeypatch.setattr(torch.onnx, "export", refuse)

    # Execute / Assert
    with pytest.raises(
        ExportError, match=r"cannot trace this llama model \(RuntimeError: unsupported"
    ):
        export_run(lm_runs["llama"], "onnx", tmp_path / "out")


def test_a_graph_that_fails_its_check_is_not_left_on_disk(
    vision_runs: dict[str, Path], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Prepare
    import simulations.export

    def differ(*args: object, **kwargs: object) -> None:
        raise ExportError("ONNX logits differ from PyTorch")

    monkeypatch.setattr(simulations.export, "check_onnx", differ)

    # Execute
    with pytest.raises(ExportError, match="differ"):
        export_run(vision_runs["vit"], "onnx", tmp_path / "out")

    # Assert
    assert not (tmp_path / "out" / ONNX_FILE).exists()


@pytest.mark.parametrize(
    ("offset", "message"),
    [
        (1e-2, "ONNX logits differ from PyTorch by 1.00e-02"),
        (float("nan"), "logits are not all finite"),
        (float("inf"), "logits are not all finite"),
    ],
)
def test_a_graph_that_differs_from_pytorch_is_refused(
    vision_runs: dict[str, Path],
    vision_exports: dict[str, Path],
    offset: float,
    message: str,
) -> None:
    # Prepare
    from common.tasks.image_classification.model import MergedImageClassifier

    model = MergedImageClassifier.load(vision_runs["resnet"] / "merged").model
    pixels = np.zeros((2, 3, 32, 32), dtype=np.float32)
    with torch.no_grad():
        shifted = model(torch.from_numpy(pixels)).numpy() + offset

    # Execute / Assert
    with pytest.raises(ExportError, match=message):
        check_onnx(
            vision_exports["resnet"] / ONNX_FILE,
            {"pixel_values": pixels},
            shifted,
            tolerance=1e-4,
        )


def test_a_graph_fixed_to_the_traced_shape_is_refused(
    vision_exports: dict[str, Path],
) -> None:
    # Prepare: the image graph's size is fixed by the processor
    pixels = np.zeros((2, 3, 48, 48), dtype=np.float32)

    # Execute / Assert
    with pytest.raises(ExportError, match="onnxruntime cannot run the graph"):
        check_onnx(
            vision_exports["vit"] / ONNX_FILE,
            {"pixel_values": pixels},
            np.zeros((2, len(LABELS)), dtype=np.float32),
            tolerance=1e-4,
        )
