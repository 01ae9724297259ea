"""``fedgraft export``: a run's merged model as a Hugging Face folder or as ONNX.

Every task's ONNX export follows one path: its plan (:class:`OnnxPlan`) names the
module to trace, the batch to trace it on, another batch (of another shape) with the
PyTorch logits the graph must reproduce on it, and the files that go beside
``model.onnx``; :func:`export_onnx` traces the plan, writes those files and checks the
graph with onnxruntime (:func:`check_onnx`) before the export is reported as done.

- ``text-cls``: ``input_ids, attention_mask -> logits (batch, labels)``, with the
  tokenizer and the head's metadata (labels, pooling);
- ``causal-lm``: ``input_ids, attention_mask -> logits (batch, sequence, vocab)``, no
  KV cache, with the tokenizer;
- ``image-cls``: ``pixel_values -> logits (batch, labels)`` at the image processor's
  size, with the processor's config and the head's metadata (labels, pooling).

Transformer graphs are traced with eager attention on a padded batch, so the padding
mask stays in the graph (the fused attention path specialises on the example batch).
"""

from __future__ import annotations

import logging
import shutil
import warnings
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from importlib.util import find_spec
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from common.outputs import MERGED_DIR
from common.tasks import TASK_FILE, read_task
from common.tasks.causal_lm import CAUSAL_LM
from common.tasks.image_classification import IMAGE_CLASSIFICATION
from common.tasks.text_classification import TEXT_CLASSIFICATION

if TYPE_CHECKING:
    from torch import nn

log = logging.getLogger(__name__)

ONNX_FILE = "model.onnx"
EXPORT_FORMATS = ("hf", "onnx")
#: The graph is traced on one batch and checked on another of a different shape, so
#: the check also covers the dynamic batch (and sequence) axes.
_TRACE_TEXTS = ["a", "a longer sentence to make the batch need padding on one row"]
_CHECK_TEXTS = [
    "another sentence, of a third length",
    "b",
    "a row longer than the traced ones, so that the check batch has its own shape",
]
_TRACE_IMAGES, _CHECK_IMAGES = 2, 3
_HEAD_META = "fedgraft_head.json"


class ExportError(ValueError):
    """The export cannot be made or does not reproduce the model's logits."""


@dataclass(frozen=True)
class OnnxCheck:
    """How the ONNX graph compared with PyTorch on the check batch.

    Attributes
    ----------
    rows : int
        Sample rows run through both (a batch of another shape than the traced one).
    predictions, agreeing : int
        Predictions compared (one per row; a causal LM's: one per real token) and
        how many name the same label or token in both.
    difference, allowed : float
        The largest absolute logit difference, and the most the check allows.
    """

    rows: int
    predictions: int
    agreeing: int
    difference: float
    allowed: float

    def describe(self) -> str:
        """One line for the console."""
        return (
            f"ONNX check (onnxruntime vs PyTorch on {self.rows} sample rows): "
            f"{self.agreeing}/{self.predictions} predictions agree, largest logit "
            f"difference {self.difference:.1e} (allowed {self.allowed:.1e})"
        )


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


def merged_dir(run_or_merged: Path) -> Path:
    """The ``merged/`` folder of a run, or the folder itself if it is one.

    Raises
    ------
    ExportError
        When neither holds a merged model.
    """
    for candidate in (run_or_merged / MERGED_DIR, run_or_merged):
        markers = (_HEAD_META, TASK_FILE)
        if any((candidate / name).exists() for name in markers):
            return candidate
    raise ExportError(f"{run_or_merged}: no merged model; point at a run's output.dir")


def export_hf(source: Path, out: Path) -> Path:
    """Copy the merged Hugging Face folder (encoder, head, tokenizer, labels; for a
    causal LM, the merged ``AutoModelForCausalLM`` folder and its tokenizer)."""
    shutil.copytree(source, out, dirs_exist_ok=True)
    return out


def _logits(model: nn.Module, inputs: Mapping[str, np.ndarray]) -> np.ndarray:
    """``model``'s logits on ``inputs`` (passed in their order), as numpy."""
    import torch

    with torch.no_grad():
        logits = model(*(torch.from_numpy(v) for v in inputs.values()))
    return np.asarray(logits.numpy())


