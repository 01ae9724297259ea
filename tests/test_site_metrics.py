"""What leaves a site beside its update, per mode, and the client-side DP clip.

Behind secure aggregation the coordinator is promised the sum alone, and under DP
the figures DP does not account for (train time, loss, samples, the exact row
count) stay at the site: each reply's metric keys are pinned here, mode by mode.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import pytest
from flwr.app import MessageType

from client import client_app
from common import keys
from common.codec import l2_norm
from common.wire import from_array_record
from tests.test_dp import federate

#: Three sites: the fewest a site masks for under its default floors.
SITES = 3
SECURE = {"secagg.enabled": True, "secagg.max-weight": 10.0}
ALL_FIGURES = {
    keys.ON_CUDA,
    keys.TRAIN_SECONDS,
    keys.TRAIN_LOSS,
    keys.NUM_EXAMPLES,
    keys.TRAIN_SAMPLES,
}
#: mode -> (run settings, the metric keys of every training reply)
MODES: dict[str, tuple[dict[str, Any], set[str]]] = {
    "plain": ({"dp.enabled": False}, ALL_FIGURES),
    "plain-client-dp": ({}, {keys.ON_CUDA, keys.NUM_EXAMPLES}),
    "plain-sample-dp": (
        {"dp.level": "sample", "aggregation": "median"},
        {keys.ON_CUDA, keys.NUM_EXAMPLES, keys.SAMPLE_EPSILON},
    ),
    "secure": ({**SECURE, "dp.enabled": False}, {keys.ON_CUDA}),
    "secure-client-dp": ({**SECURE, "dp.mode": "distributed"}, {keys.ON_CUDA}),
    "secure-sample-dp": ({**SECURE, "dp.level": "sample"}, {keys.ON_CUDA}),
}


def train_replies(grid: Any) -> list[Any]:
    return [
        reply
        for reply in grid.received
        if reply.metadata.message_type == MessageType.TRAIN
        and keys.METRICS_RECORD in reply.content.metric_records
    ]


@pytest.mark.parametrize("mode", sorted(MODES))
def test_each_mode_sends_exactly_its_metric_keys(
    mode: str, tiny_backbone: Path, small_jsonl: Path, tmp_path: Path
) -> None:
    # Prepare
    settings, expected = MODES[mode]

    # Execute
    grid, _ = federate(
        tiny_backbone, small_jsonl, tmp_path / mode, clients=SITES, **settings
    )

    # Assert: every site's reply carries exactly these keys; under DP every site
    # weighs 1, whatever its rows
    replies = train_replies(grid)
    assert len(replies) == SITES
    for reply in replies:
        metrics = reply.content.metric_records[keys.METRICS_RECORD]
        assert set(metrics) == expected
        if "dp" in mode and keys.NUM_EXAMPLES in metrics:
            assert metrics[keys.NUM_EXAMPLES] == 1


@pytest.mark.parametrize("secure", [False, True], ids=["plain", "secure"])
def test_every_delta_a_site_sends_under_client_dp_is_clipped_to_c(
    secure: bool,
    tiny_backbone: Path,
    small_jsonl: Path,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    # Prepare: a clip norm far below what one round at this learning rate moves;
    # behind secure aggregation, record the vector each site masks
    clip = 1e-3
    masked: list[np.ndarray] = []
    original = client_app.secagg.masked_update

    def recording(*args: Any, **kwargs: Any) -> Any:
        masked.append(np.array(args[3], np.float64))
        return original(*args, **kwargs)

    monkeypatch.setattr(client_app.secagg, "masked_update", recording)
    settings = {"dp.clip-norm": clip, "train.lr": 0.5, "secagg.clip-norm": clip}

    # Execute
    grid, _ = federate(
        tiny_backbone,
        small_jsonl,
        tmp_path / "clip",
        clients=SITES,
        **settings,
        **(SECURE | {"dp.mode": "distributed"} if secure else {}),
    )

    # Assert: each delta's norm is within C (and was not already)
    if secure:
        norms = [float(np.linalg.norm(vector)) for vector in masked]
    else:
        norms = [
            l2_norm(from_array_record(reply.content.array_records[keys.ADAPTER_RECORD]))
            for reply in train_replies(grid)
        ]
    assert len(norms) == SITES
    assert all(norm <= clip for norm in norms)
    assert all(norm > 0.5 * clip for norm in norms)
