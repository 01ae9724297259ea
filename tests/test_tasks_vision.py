"""Federated LoRA on image backbones (``model.task = image-cls``): tiny ViT and ResNet
models built from a config, generated images (a coloured square per class; both in
``conftest.py``), the real coordinator and ClientApp in process."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from common.config import ConfigError, RunConfig
from common.data import DataError
from common.splits import all_client_examples
from common.tasks.image_classification.data import load_image_examples
from server.checkpoint import load_checkpoint
from simulations.task_demo import IMAGE_CLASSES
from tests.task_runs import IMAGE_CLIENTS, image_config, run

# -- data ------------------------------------------------------------------------------


def test_image_folder_rows_take_their_label_from_the_sub_folder(images: Path) -> None:
    # Execute
    rows = load_image_examples(images)

    # Assert
    assert sorted({row.label for row in rows}) == sorted(IMAGE_CLASSES)
    assert len(rows) == 18 * len(IMAGE_CLASSES)
    for row in rows:
        assert Path(row.text).is_absolute() and Path(row.text).parent.name == row.label


def test_listing_paths_are_read_relative_to_the_listing(
    images: Path, tmp_path: Path
) -> None:
    # Prepare
    listing = images.parent / "listing.csv"
    listing.write_text(
        "file,kind,site\nimages/red/0.png,red,a\nimages/blue/1.png,blue,b\n"
    )

    # Execute
    rows = load_image_examples(listing, image_column="file", label_column="kind")

    # Assert
    assert [row.label for row in rows] == ["red", "blue"]
    assert rows[0].text == str((images / "red" / "0.png").resolve())
    assert rows[1].extra == {"site": "b"}


@pytest.mark.parametrize(
    ("layout", "message"),
    [
        ("missing-image", r"listing.jsonl:2: image 'gone.png' not found"),
        ("loose-image", r"must sit in one sub-folder per class"),
        ("empty-class", r"class folder holds no images"),
        ("no-column", r"listing.jsonl:1: no column 'image'"),
    ],
)
def test_image_data_errors_name_the_file_and_what_to_fix(
    images: Path, tmp_path: Path, layout: str, message: str
) -> None:
    # Prepare
    from PIL import Image

    folder = tmp_path / "data"
    (folder / "red").mkdir(parents=True)
    Image.new("RGB", (4, 4)).save(folder / "red" / "a.png")
    target: Path = folder
    if layout == "missing-image":
        target = folder / "listing.jsonl"
        target.write_text(
            '{"image": "red/a.png", "label": "red"}\n'
            '{"image": "gone.png", "label": "red"}\n'
        )
    elif layout == "loose-image":
        Image.new("RGB", (4, 4)).save(folder / "loose.png")
    elif layout == "empty-class":
        (folder / "blue").mkdir()
    else:
        target = folder / "listing.jsonl"
        target.write_text('{"path": "red/a.png", "label": "red"}\n')

    # Execute / Assert
    with pytest.raises(DataError, match=message):
        load_image_examples(target)


def test_unreadable_image_is_named_when_encoded(tmp_path: Path) -> None:
    # Prepare
    from common.tasks.image_classification.data import read_image

    folder = tmp_path / "data" / "red"
    folder.mkdir(parents=True)
    (folder / "broken.png").write_bytes(b"not a png")
    (row,) = load_image_examples(tmp_path / "data")

    # Execute / Assert
    with pytest.raises(DataError, match=r"broken.png is not a readable image"):
        read_image(row)


def test_dirichlet_partition_splits_images_by_label(images: Path) -> None:
    # Prepare
    data = image_config(
        Path("unused"),
        images,
        Path("unused"),
        **{
            "data.partition": "dirichlet",
            "data.dirichlet-alpha": 0.3,
        },
    ).data

    # Execute
    clients = all_client_examples(data, 7, IMAGE_CLIENTS)

    # Assert
    assert sum(len(rows) for rows in clients) == int(
        round(18 * len(IMAGE_CLASSES) * 0.8)
    )
    shares = [
        {label: sum(row.label == label for row in rows) for label in IMAGE_CLASSES}
        for rows in clients
    ]
    assert any(len([n for n in share.values() if n]) < 3 for share in shares)


# -- the model -------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("kind", "pooling", "factor_dims"),
    [("vit", "cls", 2), ("resnet", "pooler", 4)],
)
def test_lora_sits_on_attention_or_convolutions(
    vision_backbones: dict[str, Path], kind: str, pooling: str, factor_dims: int
) -> None:
    # Prepare
    from common.tasks.image_classification.model import (
        image_adapter_state,
        load_image_classifier,
    )

    settings = RunConfig.from_flat({}).lora

    # Execute
    model = load_image_classifier(vision_backbones[kind], settings, "native", 3, seed=1)
    state = image_adapter_state(model)

    # Assert
    factors = [v for k, v in state.items() if ".lora_" in k]
    assert factors and all(v.ndim == factor_dims for v in factors)
    assert model.pooling == pooling
    assert state["head.weight"].shape == (3, model.head.in_features)
    assert model(torch.zeros(2, 3, 32, 32)).shape == (2, 3)


# -- federated runs --------------------------------------------------------------------


def test_federated_vit_run_raises_accuracy(
    vision_backbones: dict[str, Path], images: Path, tmp_path: Path
) -> None:
    # Prepare
    config = image_config(vision_backbones["vit"], images, tmp_path / "out")

    # Execute
    rows = run(config, tmp_path)

    # Assert
    assert [row["round"] for row in rows] == [0, 1, 2, 3]
    assert rows[-1]["eval_accuracy"] > rows[0]["eval_accuracy"] + 0.2
    assert rows[-1]["eval_loss"] < rows[0]["eval_loss"]
    assert "eval_perplexity" not in rows[-1]
    summary = json.loads((tmp_path / "out" / "summary.json").read_text())
    assert summary["labels"] == sorted(IMAGE_CLASSES)
    assert summary["backbone"]["pooling"] == "cls"


def test_federated_resnet_run_lowers_loss(
    vision_backbones: dict[str, Path], images: Path, tmp_path: Path
) -> None:
    # Prepare
    config = image_config(
        vision_backbones["resnet"],
        images,
        tmp_path / "out",
        **{"num-server-rounds": 2, "train.lr": 0.05},
    )

    # Execute
    rows = run(config, tmp_path)

    # Assert
    assert rows[-1]["eval_loss"] < rows[0]["eval_loss"]
    state = load_checkpoint(tmp_path / "out").state
    assert any(value.ndim == 4 for name, value in state.items() if ".lora_" in name)


def test_head_only_rounds_then_lora_with_per_label_averaging(
    vision_backbones: dict[str, Path], images: Path, tmp_path: Path
) -> None:
    # Prepare
    config = image_config(
        vision_backbones["vit"],
        images,
        tmp_path / "out",
        **{
            "train.mode": "lp-ft",
            "train.lp-rounds": 1,
            "num-server-rounds": 2,
            "aggregation": "fedavg-per-label",
        },
    )

    # Execute
    rows = run(config, tmp_path)

    # Assert
    assert [row["phase"] for row in rows[1:]] == ["head", "lora"]
    assert rows[1]["bytes_up"] < rows[2]["bytes_up"]  # the head alone goes up first
    assert rows[-1]["eval_loss"] < rows[0]["eval_loss"]


def test_secure_aggregation_run_of_an_image_classifier(
    vision_backbones: dict[str, Path], images: Path, tmp_path: Path
) -> None:
    # Prepare
    config = image_config(
        vision_backbones["vit"],
        images,
        tmp_path / "out",
        **{"num-server-rounds": 2, "secagg.enabled": True},
    )

    # Execute
    rows = run(config, tmp_path)

    # Assert
    assert all(row["clients"] == IMAGE_CLIENTS for row in rows[1:])
    assert rows[-1]["eval_loss"] < rows[0]["eval_loss"]


def test_merged_model_predicts_as_backbone_with_adapter(
    vision_backbones: dict[str, Path],
    images: Path,
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
) -> None:
    # Prepare
    from peft import PeftModel
    from PIL import Image
    from safetensors.torch import load_file
    from transformers import AutoModel

    from common.tasks.image_classification.model import (
        ImageClassifier,
        MergedImageClassifier,
    )
    from simulations.cli import main

    config = image_config(
        vision_backbones["vit"], images, tmp_path / "run", **{"num-server-rounds": 1}
    )
    run(config, tmp_path)
    merged = MergedImageClassifier.load(tmp_path / "run" / "merged")
    meta = json.loads((tmp_path / "run" / "adapter" / "fedgraft_head.json").read_text())
    encoder = PeftModel.from_pretrained(
        AutoModel.from_pretrained(str(vision_backbones["vit"])),
        str(tmp_path / "run" / "adapter"),
    )
    adapted = ImageClassifier(
        encoder, meta["pooling"], len(meta["labels"]), merged.model.head.in_features
    )
    adapted.head.load_state_dict(
        load_file(str(tmp_path / "run" / "adapter" / "head.safetensors"))
    )
    adapted.eval()
    picture = str(images / "green" / "3.png")
    capsys.readouterr()  # the run's table

    # Execute
    code = main(["predict", str(tmp_path / "run" / "merged"), picture])
    printed = capsys.readouterr().out.split("\t")

    # Assert
    pixels = merged.processor(
        images=[Image.open(picture).convert("RGB")],
        return_tensors="pt",
    )["pixel_values"]
    with torch.no_grad():
        torch.testing.assert_close(
            merged.model(pixels), adapted(pixels), rtol=1e-4, atol=1e-5
        )
    assert code == 0 and printed[0] in IMAGE_CLASSES
    assert np.isclose(float(printed[1]), merged.predict([picture])[0][1], atol=1e-3)


# -- refused settings ------------------------------------------------------------------


@pytest.mark.parametrize(
    ("overrides", "key"),
    [
        ({"head.init": "label-names", "data.path": "x"}, "head.init"),
        ({"head.init": "random"}, "data.path"),
        (
            {"head.init": "random", "data.path": "x", "aggregation": "flexlora"},
            "aggregation",
        ),
    ],
)
def test_settings_images_cannot_use_are_refused_naming_the_key(
    overrides: dict[str, object], key: str
) -> None:
    with pytest.raises(ConfigError) as caught:
        RunConfig.from_flat({"model.task": "image-cls", **overrides})

    assert f"config key '{key}'" in str(caught.value)
