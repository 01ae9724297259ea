"""``aggregation = fedavg-per-label`` behind secure aggregation: each site appends its
per-label counts and count-weighted head rows to its masked vector, and the
coordinator divides the two decoded sums (common.secagg.label_sums)."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest
from flwr.app import Context, Message, MetricRecord, RecordDict
from flwr.clientapp import ClientApp

from client import secagg
from client.client_app import app as client_app
from common import keys
from common.codec import AdapterState
from common.config import ConfigError, RunConfig
from common.secagg.encoding import RING_BITS, WIDE_RING_BITS, FixedPoint, round_encoding
from common.secagg.label_sums import LabelSums, label_slots, site_label_sums
from common.wire import from_array_record, to_array_record
from server.aggregation import build_rule
from server.secagg import SecureSum
from server.server_app import coordinate
from tests.conftest import InProcessGrid, write_jsonl
from tests.synthetic_sites import run_synthetic, synthetic_config, synthetic_grid

LABELS, WIDTH = 3, 4
HEAD = {"head.weight": (LABELS, WIDTH), "head.bias": (LABELS,)}
NODES = (11, 22, 33, 44)
EXAMPLES = 6


def head_delta(node: int) -> AdapterState:
    """A distinct head delta per node (norm well below the clip)."""
    rng = np.random.default_rng(node)
    return {
        k: rng.normal(0, 0.1, shape).astype(np.float32) for k, shape in HEAD.items()
    }


def label_counts(node: int) -> np.ndarray:
    """Label skew: node ``i`` holds mostly label ``i % 3``, none of label 2 at 11."""
    counts = np.ones(LABELS)
    counts[node % LABELS] = EXAMPLES - 2
    if node == 11:
        counts = np.array([EXAMPLES - 1, 1.0, 0.0])
    return counts


def plain_label_sums(nodes: tuple[int, ...], max_weight: float) -> LabelSums:
    """The sums computed in float64 from each site's figures."""
    weight = EXAMPLES / max_weight
    v = np.stack([label_counts(n) * weight / label_counts(n).sum() for n in nodes])
    return LabelSums(
        v.sum(axis=0),
        {
            name: sum(
                v[i].reshape((-1,) + (1,) * (len(shape) - 1))
                * head_delta(n)[name].astype(np.float64)
                for i, n in enumerate(nodes)
            )
            for name, shape in HEAD.items()
        },
    )


def per_label_site_app() -> ClientApp:
    """Sites that reply with ``head_delta(node)``, ``EXAMPLES`` rows and their label
    counts: in the clear, or inside the masked vector."""
    app = ClientApp()

    @app.train()
    def train(message: Message, context: Context) -> Message:
        node = context.node_id
        change = head_delta(node)
        instructions = message.content.config_records[keys.CONFIG_RECORD]
        metrics = MetricRecord({keys.NUM_EXAMPLES: EXAMPLES})
        if keys.SECAGG_RECORD in message.content.config_records:
            masked, notes = secagg.masked_update(
                context,
                message.content.config_records[keys.SECAGG_RECORD],
                int(instructions[keys.CFG_ROUND]),  # type: ignore[arg-type]
                np.concatenate([change[k].ravel() for k in sorted(change)]),
                EXAMPLES,
                label_counts=label_counts(node),
                head=change,
            )
            content = RecordDict(
                {
                    keys.MASKED_RECORD: masked,
                    keys.METRICS_RECORD: metrics,
                    keys.SECAGG_RECORD: notes,
                }
            )
        else:
            content = RecordDict(
                {
                    keys.ADAPTER_RECORD: to_array_record(change),
                    keys.METRICS_RECORD: metrics,
                    keys.LABEL_COUNTS_RECORD: to_array_record(
                        {"counts": label_counts(node).astype(np.float32)}
                    ),
                }
            )
        return Message(content, reply_to=message)

    app.query(keys.ACTION_SECAGG_ADVERTISE)(secagg.advertise)
    app.query(keys.ACTION_SECAGG_SHARE)(secagg.share_keys)
    app.query(keys.ACTION_SECAGG_UNMASK)(secagg.unmask)
    return app


def _run(secure: bool, tamper=None):  # type: ignore[no-untyped-def]
    config = synthetic_config(
        **{
            "aggregation": "fedavg-per-label",
            "secagg.enabled": secure,
            "num-server-rounds": 1,
        }
    )
    grid = synthetic_grid(NODES, tamper=tamper, app=per_label_site_app())
    summer = SecureSum(config.secagg, config.seed, label_sums=True) if secure else None
    initial = {k: np.zeros(shape, np.float32) for k, shape in HEAD.items()}
    return run_synthetic(
        config, grid=grid, rule=build_rule(config), summer=summer, initial=initial
    )


