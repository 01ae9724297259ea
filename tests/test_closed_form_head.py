"""``head.init = closed-form``: a head solved from sums of the sites' pooled features
(common.closed_form, server.head_statistics), plain or through the secure sum, equal
to the same closed form solved centrally on the union of the rows."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pytest

from client.client_app import app as client_app
from common import keys
from common.closed_form import (
    CLOSED_FORMS,
    ClassStatistics,
    clip_rows,
    solve_head,
    statistics_encoding,
)
from common.config import ConfigError, RunConfig
from common.secagg.encoding import HeadroomError
from common.splits import all_client_examples, run_labels
from common.wire import from_array_record
from server.server_app import coordinate
from tests.conftest import InProcessGrid, write_jsonl

LABELS, WIDTH = 4, 6


def site_rows(seed: int, rows: int, labels: list[int]) -> tuple[np.ndarray, np.ndarray]:
    """``rows`` features around a mean per label, of the given labels only."""
    rng = np.random.default_rng(seed)
    y = rng.choice(labels, size=rows)
    centres = np.arange(LABELS * WIDTH).reshape(LABELS, WIDTH) % 5 - 2.0
    return centres[y] + rng.normal(0, 1.0, (rows, WIDTH)), y


#: Label-skewed sites: each holds two of the four labels.
SITES = [site_rows(1, 30, [0, 1]), site_rows(2, 25, [1, 2]), site_rows(3, 40, [2, 3])]
CLIP = 100.0


def union() -> tuple[np.ndarray, np.ndarray]:
    return (
        np.concatenate([x for x, _ in SITES]),
        np.concatenate([y for _, y in SITES]),
    )


# -- the statistics and the closed forms ------------------------------------------------


def test_summed_site_statistics_equal_the_statistics_of_the_union() -> None:
    # Execute
    summed = ClassStatistics.total(
        ClassStatistics.of(x, y, LABELS, CLIP, with_gram=True) for x, y in SITES
    )
    central = ClassStatistics.of(*union(), LABELS, CLIP, with_gram=True)

    # Assert
    np.testing.assert_array_equal(summed.counts, central.counts)
    np.testing.assert_allclose(summed.sums, central.sums, rtol=1e-12)
    np.testing.assert_allclose(summed.gram, central.gram, rtol=1e-12)


def test_each_closed_form_from_sums_equals_its_textbook_form_on_the_rows() -> None:
    # Prepare: the textbook forms computed from the rows themselves
    x, y = union()
    n, shrinkage = len(y), 0.1
    statistics = ClassStatistics.of(x, y, LABELS, CLIP, with_gram=True)
    means = np.stack([x[y == k].mean(axis=0) for k in range(LABELS)])
    centred = x - means[y]
    covariance = centred.T @ centred / (n - LABELS)
    covariance = (1 - shrinkage) * covariance + shrinkage * np.trace(
        covariance
    ) / WIDTH * np.eye(WIDTH)
    lda_weight = np.linalg.solve(covariance, means.T).T
    priors = np.bincount(y) / n
    lda_bias = -0.5 * np.sum(lda_weight * means, axis=1) + np.log(priors)
    # ridge: least squares on [x 1] with sqrt(lambda) rows penalising the weights
    penalty = shrinkage * np.trace(x.T @ x) / WIDTH
    design = np.vstack(
        [np.hstack([x, np.ones((n, 1))]), np.sqrt(penalty) * np.eye(WIDTH, WIDTH + 1)]
    )
    targets = np.vstack([np.eye(LABELS)[y], np.zeros((WIDTH, LABELS))])
    ridge = np.linalg.lstsq(design, targets, rcond=None)[0]  # (d + 1, L)
    want = {
        "ncm": (means, -0.5 * np.sum(means**2, axis=1)),
        "lda": (lda_weight, lda_bias),
        "ridge": (ridge[:WIDTH].T, ridge[WIDTH]),
    }

    for variant in CLOSED_FORMS:
        # Execute
        weight, bias = solve_head(statistics, variant, shrinkage)

        # Assert
        np.testing.assert_allclose(weight, want[variant][0], rtol=1e-8, atol=1e-10)
        np.testing.assert_allclose(bias, want[variant][1], rtol=1e-8, atol=1e-10)


def test_a_label_no_site_holds_ranks_below_every_held_label() -> None:
    # Prepare: label 3 is absent
    x, y = SITES[0]
    statistics = ClassStatistics.of(x, y, LABELS, CLIP, with_gram=True)

    for variant in ("ncm", "lda"):
        # Execute
        weight, bias = solve_head(statistics, variant, 0.1)

        # Assert
        assert not weight[3].any()
        assert (np.argmax(x @ weight.T + bias, axis=1) != 3).all()


def test_rows_longer_than_the_feature_clip_are_scaled_onto_it() -> None:
    rows = np.array([[3.0, 4.0], [0.3, 0.4]])

    clipped = clip_rows(rows, 1.0)

    np.testing.assert_allclose(clipped, [[0.6, 0.8], [0.3, 0.4]])


# -- the secure encoding ---------------------------------------------------------------


def test_ring_sum_of_site_statistics_decodes_to_their_sum_and_the_same_head() -> None:
    # Prepare
    parts = [ClassStatistics.of(x, y, LABELS, CLIP, with_gram=True) for x, y in SITES]
    encoding = statistics_encoding(len(parts), CLIP, max_rows=100)
    ring_sum = sum(encoding.to_ring(p.to_vector()) for p in parts)

    # Execute
    decoded = ClassStatistics.from_vector(
        encoding.decode(ring_sum), LABELS, WIDTH, with_gram=True
    )

    # Assert: within one step per site, and a head equal to float tolerance
    plain = ClassStatistics.total(parts)
    step = len(parts) / encoding.scale
    for got, want in zip(
        (decoded.counts, decoded.sums, decoded.gram),
        (plain.counts, plain.sums, plain.gram),
        strict=True,
    ):
        np.testing.assert_allclose(got, want, rtol=1e-12, atol=step)
    assert decoded.problem(len(parts), CLIP, 100, 1 / encoding.scale) == ""
    for variant in CLOSED_FORMS:
        secure_head = solve_head(decoded, variant, 0.1)
        plain_head = solve_head(plain, variant, 0.1)
        for got, want in zip(secure_head, plain_head, strict=True):
            np.testing.assert_allclose(got, want, rtol=1e-8, atol=1e-9)


@pytest.mark.parametrize("max_rows", [10.0, 10_000.0])
def test_statistics_at_their_bound_cannot_wrap_the_ring_at_the_largest_cohort(
    max_rows: float,
) -> None:
    # Prepare: the largest cohort the 64-bit encoding accepts at this clip and row
    # cap, every site sending the largest value it can (max_rows * clip^2)
    bound = max_rows * CLIP**2
    cohort = math.floor(2**62 / bound / 1e6)
    encoding = statistics_encoding(cohort, CLIP, max_rows)
    with pytest.raises(HeadroomError):
        statistics_encoding(cohort + 1, CLIP, max_rows)
    values = np.array([bound, -bound, max_rows, 0.5])
    ring_sum = encoding.to_ring(values) * encoding.ring(cohort)  # cohort uploads

    # Execute
    decoded = encoding.decode(ring_sum)

    # Assert: no wrap-around
    np.testing.assert_allclose(decoded, values * cohort, rtol=1e-12)


@pytest.mark.parametrize(
    ("forge", "says"),
    [
        (lambda s: s.counts.__setitem__(0, s.counts[0] + 0.5), "whole number"),
        (lambda s: s.counts.__setitem__(0, -5.0), "row counts outside"),
        (lambda s: s.sums.__setitem__((0, 0), 1e9), "class sum longer"),
        (lambda s: s.gram.__setitem__((1, 1), 1e12), "Gram matrix"),
    ],
)
def test_statistics_no_honest_sites_can_send_are_named(forge, says: str) -> None:  # type: ignore[no-untyped-def]
    statistics = ClassStatistics.of(*SITES[0], LABELS, CLIP, with_gram=True)

    forge(statistics)

    assert says in statistics.problem(1, CLIP, 100, 1e-9)


# -- configuration ---------------------------------------------------------------------


@pytest.mark.parametrize(
    ("overrides", "says"),
    [
        ({"dp.enabled": True}, "neither clips, noises nor accounts"),
        ({"model.task": "causal-lm"}, "causal language model"),
        ({"model.task": "image-cls", "data.path": "x"}, "text classifier"),
        ({"head.closed-form": "svm"}, "use one of lda, ridge, ncm"),
        ({"head.closed-form-shrinkage": 0.0}, r"must be in \(0, 1\]"),
    ],
)
def test_closed_form_head_is_refused_where_it_cannot_run_or_be_accounted(
    overrides: dict[str, object], says: str
) -> None:
    with pytest.raises(ConfigError, match=says):
        RunConfig.from_flat({"head.init": "closed-form", **overrides})


# -- real sites ------------------------------------------------------------------------


@pytest.mark.integration
@pytest.mark.parametrize("secure", [False, True], ids=["plain", "secure"])
@pytest.mark.parametrize("variant", CLOSED_FORMS)
def test_real_sites_closed_form_head_equals_the_centralised_one(
    tiny_backbone: Path, tmp_path: Path, variant: str, secure: bool
) -> None:
    # Prepare: three label-skewed sites (column:site) of a tiny BERT, rows of
    # varied words (distinct features: a covariance worth inverting)
    rng = np.random.default_rng(0)
    words = ["please", "can", "you", "i", "need", "my", "today", "now", "very"]
    topics = {"send": "savings account", "flight": "trip luggage", "good": "film"}
    rows = [
        {
            "text": f"{topics[label]} " + " ".join(rng.choice(words, size=4)),
            "label": label,
            "site": f"s{(j + i) % 3}",
        }
        for i in range(12)
        for j, label in enumerate(topics)
        if (j + i) % 3 != 2 or j == 0
    ]
    data = write_jsonl(tmp_path / "rows.jsonl", rows)
    nodes = (11, 22, 33)
    config = RunConfig.from_flat(
        {
            "model.name": str(tiny_backbone),
            "data.path": str(data),
            "data.partition": "column:site",
            "sim.num-clients": len(nodes),
            "num-server-rounds": 1,
            "train.mode": "head",
            "train.batch-size": 4,
            "head.init": "closed-form",
            "head.closed-form": variant,
            "output.dir": str(tmp_path / "out"),
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

    # Execute: the federated run, and the closed form solved on the union centrally
    coordinate(grid, config)  # type: ignore[arg-type]
    from common.tasks.text_classification.bench import Workbench

    labels = run_labels(config.data, config.seed)
    bench = Workbench.open(config, labels, [])
    union_rows = [
        row
        for part in all_client_examples(config.data, config.seed, len(nodes))
        for row in part
    ]
    bench.solve_closed_form_head(bench.encode_examples(union_rows), "union")
    central = bench.state()

    # Assert: round 1's training messages carry the solved head; the statistics
    # went up masked (uint64) or in the clear
    sent = [
        from_array_record(m.content.array_records[keys.ADAPTER_RECORD])
        for m in grid.sent
        if m.metadata.message_type == "train"
    ]
    assert len(sent) == len(nodes)
    record = keys.MASKED_RECORD if secure else keys.STATISTICS_RECORD
    uploads = [
        r.content.array_records[record]
        for r in grid.received
        if r.metadata.message_type.endswith(keys.ACTION_HEAD_STATISTICS)
        and record in r.content.array_records
    ]
    assert len(uploads) == len(nodes)
    for name in ("head.weight", "head.bias"):
        np.testing.assert_allclose(
            sent[0][name], central[name], rtol=1e-4, atol=1e-5, err_msg=name
        )
    # ...and it is not the label-name start it replaced
    start = Workbench.open(config, labels, []).state()
    assert not np.allclose(sent[0]["head.weight"], start["head.weight"], atol=1e-3)


@pytest.mark.parametrize(
    "module",
    ["common.closed_form", "common.secagg.label_sums", "server.head_statistics"],
)
def test_the_closed_form_modules_import_first_in_a_fresh_process(module: str) -> None:
    # A circular import (closed_form -> sharing -> config -> head) shows only when
    # the module is the first one a process imports.
    import subprocess
    import sys

    done = subprocess.run(
        [sys.executable, "-c", f"import {module}"],
        check=False,
        capture_output=True,
        text=True,
    )

    assert done.returncode == 0, done.stderr
