"""The coordinator's round loop against the real ClientApp, in one process.

``InProcessGrid`` (conftest) replaces Flower's transport so that every message can be
inspected and chosen nodes can misbehave; the Flower engines themselves are exercised
in test_simulation.py and test_deployment.py.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path

import numpy as np
import pytest
from flwr.app import Array, ArrayRecord, Message

from client.client_app import app as client_app
from common import keys
from common.config import RunConfig
from common.tasks.text_classification.model import HEAD_PREFIX
from server.server_app import coordinate
from tests.conftest import InProcessGrid, build_tiny_backbone

NODES = (101, 202)


def make_config(
    backbone: Path, data: Path, output: Path, **overrides: object
) -> RunConfig:
    return RunConfig.from_flat(
        {
            "model.name": str(backbone),
            "data.path": str(data),
            "data.partition": "column:domain",
            "sim.num-clients": 2,
            "num-server-rounds": 2,
            "train.batch-size": 4,
            "train.lr": 0.01,
            "data.holdout-fraction": 0.25,
            "output.dir": str(output),
            **overrides,
        }
    )


def node_configs(
    cache: Path, **extra: dict[str, object]
) -> dict[int, dict[str, object]]:
    return {
        node: {
            "partition-id": index,
            "num-partitions": len(NODES),
            "cache-dir": str(cache / str(node)),
            **extra.get(str(node), {}),
        }
        for index, node in enumerate(NODES)
    }


def metrics_of(output: Path) -> list[dict[str, object]]:
    return [
        json.loads(line) for line in (output / "metrics.jsonl").read_text().splitlines()
    ]


def test_a_run_writes_metrics_summary_adapter_and_merged_model(
    tiny_backbone: Path, small_jsonl: Path, tmp_path: Path
) -> None:
    # Prepare
    output = tmp_path / "out"
    grid = InProcessGrid(client_app, node_configs(tmp_path))

    # Execute
    coordinate(grid, make_config(tiny_backbone, small_jsonl, output))  # type: ignore[arg-type]

    # Assert
    rows = metrics_of(output)
    assert [row["round"] for row in rows] == [0, 1, 2]
    for row in rows[1:]:
        assert row["clients"] == 2 and row["bytes_up"] > 0 and row["bytes_down"] > 0
        assert sorted(row["participants"]) == ["101", "202"]
        for key in ("train_loss", "eval_loss", "eval_accuracy", "seconds"):
            assert isinstance(row[key], float)
    summary = json.loads((output / "summary.json").read_text())
    assert (
        summary["backbone"]["fingerprint"]
        and summary["config"]["num-server-rounds"] == 2
    )
    assert summary["totals"]["bytes_up"] == sum(row["bytes_up"] for row in rows)
    assert (output / "adapter" / "adapter_config.json").exists()
    assert (output / "merged" / "config.json").exists() and (
        output / "merged" / "1_Pooling"
    ).is_dir()


def test_exported_adapter_loads_with_peft_and_matches_the_merged_model(
    tiny_backbone: Path, small_jsonl: Path, tmp_path: Path
) -> None:
    # Prepare
    import torch
    from peft import PeftModel
    from safetensors.torch import load_file
    from transformers import AutoModel, AutoTokenizer

    from common.tasks.text_classification.inference import MergedClassifier
    from common.tasks.text_classification.model import TextClassifier

    output = tmp_path / "out"
    coordinate(
        InProcessGrid(client_app, node_configs(tmp_path)),
        make_config(tiny_backbone, small_jsonl, output),
    )  # type: ignore[arg-type]

    # Execute
    with_adapter = PeftModel.from_pretrained(
        AutoModel.from_pretrained(str(tiny_backbone)), str(output / "adapter")
    )
    head_meta = json.loads((output / "adapter" / "fedgraft_head.json").read_text())
    reloaded = TextClassifier(
        with_adapter, head_meta["pooling"], len(head_meta["labels"])
    )
    reloaded.head.load_state_dict(
        load_file(str(output / "adapter" / "head.safetensors"))
    )
    reloaded.eval()
    merged = MergedClassifier.load(output / "merged")

    # Assert
    batch = AutoTokenizer.from_pretrained(str(tiny_backbone))(
        ["please send my account"], return_tensors="pt"
    )
    with torch.no_grad():
        expected = reloaded(batch["input_ids"], batch["attention_mask"])
        actual = merged.model(batch["input_ids"], batch["attention_mask"])
    torch.testing.assert_close(actual, expected, rtol=1e-4, atol=1e-5)
    assert merged.labels == tuple(head_meta["labels"])
    assert merged.predict(["please send my account"])[0][0] in merged.labels


def test_clients_send_only_the_adapter_delta_and_counts(
    tiny_backbone: Path, small_jsonl: Path, tmp_path: Path
) -> None:
    # Prepare
    grid = InProcessGrid(client_app, node_configs(tmp_path))

    # Execute
    coordinate(grid, make_config(tiny_backbone, small_jsonl, tmp_path / "out"))  # type: ignore[arg-type]

    # Assert: only adapter arrays and numeric metrics cross the wire, never text or
    # base weights
    trained = [
        r for r in grid.received if keys.ADAPTER_RECORD in r.content.array_records
    ]
    assert len(trained) == 4
    for reply in trained:
        content = reply.content
        assert set(content.array_records) == {keys.ADAPTER_RECORD}
        assert set(content.metric_records) == {keys.METRICS_RECORD}
        assert not content.config_records
        names = set(content.array_records[keys.ADAPTER_RECORD])
        assert all("lora_" in name or name.startswith(HEAD_PREFIX) for name in names)
        metrics = content.metric_records[keys.METRICS_RECORD]
        assert set(metrics) == {
            keys.NUM_EXAMPLES,
            keys.TRAIN_LOSS,
            keys.TRAIN_SAMPLES,
            keys.TRAIN_SECONDS,
            keys.ON_CUDA,
        }
        assert all(isinstance(value, int | float) for value in metrics.values())


def test_a_site_without_the_backbone_receives_it_once(
    tiny_backbone: Path, small_jsonl: Path, tmp_path: Path
) -> None:
    # Prepare: the client caches start empty and a directory reference means nothing
    # at a site
    output = tmp_path / "out"
    grid = InProcessGrid(client_app, node_configs(tmp_path))

    # Execute
    coordinate(grid, make_config(tiny_backbone, small_jsonl, output))  # type: ignore[arg-type]

    # Assert
    rows = metrics_of(output)
    assert rows[1]["bytes_backbone"] > 0 and rows[2]["bytes_backbone"] == 0
    fingerprint = json.loads((output / "summary.json").read_text())["backbone"][
        "fingerprint"
    ]
    for node in NODES:
        assert (
            tmp_path / str(node) / "backbones" / fingerprint / "model.safetensors"
        ).exists()


def test_distribute_never_leaves_sites_without_backbone_out_and_keeps_running(
    tiny_backbone: Path,
    small_jsonl: Path,
    tmp_path: Path,
    caplog: pytest.LogCaptureFixture,
) -> None:
    # Prepare
    output = tmp_path / "out"
    grid = InProcessGrid(client_app, node_configs(tmp_path))

    # Execute
    with caplog.at_level(logging.WARNING):
        coordinate(
            grid,
            make_config(
                tiny_backbone, small_jsonl, output, **{"model.distribute": "never"}
            ),
        )  # type: ignore[arg-type]

    # Assert
    rows = metrics_of(output)
    assert [row["clients"] for row in rows[1:]] == [0, 0]
    assert [row["failed"] for row in rows[1:]] == [2, 2]
    assert (
        "model.distribute = never" in caplog.text and "round 1 skipped" in caplog.text
    )


def test_a_site_whose_backbone_differs_refuses_with_the_fingerprints(
    tiny_backbone: Path,
    small_jsonl: Path,
    tmp_path: Path,
    caplog: pytest.LogCaptureFixture,
) -> None:
    # Prepare: node 101 holds another model under its backbone-path
    other = build_tiny_backbone(tmp_path / "other-backbone", seed=7)
    grid = InProcessGrid(
        client_app, node_configs(tmp_path, **{"101": {"backbone-path": str(other)}})
    )

    # Execute
    with caplog.at_level(logging.WARNING):
        coordinate(
            grid,
            make_config(
                tiny_backbone, small_jsonl, tmp_path / "out", **{"num-server-rounds": 1}
            ),
        )  # type: ignore[arg-type]

    # Assert
    rows = metrics_of(tmp_path / "out")
    assert rows[1]["clients"] == 1 and rows[1]["failed"] == 1
    assert "node 101 failed" in caplog.text and "fingerprint" in caplog.text


def _replace_adapter(node: int, bad_node: int, change: callable) -> callable:  # type: ignore[valid-type]
    def tamper(sender: int, reply: Message) -> Message:
        if (
            sender != bad_node
            or reply.has_error()
            or keys.ADAPTER_RECORD not in reply.content.array_records
        ):
            return reply
        record = reply.content.array_records[keys.ADAPTER_RECORD]
        arrays = {name: change(array.numpy()) for name, array in record.items()}
        reply.content.array_records[keys.ADAPTER_RECORD] = ArrayRecord(
            {k: Array(v) for k, v in arrays.items()}
        )
        return reply

    return tamper


@pytest.mark.parametrize(
    ("case", "change", "reason"),
    [
        ("nan", lambda a: np.full_like(a, np.nan), "NaN or Inf"),
        ("inf", lambda a: np.full_like(a, np.inf), "NaN or Inf"),
        ("shape", lambda a: np.zeros((*a.shape, 2), a.dtype), "shape"),
        ("dtype", lambda a: a.astype(np.float64), "dtype"),
    ],
)
def test_a_bad_update_is_rejected_and_the_global_adapter_stays_finite(
    case: str,
    change: callable,
    reason: str,
    tiny_backbone: Path,
    small_jsonl: Path,
    tmp_path: Path,  # type: ignore[valid-type]
    caplog: pytest.LogCaptureFixture,
) -> None:
    # Prepare
    output = tmp_path / "out"
    grid = InProcessGrid(
        client_app, node_configs(tmp_path), tamper=_replace_adapter(0, 202, change)
    )

    # Execute
    with caplog.at_level(logging.WARNING):
        coordinate(
            grid,
            make_config(tiny_backbone, small_jsonl, output, **{"num-server-rounds": 1}),
        )  # type: ignore[arg-type]

    # Assert
    row = metrics_of(output)[1]
    assert row["rejected"] == 1 and row["clients"] == 1, case
    assert np.isfinite(row["eval_loss"])
    assert "node 202: update rejected" in caplog.text and reason in caplog.text


def test_a_client_that_never_replies_is_left_out(
    tiny_backbone: Path, small_jsonl: Path, tmp_path: Path
) -> None:
    # Prepare: node 202's replies are lost (a timeout at the grid)
    grid = InProcessGrid(
        client_app,
        node_configs(tmp_path),
        tamper=lambda node, reply: None if node == 202 else reply,
    )

    # Execute
    coordinate(
        grid,
        make_config(
            tiny_backbone, small_jsonl, tmp_path / "out", **{"num-server-rounds": 1}
        ),
    )  # type: ignore[arg-type]

    # Assert
    row = metrics_of(tmp_path / "out")[1]
    assert (row["clients"], row["failed"]) == (1, 1)


def test_too_few_clients_skip_the_round_without_changing_the_model(
    tiny_backbone: Path, small_jsonl: Path, tmp_path: Path
) -> None:
    # Prepare: one of two clients crashes on a missing data file; two are required
    configs = node_configs(
        tmp_path, **{"202": {"data-path": str(tmp_path / "missing.jsonl")}}
    )
    grid = InProcessGrid(client_app, configs)

    # Execute
    coordinate(
        grid,
        make_config(
            tiny_backbone,
            small_jsonl,
            tmp_path / "out",
            **{"train.min-clients": 2, "num-server-rounds": 1},
        ),
    )  # type: ignore[arg-type]

    # Assert
    rows = metrics_of(tmp_path / "out")
    assert rows[1]["clients"] == 1 and rows[1]["failed"] == 1
    assert rows[1]["eval_loss"] == rows[0]["eval_loss"]


def test_a_label_outside_the_map_fails_the_client_naming_file_and_line(
    tiny_backbone: Path,
    small_jsonl: Path,
    tmp_path: Path,
    caplog: pytest.LogCaptureFixture,
) -> None:
    # Prepare: node 202's own file holds a label the coordinator's map lacks, on line 2
    site = tmp_path / "site.jsonl"
    site.write_text(
        '{"text": "please send", "label": "send"}\n'
        '{"text": "what now", "label": "mystery"}\n'
    )
    grid = InProcessGrid(
        client_app, node_configs(tmp_path, **{"202": {"data-path": str(site)}})
    )

    # Execute
    with caplog.at_level(logging.WARNING):
        coordinate(
            grid,
            make_config(
                tiny_backbone, small_jsonl, tmp_path / "out", **{"num-server-rounds": 1}
            ),
        )  # type: ignore[arg-type]

    # Assert
    assert "labels the run does not declare: mystery" in caplog.text
    assert f"first at {site}:2" in caplog.text


def test_virtual_clients_sharing_a_process_do_not_leak_state(
    tiny_backbone: Path, small_jsonl: Path, tmp_path: Path
) -> None:
    # Prepare: the same round trained by node 202 alone, and after node 101 in the
    # same process
    config = make_config(
        tiny_backbone, small_jsonl, tmp_path / "out", **{"num-server-rounds": 1}
    )
    alone = InProcessGrid(client_app, {202: node_configs(tmp_path)[202]})
    after_other = InProcessGrid(client_app, node_configs(tmp_path))

    # Execute
    coordinate(alone, config)  # type: ignore[arg-type]
    coordinate(
        after_other, config.with_overrides(**{"output.dir": str(tmp_path / "out2")})
    )  # type: ignore[arg-type]

    # Assert
    def delta_of(grid: InProcessGrid, node: int) -> dict[str, np.ndarray]:
        reply = [
            r
            for r in grid.received
            if r.metadata.src_node_id == node
            and keys.ADAPTER_RECORD in r.content.array_records
        ][-1]
        return {
            k: v.numpy()
            for k, v in reply.content.array_records[keys.ADAPTER_RECORD].items()
        }

    first, second = delta_of(alone, 202), delta_of(after_other, 202)
    for name in first:
        np.testing.assert_array_equal(first[name], second[name])


def test_fedavg_per_label_clients_send_label_counts_only_when_asked(
    tiny_backbone: Path, small_jsonl: Path, tmp_path: Path
) -> None:
    # Prepare
    config = make_config(
        tiny_backbone, small_jsonl, tmp_path / "out", aggregation="fedavg-per-label"
    )
    grid = InProcessGrid(client_app, node_configs(tmp_path))

    # Execute
    coordinate(grid, config)  # type: ignore[arg-type]

    # Assert
    trained = [
        r for r in grid.received if keys.ADAPTER_RECORD in r.content.array_records
    ]
    assert trained and all(
        keys.LABEL_COUNTS_RECORD in r.content.array_records for r in trained
    )
    assert [row["clients"] for row in metrics_of(tmp_path / "out")[1:]] == [2, 2]


def test_an_update_above_the_norm_bound_is_rejected_naming_the_node(
    tiny_backbone: Path,
    small_jsonl: Path,
    tmp_path: Path,
    caplog: pytest.LogCaptureFixture,
) -> None:
    # Prepare: node 202 inflates its delta a million times
    output = tmp_path / "out"
    tamper = _replace_adapter(0, 202, lambda a: a * 1e6)
    grid = InProcessGrid(client_app, node_configs(tmp_path), tamper=tamper)
    config = make_config(
        tiny_backbone,
        small_jsonl,
        output,
        **{"num-server-rounds": 1, "train.max-update-norm": 100.0},
    )

    # Execute
    with caplog.at_level(logging.WARNING):
        coordinate(grid, config)  # type: ignore[arg-type]

    # Assert
    row = metrics_of(output)[1]
    assert (row["rejected"], row["clients"]) == (1, 1)
    assert "node 202: update rejected: update norm" in caplog.text
    assert "above train.max-update-norm = 100" in caplog.text


def test_the_live_progress_shows_rounds_on_a_terminal_and_nothing_otherwise(
    tmp_path: Path,
) -> None:
    # Prepare
    import io

    from rich.console import Console

    from common.outputs import RunOutputs
    from common.reporting import RoundRecorder

    row = {"round": 1, "clients": 2, "sampled": 2, "eval_loss": 0.5}
    row |= {"eval_accuracy": 0.75, "seconds": 1.0, "train_loss": 0.4}
    terminal, pipe = io.StringIO(), io.StringIO()

    # Execute
    for stream, is_terminal in ((terminal, True), (pipe, False)):
        console = Console(file=stream, force_terminal=is_terminal, width=120)
        recorder = RoundRecorder(
            RunOutputs(tmp_path / str(is_terminal)), 3, console=console
        )
        recorder.record(row)
        recorder.close()

    # Assert
    assert "round 1/3 clients 2/2 eval_accuracy 0.7500" in terminal.getvalue()
    assert pipe.getvalue() == ""


def test_an_update_with_wrong_tensor_names_is_rejected(
    tiny_backbone: Path,
    small_jsonl: Path,
    tmp_path: Path,
    caplog: pytest.LogCaptureFixture,
) -> None:
    # Prepare: node 101 renames one tensor of its reply
    def rename(sender: int, reply: Message) -> Message:
        records = reply.content.array_records
        if sender == 101 and not reply.has_error() and keys.ADAPTER_RECORD in records:
            arrays = {k: v.numpy() for k, v in records[keys.ADAPTER_RECORD].items()}
            arrays["head.surprise"] = arrays.pop("head.bias")
            records[keys.ADAPTER_RECORD] = ArrayRecord(
                {k: Array(v) for k, v in arrays.items()}
            )
        return reply

    grid = InProcessGrid(client_app, node_configs(tmp_path), tamper=rename)

    # Execute
    with caplog.at_level(logging.WARNING):
        coordinate(
            grid,  # type: ignore[arg-type]
            make_config(
                tiny_backbone, small_jsonl, tmp_path / "out", **{"num-server-rounds": 1}
            ),
        )

    # Assert
    row = metrics_of(tmp_path / "out")[1]
    assert (row["rejected"], row["clients"]) == (1, 1)
    assert "node 101: update rejected: wrong tensor names" in caplog.text