def _text_classifier_plan(source: Path) -> OnnxPlan:
    """A text classifier: ``input_ids, attention_mask -> logits (batch, labels)``."""
    import torch
    from transformers import AutoModel

    from common.inference import HEAD_FILES, MergedClassifier
    from common.model import TextClassifier

    reference = MergedClassifier.load(source)
    encoder = AutoModel.from_pretrained(
        str(source), attn_implementation="eager", dtype=torch.float32
    )
    traced = TextClassifier(encoder, reference.model.pooling, len(reference.labels))
    traced.head.load_state_dict(reference.model.head.state_dict())

    def batch(texts: list[str]) -> dict[str, np.ndarray]:
        encoded = reference.tokenizer(texts, return_tensors="np", padding=True)
        return {k: encoded[k].astype(np.int64) for k in ("input_ids", "attention_mask")}

    check = batch(_CHECK_TEXTS)

    def write_files(out: Path) -> None:
        reference.tokenizer.save_pretrained(str(out))
        for name in HEAD_FILES:
            shutil.copy2(source / name, out / name)

    axes = {0: "batch", 1: "sequence"}
    return OnnxPlan(
        traced=traced.float().eval(),
        trace_inputs=batch(_TRACE_TEXTS),
        check_inputs=check,
        expected=_logits(reference.model.float().eval(), check),
        dynamic_axes={
            "input_ids": axes,
            "attention_mask": axes,
            "logits": {0: "batch"},
        },
        write_files=write_files,
        model_type=str(encoder.config.model_type),
    )


