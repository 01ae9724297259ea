"""What a site keeps between rounds survives a resume (client.site_state).

FedSA's B factors, top-k's residual and the DP-SGD accountant live in Flower's
per-run context, which a resumed run starts empty; the site mirrors them on its disk
under the coordinator's run identity.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import pytest
from flwr.app import ArrayRecord, ConfigRecord, Context, RecordDict

from client.adapters import LOCAL_FACTORS_RECORD, TOPK_RESIDUAL_RECORD
from client.site_state import (
    DP_SGD_RECORD,
    SiteState,
    SiteStateError,
    site_folder,
)
from common.wire import from_array_record, to_array_record
from server.checkpoint import load_checkpoint
from tests.test_dp import federate

IDENTITY = "0123456789abcdef"


def context() -> Context:
    return Context(
        run_id=1, node_id=1, node_config={}, state=RecordDict(), run_config={}
    )


def factors(value: float) -> ArrayRecord:
    return to_array_record({"b": np.full((2, 3), value, np.float32)})


def history(steps: int) -> ConfigRecord:
    return ConfigRecord({"history": f"[[1.1, 0.25, {steps}]]"})


def kept_after(rounds: dict[int, float], restore_before: int, tmp_path: Path) -> Any:
    """Save FedSA factors of value ``v`` after each round of ``rounds`` (and an
    accountant with ``round`` steps), then restore into a fresh context before
    ``restore_before``."""
    state = SiteState(tmp_path, IDENTITY)
    for server_round, value in rounds.items():
        saving = context()
        saving.state[LOCAL_FACTORS_RECORD] = factors(value)
        saving.state[DP_SGD_RECORD] = history(server_round)
        state.save(saving, server_round)
    restored = context()
    state.restore(restored, restore_before)
    return restored.state


# -- the store -----------------------------------------------------------------------


def test_a_redone_round_starts_from_the_factors_kept_before_it(
    tmp_path: Path,
) -> None:
    # Execute: rounds 1, 2 and 3 saved; the coordinator resumes at round 3 again
    state = kept_after({1: 1.0, 2: 2.0, 3: 3.0}, 3, tmp_path)

    # Assert: B from round 2, the accountant from round 3 (spent privacy stays spent)
    kept = from_array_record(state.array_records[LOCAL_FACTORS_RECORD])
    np.testing.assert_array_equal(kept["b"], np.full((2, 3), 2.0, np.float32))
    assert state.config_records[DP_SGD_RECORD]["history"] == "[[1.1, 0.25, 3]]"


def test_only_the_last_two_copies_of_a_record_are_kept(tmp_path: Path) -> None:
    kept_after({1: 1.0, 2: 2.0, 3: 3.0, 4: 4.0}, 5, tmp_path)
    names = sorted(p.name for p in (tmp_path / IDENTITY).iterdir())
    assert names == [
        f"{DP_SGD_RECORD}.r3.json",
        f"{DP_SGD_RECORD}.r4.json",
        f"{LOCAL_FACTORS_RECORD}.r3.safetensors",
        f"{LOCAL_FACTORS_RECORD}.r4.safetensors",
    ]


def test_nothing_is_restored_before_the_first_round(tmp_path: Path) -> None:
    state = kept_after({1: 1.0}, 1, tmp_path)
    assert LOCAL_FACTORS_RECORD not in state.array_records
    assert TOPK_RESIDUAL_RECORD not in state.array_records


@pytest.mark.parametrize("identity", ["../escape", "ABCDEF0123456789", "12ab", ""])
def test_a_run_identity_that_is_not_hex_is_refused(
    identity: str, tmp_path: Path
) -> None:
    with pytest.raises(SiteStateError, match="run identity"):
        SiteState(tmp_path, identity)


def test_a_damaged_copy_is_refused_naming_the_file(tmp_path: Path) -> None:
    kept_after({1: 1.0}, 2, tmp_path)
    path = tmp_path / IDENTITY / f"{LOCAL_FACTORS_RECORD}.r1.safetensors"
    path.write_bytes(path.read_bytes()[:20])
    with pytest.raises(SiteStateError, match=path.name):
        SiteState(tmp_path, IDENTITY).restore(context(), 2)


def test_virtual_sites_sharing_a_folder_keep_apart_and_state_dir_wins(
    tmp_path: Path,
) -> None:
    first = site_folder({"partition-id": 0, "num-partitions": 2}, tmp_path)
    second = site_folder({"partition-id": 1, "num-partitions": 2}, tmp_path)
    chosen = site_folder({"state-dir": str(tmp_path / "mine")}, tmp_path / "cache")
    assert first != second and first.parent == tmp_path / "site-state"
    assert chosen.parent == tmp_path / "mine"


# -- resumed runs against uninterrupted ones -----------------------------------------

RESUMED_RUNS = {
    "fedsa": {"aggregation": "fedsa", "dp.enabled": False},
    "topk": {"codec": "topk", "codec.topk-fraction": 0.2, "dp.enabled": False},
    "dp-sgd": {"dp.level": "sample", "aggregation": "median"},
}


@pytest.mark.parametrize("kind", sorted(RESUMED_RUNS))
def test_a_resumed_run_keeps_the_sites_state_like_an_uninterrupted_one(
    kind: str, tiny_backbone: Path, small_jsonl: Path, tmp_path: Path
) -> None:
    # Prepare: one uninterrupted run of three rounds
    settings = RESUMED_RUNS[kind]
    _, whole = federate(
        tiny_backbone, small_jsonl, tmp_path / "whole", clients=2,
        **{**settings, "num-server-rounds": 3},
    )  # fmt: skip

    # Execute: two rounds, then a resume (a fresh grid: empty Flower contexts)
    output = tmp_path / "resumed"
    federate(
        tiny_backbone, small_jsonl, output, clients=2,
        **{**settings, "num-server-rounds": 2},
    )  # fmt: skip
    _, resumed = federate(
        tiny_backbone, small_jsonl, output, clients=2,
        **{**settings, "num-server-rounds": 3, "resume": True},
    )  # fmt: skip

    # Assert: the third round is the uninterrupted run's (DP-SGD: its noise is
    # secret, so the account, not the adapter)
    if kind == "dp-sgd":
        epsilons = [row["sample_epsilon_max"] for row in (whole[3], resumed[3])]
        assert epsilons[0] == pytest.approx(epsilons[1], rel=1e-12)
        assert resumed[3]["sample_epsilon_max"] > resumed[2]["sample_epsilon_max"]
        return
    final = load_checkpoint(output).state
    expected = load_checkpoint(tmp_path / "whole").state
    for name in expected:
        np.testing.assert_array_equal(final[name], expected[name], err_msg=name)
    strip = {"seconds", "participants"}
    assert {k: v for k, v in resumed[3].items() if k not in strip} == {
        k: v for k, v in whole[3].items() if k not in strip
    }
