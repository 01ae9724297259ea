"""Bit-identical behaviour: small seeded runs give the pinned adapters and metrics.

The records in ``tests/golden/runs.json`` were made by ``tests/golden_runs.py``; a
refactor must reproduce them exactly. A change that alters results on purpose
re-records them (``.venv/bin/python -m tests.golden_runs --record``) and says why.
"""

from __future__ import annotations

import json

import pytest

from tests.golden_runs import GOLDEN_FILE, GOLDEN_RUNS, GoldenRun, record_of


@pytest.mark.parametrize("run", GOLDEN_RUNS, ids=lambda run: run.name)
def test_a_seeded_run_reproduces_its_pinned_adapter_and_metrics(
    run: GoldenRun,
) -> None:
    # Prepare
    pinned = json.loads(GOLDEN_FILE.read_text())[run.name]

    # Execute
    record = record_of(run)

    # Assert
    assert record["metrics"] == pinned["metrics"]
    assert record["adapter_sha256"] == pinned["adapter_sha256"]
