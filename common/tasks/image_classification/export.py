"""The image classifier's ONNX export plan."""

from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np

from common.tasks.export import CHECK_IMAGES, TRACE_IMAGES, OnnxPlan, logits_of


def onnx_plan(source: Path) -> OnnxPlan:
    """An image classifier: ``pixel_values -> logits (batch, labels)``."""
    from PIL import Image

    from common.tasks.image_classification.model import (
        HEAD_FILE,
        MergedImageClassifier,
        load_image_processor,
    )

    processor = load_image_processor(source)  # names the folder when it has none
    # One module is traced and checked: without a padding mask, the attention path
    # does not specialise on the example batch.
    model = MergedImageClassifier.load(source).model.float().eval()

    def batch(count: int, seed: int) -> dict[str, np.ndarray]:
        # Noise images of mixed sizes: the processor resizes them to its own.
        rng = np.random.default_rng(seed)
        images = [
            Image.fromarray(
                rng.integers(0, 256, (24 + 8 * i, 40 - 4 * i, 3), dtype=np.uint8)
            )
            for i in range(count)
        ]
        pixels = processor(images=images, return_tensors="np")["pixel_values"]
        return {"pixel_values": np.asarray(pixels, dtype=np.float32)}

    def write_files(out: Path) -> None:
        processor.save_pretrained(str(out))
        shutil.copy2(source / HEAD_FILE, out / HEAD_FILE)

    check = batch(CHECK_IMAGES, seed=1)
    return OnnxPlan(
        traced=model,
        trace_inputs=batch(TRACE_IMAGES, seed=0),
        check_inputs=check,
        expected=logits_of(model, check),
        dynamic_axes={"pixel_values": {0: "batch"}, "logits": {0: "batch"}},
        write_files=write_files,
        model_type=str(getattr(model.encoder.config, "model_type", "")),
    )
