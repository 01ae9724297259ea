"""What a task's ONNX export is: the plan that ``fedgraft export --format onnx``
traces, writes and checks (:mod:`simulations.export`), and the sample inputs every
task traces on. Each task builds its own plan (:meth:`Task.onnx_plan
<common.tasks.base.Task.onnx_plan>`).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

if TYPE_CHECKING:
    from torch import nn

#: The graph is traced on one batch and checked on another of a different shape, so
#: the check also covers the dynamic batch (and sequence) axes.
TRACE_TEXTS = ["a", "a longer sentence to make the batch need padding on one row"]
CHECK_TEXTS = [
    "another sentence, of a third length",
    "b",
    "a row longer than the traced ones, so that the check batch has its own shape",
]
TRACE_IMAGES, CHECK_IMAGES = 2, 3


class ExportError(ValueError):
    """The export cannot be made or does not reproduce the model's logits."""


@dataclass(frozen=True)
class OnnxPlan:
    """What one task's ONNX export traces, writes and checks.

    Attributes
    ----------
    traced : nn.Module
        In eval mode; ``forward`` takes the inputs in ``trace_inputs``' order and
        returns the logits alone.
    trace_inputs, check_inputs : Mapping[str, np.ndarray]
        The graph's inputs by name: the batch to trace and the batch to check with.
    expected : np.ndarray
        The PyTorch logits on ``check_inputs`` of the model loaded as ``predict`` or
        ``generate`` load the folder (computed before ``traced`` is loaded, so that
        a large model is not held twice).
    dynamic_axes : dict[str, dict[int, str]]
        The axes left free in the graph, per input and for ``logits``.
    write_files : Callable[[Path], None]
        Writes what reads the graph's inputs and outputs (tokenizer, image processor,
        labels) into the export folder.
    model_type : str
        The backbone's family (``config.model_type``), for error messages.
    compare_where : str or None
        An input whose zeros mark positions without meaning (padding): their logits
        are not compared.
    """

    traced: nn.Module
    trace_inputs: Mapping[str, np.ndarray]
    check_inputs: Mapping[str, np.ndarray]
    expected: np.ndarray
    dynamic_axes: dict[str, dict[int, str]]
    write_files: Callable[[Path], None]
    model_type: str
    compare_where: str | None = None


def logits_of(model: nn.Module, inputs: Mapping[str, np.ndarray]) -> np.ndarray:
    """``model``'s logits on ``inputs`` (passed in their order), as numpy."""
    import torch

    with torch.no_grad():
        logits = model(*(torch.from_numpy(v) for v in inputs.values()))
    return np.asarray(logits.numpy())