def _next_token_logits(lm: nn.Module) -> nn.Module:
    """``lm`` called without a KV cache, returning the logits alone (the ONNX graph's
    one output)."""
    import torch
    from torch import nn

    class NextTokenLogits(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.lm = lm

        def forward(
            self, input_ids: torch.Tensor, attention_mask: torch.Tensor
        ) -> torch.Tensor:
            """Logits ``(batch, seq, vocab)``."""
            output = self.lm(
                input_ids=input_ids, attention_mask=attention_mask, use_cache=False
            )
            return output.logits

    return NextTokenLogits().eval()


def _causal_lm_plan(source: Path) -> OnnxPlan:
    """A causal LM: ``input_ids, attention_mask -> logits (batch, seq, vocab)``."""
    import torch
    from transformers import AutoModelForCausalLM

    from common.causal_lm import load_lm_tokenizer

    if not (source / "config.json").exists():
        raise ExportError(
            f"{source}: no config.json; a causal-lm merged/ folder holds the merged "
            "AutoModelForCausalLM"
        )
    tokenizer, pad_id = load_lm_tokenizer(source)

    def batch(texts: list[str]) -> dict[str, np.ndarray]:
        # Right-padded with the pad id the runs use: tokenizers without a pad token
        # (GPT-2's) cannot pad by themselves.
        rows = [tokenizer(text)["input_ids"] for text in texts]
        width = max(len(row) for row in rows)
        input_ids = np.full((len(rows), width), pad_id, dtype=np.int64)
        attention_mask = np.zeros((len(rows), width), dtype=np.int64)
        for line, row in enumerate(rows):
            input_ids[line, : len(row)] = row
            attention_mask[line, : len(row)] = 1
        return {"input_ids": input_ids, "attention_mask": attention_mask}

    check = batch(_CHECK_TEXTS)
    # The reference loads as `fedgraft generate` loads it (the default attention).
    reference = AutoModelForCausalLM.from_pretrained(str(source), dtype=torch.float32)
    expected = _logits(_next_token_logits(reference), check)
    del reference
    traced = AutoModelForCausalLM.from_pretrained(
        str(source), attn_implementation="eager", dtype=torch.float32
    )
    axes = {0: "batch", 1: "sequence"}
    return OnnxPlan(
        traced=_next_token_logits(traced),
        trace_inputs=batch(_TRACE_TEXTS),
        check_inputs=check,
        expected=expected,
        dynamic_axes={"input_ids": axes, "attention_mask": axes, "logits": axes},
        write_files=lambda out: tokenizer.save_pretrained(str(out)),
        model_type=str(traced.config.model_type),
        compare_where="attention_mask",
    )


def _image_classifier_plan(source: Path) -> OnnxPlan:
    """An image classifier: ``pixel_values -> logits (batch, labels)``."""
    from PIL import Image

    from common.vision import MergedImageClassifier, load_image_processor

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
        shutil.copy2(source / _HEAD_META, out / _HEAD_META)

    check = batch(_CHECK_IMAGES, seed=1)
    return OnnxPlan(
        traced=model,
        trace_inputs=batch(_TRACE_IMAGES, seed=0),
        check_inputs=check,
        expected=_logits(model, check),
        dynamic_axes={"pixel_values": {0: "batch"}, "logits": {0: "batch"}},
        write_files=write_files,
        model_type=str(getattr(model.encoder.config, "model_type", "")),
    )


#: task -> the plan of its ONNX export.
ONNX_PLANS: dict[str, Callable[[Path], OnnxPlan]] = {
    TEXT_CLASSIFICATION.name: _text_classifier_plan,
    CAUSAL_LM.name: _causal_lm_plan,
    IMAGE_CLASSIFICATION.name: _image_classifier_plan,
}


def check_onnx(
    path: Path,
    inputs: Mapping[str, np.ndarray],
    expected: np.ndarray,
    tolerance: float,
    compare_where: str | None = None,
) -> OnnxCheck:
    """Run ``path`` with onnxruntime on ``inputs`` and compare with ``expected``.

    Parameters
    ----------
    path : Path
        The ONNX graph (its only output: the logits).
    inputs : Mapping[str, np.ndarray]
        The graph's inputs by name.
    expected : np.ndarray
        PyTorch's logits on ``inputs``.
    tolerance : float
        The largest difference allowed, relative to the largest logit when that is
        above one (a language model's logits are in the tens).
    compare_where : str or None
        An input whose zeros mark positions whose logits are not compared.

    Returns
    -------
    OnnxCheck
        The rows, the agreeing predictions and the largest absolute difference.

    Raises
    ------
    ExportError
        When onnxruntime cannot run the graph on ``inputs`` (a batch of another shape
        than the traced one), the shapes differ, a logit is not finite or the
        difference is larger than allowed.
    """
    import onnxruntime

    session = onnxruntime.InferenceSession(
        str(path), providers=["CPUExecutionProvider"]
    )
    try:
        (logits,) = session.run(None, dict(inputs))
    except Exception as error:  # onnxruntime raises its own pybind11 exception types
        raise ExportError(
            f"{path}: onnxruntime cannot run the graph on the check batch (another "
            f"shape than the traced one): {error}"
        ) from error
    if logits.shape != expected.shape:
        raise ExportError(
            f"{path}: ONNX logits have shape {logits.shape}, PyTorch's {expected.shape}"
        )
    rows = len(logits)
    if compare_where is not None:
        keep = inputs[compare_where].astype(bool)  # (batch, seq)
        logits, expected = logits[keep], expected[keep]  # (tokens, vocab)
    if not (np.isfinite(logits).all() and np.isfinite(expected).all()):
        raise ExportError(
            f"{path}: the ONNX or the PyTorch logits are not all finite; the "
            "merged model does not compute usable logits"
        )
    difference = float(np.abs(logits - expected).max())
    allowed = tolerance * max(1.0, float(np.abs(expected).max()))
    if difference > allowed:
        raise ExportError(
            f"{path}: ONNX logits differ from PyTorch by {difference:.2e} "
            f"(> {allowed:.1e})"
        )
    agreeing = logits.argmax(axis=-1) == expected.argmax(axis=-1)
    return OnnxCheck(rows, agreeing.size, int(agreeing.sum()), difference, allowed)


def require_export_extra() -> None:
    """Refuse ``--format onnx`` up front when the ``export`` extra is missing.

    Raises
    ------
    ExportError
        Naming the missing packages and the install command.
    """
    missing = [name for name in ("onnx", "onnxruntime") if find_spec(name) is None]
    if missing:
        raise ExportError(
            f"--format onnx needs {' and '.join(missing)}, which the default install "
            "leaves out: pip install 'fedgraft[export]' (from a checkout: "
            "pip install -e '.[export]'); --format hf needs neither"
        )


def _trace(plan: OnnxPlan, path: Path, what: str) -> None:
    """Trace ``plan`` into ``path``.

    The exporter warns as it goes: TracerWarnings wherever a Python value becomes a
    constant of the graph, notes on how an operator is lowered, its own deprecation.
    None of them says whether the graph is right; the check on a batch of another
    shape, which follows, does. So the warnings of this one call are logged at
    DEBUG (``--verbose``) and counted at INFO rather than printed as warnings.
    """
    import torch

    with warnings.catch_warnings(record=True) as notes:
        warnings.simplefilter("always")  # only inside this call: every note is logged
        try:
            torch.onnx.export(
                plan.traced,
                tuple(torch.from_numpy(v) for v in plan.trace_inputs.values()),
                str(path),
                input_names=list(plan.trace_inputs),
                output_names=["logits"],
                dynamic_axes=plan.dynamic_axes,
                dynamo=False,
            )
        except Exception as error:  # the exporter's errors have no common base
            path.unlink(missing_ok=True)
            raise ExportError(
                f"torch.onnx.export cannot trace this {what} model "
                f"({type(error).__name__}: {error}); --format hf exports it"
            ) from error
    for note in notes:
        log.debug("exporter: %s: %s", note.category.__name__, note.message)
    if notes:
        log.info(
            "traced; the exporter left %d notes (--verbose lists them); the check "
            "below says whether the graph is right",
            len(notes),
        )


def export_onnx(source: Path, out: Path, tolerance: float = 1e-4) -> Path:
    """Write ``model.onnx`` for the merged model in ``source`` with the files that
    read its inputs and outputs, then check it against PyTorch with onnxruntime and
    log the check's result (:class:`OnnxCheck`).

    Parameters
    ----------
    source : Path
        A run's ``merged/`` folder; its task file says which task it is.
    out : Path
        The folder to write.
    tolerance : float
        See :func:`check_onnx`.

    Raises
    ------
    ExportError
        Without the ``export`` extra, for a task without an ONNX export, a model the
        exporter cannot trace (naming its family), or a graph whose logits differ
        from PyTorch's.
    """
    require_export_extra()
    task = read_task(source)
    if task not in ONNX_PLANS:
        raise ExportError(
            f"{source / TASK_FILE}: task {task!r} has no ONNX export; "
            f"--format onnx exports {', '.join(ONNX_PLANS)} (--format hf copies any)"
        )
    plan = ONNX_PLANS[task](source)
    out.mkdir(parents=True, exist_ok=True)
    try:
        _trace(plan, out / ONNX_FILE, plan.model_type or task)
    except ExportError as error:
        raise ExportError(f"{source}: {error}") from error.__cause__
    plan.write_files(out)
    if (source / TASK_FILE).exists():
        shutil.copy2(source / TASK_FILE, out / TASK_FILE)
    try:
        check = check_onnx(
            out / ONNX_FILE,
            plan.check_inputs,
            plan.expected,
            tolerance,
            plan.compare_where,
        )
    except ExportError:
        # A graph that failed its check must not be left to look usable.
        (out / ONNX_FILE).unlink(missing_ok=True)
        raise
    log.info("%s", check.describe())
    return out


def export_run(run_or_merged: Path, fmt: str, out: Path) -> Path:
    """Export a run's merged model in ``fmt`` (``hf`` or ``onnx``) to ``out``.

    Raises
    ------
    ExportError
        For an unknown format, a folder without a merged model, or an ONNX export
        that fails (see :func:`export_onnx`).
    """
    if fmt not in EXPORT_FORMATS:
        raise ExportError(f"--format {fmt!r}: use one of {', '.join(EXPORT_FORMATS)}")
    source = merged_dir(run_or_merged)
    return export_hf(source, out) if fmt == "hf" else export_onnx(source, out)
