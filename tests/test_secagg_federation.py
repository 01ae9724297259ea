"""Secure aggregation through the real strategy and ClientApp, in one process."""

from __future__ import annotations

import json
import logging
from pathlib import Path

import numpy as np
import pytest
from flwr.app import Array, ArrayRecord, ConfigRecord, Message, MessageType
from safetensors.numpy import load_file

from client.client_app import app as client_app
from common import keys
from common.config import RunConfig
from common.secagg.encoding import FixedPoint
from server.server_app import coordinate
from tests.conftest import InProcessGrid, write_jsonl

NODES = (11, 22, 33, 44, 55, 66)


@pytest.fixture()
def six_site_data(tmp_path: Path) -> Path:
    rows = [
        {"text": f"{word} number {i} please", "label": label}
        for i in range(8)
        for word, label in (
            ("send money", "send"),
            ("book flight", "flight"),
            ("good film", "good"),
        )
    ]
    return write_jsonl(tmp_path / "six.jsonl", rows)


def run(
    backbone: Path,
    data: Path,
    output: Path,
    nodes: tuple[int, ...],
    tamper=None,
    **overrides: object,
):  # type: ignore[no-untyped-def]
    config = RunConfig.from_flat(
        {
            "model.name": str(backbone),
            "data.path": str(data),
            "data.partition": "iid",
            "sim.num-clients": len(nodes),
            "num-server-rounds": 1,
            "train.batch-size": 4,
            "train.lr": 0.01,
            "lora.dropout": 0.0,
            "output.dir": str(output),
            "secagg.enabled": True,
            # Four rows per client: a small max-weight keeps the fixed-point step fine.
            "secagg.max-weight": 10.0,
            **overrides,
        }
    )
    node_configs = {
        node: {
            "partition-id": i,
            "num-partitions": len(nodes),
            "cache-dir": str(output.parent / "cache"),
        }
        for i, node in enumerate(nodes)
    }
    grid = InProcessGrid(client_app, node_configs, tamper=tamper)
    coordinate(grid, config)  # type: ignore[arg-type]
    rows = [
        json.loads(line) for line in (output / "metrics.jsonl").read_text().splitlines()
    ]
    return grid, rows


def final_adapter(output: Path) -> dict[str, np.ndarray]:
    state = load_file(str(output / "adapter" / "adapter_model.safetensors"))
    state.update(
        {
            f"head.{k}": v
            for k, v in load_file(str(output / "adapter" / "head.safetensors")).items()
        }
    )
    return state


def drop(node: int, message_type: str):  # type: ignore[no-untyped-def]
    """A tamper that loses ``node``'s replies to ``message_type`` (a dropout)."""
    return lambda sender, reply: (
        None
        if sender == node and reply.metadata.message_type == message_type
        else reply
    )


def test_secure_and_plain_aggregates_agree_within_the_quantisation_error(
    tiny_backbone: Path, six_site_data: Path, tmp_path: Path
) -> None:
    # Execute
    _, secure_rows = run(tiny_backbone, six_site_data, tmp_path / "secure", NODES)
    _, plain_rows = run(
        tiny_backbone,
        six_site_data,
        tmp_path / "plain",
        NODES,
        **{"secagg.enabled": False},
    )

    # Assert: each client rounds w_i * x to half a step, so the mean moves by at most
    # n * step / 2 / sum(w_i) per coordinate (plus float32 rounding of the adapter)
    assert secure_rows[1]["clients"] == plain_rows[1]["clients"] == 6
    step = 1 / FixedPoint.for_clients(6, clip_norm=10.0, max_weight=10.0).scale
    total_weight = 24 / 10.0
    bound = 6 * step / 2 / total_weight
    secure, plain = (
        final_adapter(tmp_path / "secure"),
        final_adapter(tmp_path / "plain"),
    )
    for name in plain:
        np.testing.assert_allclose(
            secure[name], plain[name], rtol=1e-6, atol=bound, err_msg=name
        )