# -- the encoding ----------------------------------------------------------------------


def test_ring_sum_of_label_counts_and_weighted_rows_decodes_to_their_sums() -> None:
    # Prepare: each site's appended slots in the ring (the masks cancel in the sum)
    encoding = FixedPoint.for_clients(len(NODES), clip_norm=10.0, max_weight=10.0)
    ring_sum = np.zeros(label_slots(head_delta(11)), encoding.ring)
    for node in NODES:
        slots = site_label_sums(
            head_delta(node), label_counts(node), encoding.weight_of(EXAMPLES), 1.0
        )
        ring_sum += encoding.to_ring(slots)

    # Execute
    decoded = LabelSums.from_vector(encoding.decode(ring_sum), head_delta(11))

    # Assert: within half a step per site
    want = plain_label_sums(NODES, max_weight=10.0)
    half_steps = len(NODES) / encoding.scale / 2
    np.testing.assert_allclose(decoded.counts, want.counts, rtol=0, atol=half_steps)
    for name in HEAD:
        np.testing.assert_allclose(
            decoded.rows[name], want.rows[name], rtol=0, atol=half_steps
        )
    assert decoded.problem(len(NODES) * 0.6, 10.0, len(NODES), 1 / encoding.scale) == ""


#: Cohorts up to the largest any ring accepts at clip 10: the 32-bit ring's last,
#: the 64-bit ring's first, and the 64-bit ring's largest.
CLIP = 10.0
LARGEST_32 = math.floor((2**31 - 1) / CLIP / 1e6)
LARGEST_64 = math.floor(2**62 / CLIP / 1e6)


@pytest.mark.parametrize(
    ("cohort", "bits"),
    [(3, RING_BITS), (LARGEST_32, RING_BITS), (LARGEST_32 + 1, WIDE_RING_BITS)]
    + [(LARGEST_64, WIDE_RING_BITS)],
)
def test_label_counts_at_their_maximum_cannot_wrap_the_ring_up_to_the_largest_cohort(
    cohort: int, bits: int
) -> None:
    # Prepare: every site at its most (weight 1, all rows on label 0, whose head row
    # has the clip norm): the sum of `cohort` such uploads, as ring arithmetic
    encoding = round_encoding(cohort, CLIP, max_weight=10.0)
    head = {
        "head.weight": np.zeros(HEAD["head.weight"], np.float32),
        "head.bias": np.zeros(LABELS, np.float32),
    }
    head["head.weight"][0, 0] = -CLIP
    slots = encoding.to_ring(
        site_label_sums(head, np.array([10.0, 0, 0]), encoding.weight_of(10.0), 1.0)
    )
    ring_sum = slots * encoding.ring(cohort)  # wraps like the sum of `cohort` uploads

    # Execute
    decoded = LabelSums.from_vector(encoding.decode(ring_sum), head)

    # Assert: the ring and the totals come back, no wrap-around
    assert encoding.ring_bits == bits
    assert decoded.counts[0] == pytest.approx(cohort, rel=1e-9)
    assert decoded.rows["head.weight"][0, 0] == pytest.approx(-CLIP * cohort, rel=1e-9)
    assert decoded.problem(cohort, CLIP, cohort, 1 / encoding.scale) == ""


# -- the secure sum through the strategy -----------------------------------------------


def test_secure_per_label_mean_equals_the_plain_rule_within_the_step() -> None:
    # Execute
    secure, plain = _run(secure=True), _run(secure=False)

    # Assert: the masked upload carries the L * (d + 2) slots after the weight
    uploads = [
        from_array_record(r.content.array_records[keys.MASKED_RECORD])["update"]
        for r in secure.grid.received  # type: ignore[union-attr]
        if keys.MASKED_RECORD in r.content.array_records
    ]
    size = LABELS * WIDTH + LABELS
    assert {u.size for u in uploads} == {size + 1 + LABELS * (WIDTH + 2)}
    # ...and the head equals the plain rule's to the step over each label's count
    step = 1 / FixedPoint.for_clients(len(NODES), 10.0, 10.0).scale
    counts = plain_label_sums(NODES, 10.0).counts
    assert secure.rows[1]["clients"] == plain.rows[1]["clients"] == len(NODES)
    for name in HEAD:
        got, want = secure.states[1][name], plain.states[1][name]
        row_bound = (
            len(NODES)
            * step
            * (1 + np.abs(want))
            / counts.reshape((-1,) + (1,) * (want.ndim - 1))
        )
        assert (np.abs(got - want) <= row_bound + 1e-7).all(), name
    # ...which is not FedAvg's mean (the test can tell the rules apart)
    fedavg_bias = np.mean([head_delta(n)["head.bias"] for n in NODES], axis=0)
    assert not np.allclose(secure.states[1]["head.bias"], fedavg_bias, atol=1e-3)


