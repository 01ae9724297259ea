"""``fedgraft export``: a run's merged model as a Hugging Face folder or as ONNX.

Every task's ONNX export follows one path: its plan
(:class:`~common.tasks.export.OnnxPlan`, built by the task) names the
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
from collections.abc import Mapping
from dataclasses import dataclass
from importlib.util import find_spec
from pathlib import Path

import numpy as np

from common.outputs import MERGED_DIR
from common.tasks import TASK_FILE, TASKS, read_task
from common.tasks.export import ExportError, OnnxPlan

log = logging.getLogger(__name__)

ONNX_FILE = "model.onnx"
EXPORT_FORMATS = ("hf", "onnx")
_HEAD_META = "fedgraft_head.json"
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
    if task not in TASKS:
        raise ExportError(
            f"{source / TASK_FILE}: task {task!r} has no ONNX export; "
            f"--format onnx exports {', '.join(TASKS)} (--format hf copies any)"
        )
    plan = TASKS[task].onnx_plan(source)
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