def test_clients_send_no_example_count_and_a_uint32_upload_within_5_percent_of_float32(
    tiny_backbone: Path, six_site_data: Path, tmp_path: Path
) -> None:
    # Execute
    secure_grid, _ = run(tiny_backbone, six_site_data, tmp_path / "secure", NODES)
    plain_grid, _ = run(
        tiny_backbone,
        six_site_data,
        tmp_path / "plain",
        NODES,
        **{"secagg.enabled": False},
    )

    # Assert
    uploads = [
        r for r in secure_grid.received if keys.MASKED_RECORD in r.content.array_records
    ]
    assert len(uploads) == 6
    for reply in uploads:
        assert keys.ADAPTER_RECORD not in reply.content.array_records
        assert (
            keys.NUM_EXAMPLES not in reply.content.metric_records[keys.METRICS_RECORD]
        )
        assert (
            keys.TRAIN_SAMPLES not in reply.content.metric_records[keys.METRICS_RECORD]
        )
        # training time follows the row count too
        assert (
            keys.TRAIN_SECONDS not in reply.content.metric_records[keys.METRICS_RECORD]
        )
        vector = next(
            iter(reply.content.array_records[keys.MASKED_RECORD].values())
        ).numpy()
        assert vector.dtype == np.uint32
    plain_upload = next(
        r for r in plain_grid.received if keys.ADAPTER_RECORD in r.content.array_records
    )
    float_bytes = sum(
        a.numpy().nbytes
        for a in plain_upload.content.array_records[keys.ADAPTER_RECORD].values()
    )
    masked_bytes = (
        next(iter(uploads[0].content.array_records[keys.MASKED_RECORD].values()))
        .numpy()
        .nbytes
    )
    assert masked_bytes <= 1.05 * float_bytes


@pytest.mark.parametrize(
    ("overrides", "in_the_clear"),
    [
        ({"secagg.enabled": False}, True),
        ({}, False),  # secure aggregation
        ({"secagg.enabled": False, "dp.enabled": True, "dp.level": "sample"}, False),
    ],
    ids=["plain", "secure", "dp-sgd"],
)
def test_figures_from_a_sites_rows_go_up_only_in_plain_rounds_without_dp(
    tiny_backbone: Path,
    six_site_data: Path,
    tmp_path: Path,
    overrides: dict[str, object],
    in_the_clear: bool,
) -> None:
    # Execute: FedSA, whose sites would also report their personal accuracy
    grid, rows = run(
        tiny_backbone,
        six_site_data,
        tmp_path / "run",
        NODES[:3],
        aggregation="fedsa",
        **overrides,
    )

    # Assert
    replies = [
        r.content.metric_records[keys.METRICS_RECORD]
        for r in grid.received
        if keys.METRICS_RECORD in r.content.metric_records
        and (
            keys.MASKED_RECORD in r.content.array_records
            or keys.ADAPTER_RECORD in r.content.array_records
        )
    ]
    # The personalised model's score rides the sites' evaluate replies
    evaluated = [
        r.content.metric_records[keys.METRICS_RECORD]
        for r in grid.received
        if r.metadata.message_type == MessageType.EVALUATE
        and keys.METRICS_RECORD in r.content.metric_records
    ]
    assert len(replies) == 3
    for metrics in replies:
        assert (keys.TRAIN_LOSS in metrics) is in_the_clear
    assert any(keys.PERSONAL_ACCURACY in m for m in evaluated) is in_the_clear
    assert (rows[-1]["train_loss"] is not None) is in_the_clear
    assert ("personal_accuracy_mean" in rows[-1]) is in_the_clear


