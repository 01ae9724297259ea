"""What every task's workbench does at the end of a run: the backbone's facts for
``summary.json``, and finishing the run (export, summary, per-round table)."""

from __future__ import annotations

import time
from collections.abc import Mapping
from typing import TYPE_CHECKING, Any

from torch import nn

from common.reporting import (
    RoundRecorder,
    best_round,
    print_table,
    summary_table,
    totals,
)

if TYPE_CHECKING:
    from common.codec import AdapterState
    from common.outputs import RunOutputs
    from common.tasks.base import RunBench


def trainable_parameter_count(model: nn.Module) -> int:
    """Number of trainable scalars (LoRA and head)."""
    return sum(p.numel() for p in model.parameters() if p.requires_grad)


def backbone_facts(bench: Any, backbone: nn.Module) -> dict[str, object]:
    """What ``summary.json`` says of a run's backbone, for every task's bench: its
    name, folder, fingerprint and pooling, the frozen parameters of ``backbone`` (all
    but the LoRA factors) and the trainable ones of ``bench.model``."""
    frozen = sum(p.numel() for n, p in backbone.named_parameters() if "lora_" not in n)
    return {
        "name": bench.config.model.name,
        "dir": str(bench.backbone_dir),
        "fingerprint": bench.fingerprint,
        "pooling": bench.pooling,
        "parameters": frozen,
        "float32_bytes": frozen * 4,
        "trainable_parameters": trainable_parameter_count(bench.model),
    }


def finish_run(
    bench: RunBench,
    kind: str,
    outputs: RunOutputs,
    recorder: RoundRecorder,
    state: AdapterState,
    started: float,
    extra: Mapping[str, Any] | None = None,
) -> None:
    """Export ``state`` with ``bench``, write ``summary.json`` and print the
    per-round table (any task's workbench).

    Parameters
    ----------
    kind : str
        ``federated`` or ``centralized``.
    started : float
        ``time.perf_counter()`` at the start of the run.
    extra : Mapping, optional
        More top-level entries for ``summary.json`` (how the run ended, privacy).
    """
    recorder.close()
    bench.export(outputs, state)
    outputs.write_summary(
        {
            "kind": kind,
            "config": bench.config.as_dict(),
            "backbone": bench.backbone_facts(),
            "labels": list(bench.labels),
            "final": recorder.rows[-1],
            "best": best_round(recorder.rows),
            "totals": totals(recorder.rows),
            "wall_seconds": round(time.perf_counter() - started, 2),
        }
        | dict(extra or {})
    )
    print_table(summary_table(f"{kind} run: {outputs.directory}", recorder.rows))