def test_a_forged_label_count_slot_skips_the_round(
    caplog: pytest.LogCaptureFixture,
) -> None:
    # Prepare: node 44 adds 1.0 (in steps) to its first label-count slot
    size = LABELS * WIDTH + LABELS + 1
    scale = FixedPoint.for_clients(len(NODES), 10.0, 10.0).scale

    def forge(sender: int, reply: Message) -> Message:
        if sender == 44 and keys.MASKED_RECORD in reply.content.array_records:
            vector = from_array_record(reply.content.array_records[keys.MASKED_RECORD])
            update = vector["update"].copy()
            update[size] += np.uint32(round(scale))
            reply.content.array_records[keys.MASKED_RECORD] = to_array_record(
                {"update": update}
            )
        return reply

    # Execute
    run = _run(secure=True, tamper=forge)

    # Assert: the head is unchanged and the log says why
    np.testing.assert_array_equal(run.states[1]["head.bias"], np.zeros(LABELS))
    assert "per-label counts summing to" in caplog.text


# -- configuration ---------------------------------------------------------------------


def test_fedavg_per_label_runs_behind_secure_aggregation() -> None:
    config = RunConfig.from_flat(
        {"aggregation": "fedavg-per-label", "secagg.enabled": True}
    )

    assert config.aggregation.rule == "fedavg-per-label"


@pytest.mark.parametrize(
    ("overrides", "key", "says"),
    [
        ({"secagg.enabled": True, "codec": "fp16"}, "codec", "16-bit ring"),
        ({"dp.enabled": True}, "aggregation", "neither clips, noises nor accounts"),
        (
            {"dp.enabled": True, "secagg.enabled": True},
            "aggregation",
            "neither clips, noises nor accounts",
        ),
    ],
)
def test_per_label_sums_are_refused_where_they_would_be_coarse_or_unaccounted(
    overrides: dict[str, object], key: str, says: str
) -> None:
    with pytest.raises(ConfigError, match=f"config key '{key}'.*{says}"):
        RunConfig.from_flat({"aggregation": "fedavg-per-label", **overrides})


# -- the real ClientApp: same seeded run, plain and secure -----------------------------


@pytest.mark.integration
def test_real_sites_per_label_head_plain_and_secure_agree_on_label_disjoint_sites(
    tiny_backbone: Path, tmp_path: Path
) -> None:
    # Prepare: three label-disjoint sites (one label each)
    rows = [
        {"text": f"{word} number {i} please", "label": label, "site": f"s-{label}"}
        for i in range(8)
        for word, label in (
            ("send money", "send"),
            ("book flight", "flight"),
            ("good film", "good"),
        )
    ]
    data = write_jsonl(tmp_path / "rows.jsonl", rows)
    nodes = (11, 22, 33)

    def run(name: str, secure: bool) -> dict[str, np.ndarray]:
        output = tmp_path / name
        config = RunConfig.from_flat(
            {
                "model.name": str(tiny_backbone),
                "data.path": str(data),
                "data.partition": "column:site",
                "sim.num-clients": len(nodes),
                "num-server-rounds": 1,
                "train.batch-size": 4,
                "train.lr": 0.01,
                "lora.dropout": 0.0,
                "aggregation": "fedavg-per-label",
                "output.dir": str(output),
                "secagg.enabled": secure,
                "secagg.max-weight": 10.0,
            }
        )
        node_configs = {
            node: {
                "partition-id": i,
                "num-partitions": len(nodes),
                "cache-dir": str(tmp_path / "cache"),
            }
            for i, node in enumerate(nodes)
        }
        grid = InProcessGrid(client_app, node_configs)
        coordinate(grid, config)  # type: ignore[arg-type]
        metrics = [json.loads(x) for x in (output / "metrics.jsonl").open()]
        assert metrics[1]["clients"] == len(nodes)
        from safetensors.numpy import load_file

        return load_file(str(output / "adapter" / "head.safetensors"))

    # Execute
    secure, plain = run("secure", True), run("plain", False)

    # Assert: each label's row is its one site's delta, to the step over its count
    # (8 rows / max-weight 10), plus float32 rounding
    step = 1 / FixedPoint.for_clients(len(nodes), 10.0, 10.0).scale
    bound = len(nodes) * step / 0.8
    for name in plain:
        np.testing.assert_allclose(
            secure[name], plain[name], rtol=1e-6, atol=2 * bound, err_msg=name
        )