@pytest.mark.parametrize(
    "stage",
    [
        f"query.{keys.ACTION_SECAGG_ADVERTISE}",
        f"query.{keys.ACTION_SECAGG_SHARE}",
        "train",
        f"query.{keys.ACTION_SECAGG_UNMASK}",
    ],
)
def test_a_dropout_at_any_stage_still_gives_the_exact_survivor_mean(
    stage: str, tiny_backbone: Path, six_site_data: Path, tmp_path: Path
) -> None:
    # Prepare: the plain run loses the same client's training reply (unless it
    # dropped only at unmask)
    dropped_node = 33
    plain_tamper = None if stage.endswith("unmask") else drop(dropped_node, "train")

    # Execute
    _, secure_rows = run(
        tiny_backbone,
        six_site_data,
        tmp_path / "secure",
        NODES,
        tamper=drop(dropped_node, stage),
    )
    _, plain_rows = run(
        tiny_backbone,
        six_site_data,
        tmp_path / "plain",
        NODES,
        tamper=plain_tamper,
        **{"secagg.enabled": False},
    )

    # Assert
    expected_clients = 6 if stage.endswith("unmask") else 5
    assert secure_rows[1]["clients"] == plain_rows[1]["clients"] == expected_clients
    secure, plain = (
        final_adapter(tmp_path / "secure"),
        final_adapter(tmp_path / "plain"),
    )
    for name in plain:
        np.testing.assert_allclose(secure[name], plain[name], atol=1e-6, err_msg=name)


def test_too_many_dropouts_skip_the_round_and_the_run_goes_on(
    tiny_backbone: Path,
    six_site_data: Path,
    tmp_path: Path,
    caplog: pytest.LogCaptureFixture,
) -> None:
    # Prepare: four of six clients vanish after sending their masked input
    gone = {11, 22, 33, 44}
    tamper = lambda sender, reply: (
        None
        if sender in gone and reply.metadata.message_type.endswith("unmask")
        else reply
    )  # noqa: E731

    # Execute
    with caplog.at_level(logging.WARNING):
        _, rows = run(
            tiny_backbone,
            six_site_data,
            tmp_path / "out",
            NODES,
            tamper=tamper,
            **{"num-server-rounds": 2},
        )

    # Assert
    assert [row["round"] for row in rows] == [0, 1, 2]
    assert rows[1]["eval_loss"] == rows[0]["eval_loss"]
    assert "could not unmask this round" in caplog.text


def _replace_upload(bad_node: int, make):  # type: ignore[no-untyped-def]
    def tamper(sender: int, reply: Message) -> Message:
        if (
            sender == bad_node
            and not reply.has_error()
            and keys.MASKED_RECORD in reply.content.array_records
        ):
            original = next(
                iter(reply.content.array_records[keys.MASKED_RECORD].values())
            ).numpy()
            reply.content.array_records[keys.MASKED_RECORD] = ArrayRecord(
                {"update": Array(make(original))}
            )
        return reply

    return tamper


@pytest.mark.parametrize(
    ("case", "make", "reason"),
    [
        ("shape", lambda v: v[:-1].copy(), "shape"),
        ("dtype", lambda v: v.astype(np.int64), "dtype"),
    ],
)
def test_a_bad_masked_upload_is_dropped_and_the_rest_is_summed(
    case: str,
    make,
    reason: str,
    tiny_backbone: Path,
    six_site_data: Path,
    tmp_path: Path,  # type: ignore[no-untyped-def]
    caplog: pytest.LogCaptureFixture,
) -> None:
    with caplog.at_level(logging.WARNING):
        _, secure_rows = run(
            tiny_backbone,
            six_site_data,
            tmp_path / "secure",
            NODES,
            tamper=_replace_upload(22, make),
        )
    _, plain_rows = run(
        tiny_backbone,
        six_site_data,
        tmp_path / "plain",
        NODES,
        tamper=drop(22, "train"),
        **{"secagg.enabled": False},
    )
    assert secure_rows[1]["rejected"] == 1 and secure_rows[1]["clients"] == 5, case
    assert "node 22: update rejected" in caplog.text and reason in caplog.text
    secure, plain = (
        final_adapter(tmp_path / "secure"),
        final_adapter(tmp_path / "plain"),
    )
    for name in plain:
        np.testing.assert_allclose(secure[name], plain[name], atol=1e-6, err_msg=name)


def test_a_client_with_a_nan_delta_refuses_to_encode_and_is_dropped(
    tiny_backbone: Path,
    six_site_data: Path,
    tmp_path: Path,
    caplog: pytest.LogCaptureFixture,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    # Prepare: node 44's local training produces NaN
    import client.adapters as adapters_module

    real_upload = adapters_module.upload

    def poisoned(*args, **kwargs):  # type: ignore[no-untyped-def]
        change = real_upload(*args, **kwargs)
        if poisoned.calls == 3:
            change = {k: np.full_like(v, np.nan) for k, v in change.items()}
        poisoned.calls += 1
        return change

    poisoned.calls = 0  # type: ignore[attr-defined]
    monkeypatch.setattr(adapters_module, "upload", poisoned)

    # Execute
    with caplog.at_level(logging.WARNING):
        _, rows = run(tiny_backbone, six_site_data, tmp_path / "out", NODES)

    # Assert
    assert rows[1]["clients"] == 5 and rows[1]["failed"] == 1
    assert "NaN or Inf" in caplog.text and np.isfinite(rows[1]["eval_loss"])


def test_a_share_ciphertext_that_fails_authentication_drops_sender_and_accuser(
    tiny_backbone: Path,
    six_site_data: Path,
    tmp_path: Path,
    caplog: pytest.LogCaptureFixture,
) -> None:
    # Prepare: one ciphertext that node 55 sends in the key-sharing stage is altered
    def corrupt(sender: int, reply: Message) -> Message:
        if sender == 55 and reply.metadata.message_type.endswith(
            keys.ACTION_SECAGG_SHARE
        ):
            record = reply.content.config_records[keys.SECAGG_RECORD]
            sealed = [bytes(b) for b in record[keys.SECAGG_SEALED]]  # type: ignore[union-attr]
            sealed[0] = sealed[0][:-1] + bytes([sealed[0][-1] ^ 1])
            record[keys.SECAGG_SEALED] = sealed
        return reply

    # Execute
    with caplog.at_level(logging.WARNING):
        _, rows = run(
            tiny_backbone, six_site_data, tmp_path / "out", NODES, tamper=corrupt
        )

    # Assert: the coordinator cannot tell which of the two lies: both go
    assert rows[1]["clients"] == 4 and rows[1]["rejected"] == 2
    assert "node 55: update rejected: node(s) [" in caplog.text
    assert "key shares from node 55 failed authentication" in caplog.text


@pytest.mark.parametrize(
    ("case", "expected_rejected"), [("malformed", 1), ("duplicate", 2)]
)
def test_a_bad_public_key_removes_its_sender(
    case: str,
    expected_rejected: int,
    tiny_backbone: Path,
    six_site_data: Path,
    tmp_path: Path,
) -> None:
    # Prepare: node 66 advertises a short key, or copies node 11's keys
    advertised: dict[int, ConfigRecord] = {}

    def tamper(sender: int, reply: Message) -> Message:
        if reply.metadata.message_type.endswith(keys.ACTION_SECAGG_ADVERTISE):
            record = reply.content.config_records[keys.SECAGG_RECORD]
            advertised[sender] = record
            if sender == 66:
                if case == "malformed":
                    record[keys.SECAGG_CIPHER_PK] = b"short"
                else:
                    record[keys.SECAGG_CIPHER_PK] = advertised[11][
                        keys.SECAGG_CIPHER_PK
                    ]
                    record[keys.SECAGG_MASK_PK] = advertised[11][keys.SECAGG_MASK_PK]
        return reply

    # Execute
    _, rows = run(tiny_backbone, six_site_data, tmp_path / "out", NODES, tamper=tamper)

    # Assert
    assert rows[1]["rejected"] == expected_rejected
    assert rows[1]["clients"] == 6 - expected_rejected
