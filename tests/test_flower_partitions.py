"""Flower Datasets' partitioners (``data.partition = flwr:<name>``) on a small table:
sizes, label spread, determinism under a seed, and the settings they refuse."""

from __future__ import annotations

import math
from pathlib import Path

import pytest

from common.config import ConfigError, RunConfig
from common.data import DataError, Example
from common.flower_partitions import parse_options
from common.partition import partition_indices
from common.splits import all_client_examples, default_num_clients
from tests.conftest import hide_package, write_jsonl

pytest.importorskip("flwr_datasets")

LABELS = ("a", "b", "c", "d")
DOMAINS = ("bank", "home", "travel")
ROWS = 120
CLIENTS = 4


def _examples() -> list[Example]:
    """120 rows: labels a-d in turn, domains bank/home/travel in turn."""
    return [
        Example(
            text=f"row {index}",
            label=LABELS[index % len(LABELS)],
            extra={"domain": DOMAINS[index % len(DOMAINS)]},
            where=f"rows.jsonl:{index + 1}",
        )
        for index in range(ROWS)
    ]


def _split(kind: str, options: str = "", seed: int = 0) -> list[list[int]]:
    return partition_indices(
        _examples(), kind, CLIENTS, seed, options=parse_options(options)
    )


def _labels_per_client(parts: list[list[int]]) -> list[int]:
    examples = _examples()
    return [len({examples[i].label for i in part}) for part in parts]


def _shares(weights: list[float]) -> list[int]:
    """Flower's sizes for size-based partitioners: ``ROWS`` split by ``weights``."""
    total = sum(weights)
    sizes = [math.floor(ROWS * w / total) for w in weights]
    sizes[-1] += ROWS - sum(sizes)
    return sizes


@pytest.mark.parametrize(
    ("kind", "options", "sizes"),
    [
        ("flwr:iid", "", [30, 30, 30, 30]),
        ("flwr:linear", "", _shares([1, 2, 3, 4])),
        ("flwr:square", "", _shares([1, 4, 9, 16])),
        ("flwr:exponential", "", _shares([math.exp(i) for i in range(1, 5)])),
        (
            "flwr:pathological",
            "num_classes_per_partition=1,class_assignment_mode=deterministic",
            [30, 30, 30, 30],
        ),
        ("flwr:shard", "num_shards_per_partition=2", [30, 30, 30, 30]),
    ],
)
def test_flower_partitioners_give_their_documented_sizes(
    kind: str, options: str, sizes: list[int]
) -> None:
    # Execute
    parts = _split(kind, options)

    # Assert
    assert [len(part) for part in parts] == sizes
    assert sorted(i for part in parts for i in part) == list(range(ROWS))


@pytest.mark.parametrize(
    ("kind", "options", "most_labels"),
    [
        ("flwr:pathological", "num_classes_per_partition=2", 2),
        ("flwr:pathological", "num_classes_per_partition=1", 1),
        ("flwr:shard", "num_shards_per_partition=2", 2),
        ("flwr:natural-id", "partition_by=label", 1),
    ],
)
# One class a client over more clients than classes: Flower Datasets says which
# class is left out, as it would to a user choosing this split.
@pytest.mark.filterwarnings("ignore:Classes.*will NOT be used:UserWarning")
def test_label_skewing_partitioners_limit_the_labels_of_each_client(
    kind: str, options: str, most_labels: int
) -> None:
    # Execute
    parts = _split(kind, options)

    # Assert
    assert max(_labels_per_client(parts)) == most_labels


def test_flower_iid_gives_every_client_every_label() -> None:
    # Execute
    parts = _split("flwr:iid")

    # Assert
    assert _labels_per_client(parts) == [len(LABELS)] * CLIENTS


@pytest.mark.parametrize(
    ("alpha", "every_label_everywhere"), [(0.05, False), (1e3, True)]
)
# At alpha 0.05 Flower Datasets redraws until every client has a row, and says so.
@pytest.mark.filterwarnings("ignore:The specified min_partition_size:UserWarning")
def test_flower_dirichlet_skews_labels_by_alpha(
    alpha: float, every_label_everywhere: bool
) -> None:
    # Execute: a small alpha leaves some client without some label
    parts = _split("flwr:dirichlet", f"alpha={alpha},min_partition_size=1")

    # Assert
    assert (min(_labels_per_client(parts)) == len(LABELS)) == every_label_everywhere
    assert sum(len(part) for part in parts) == ROWS


def test_flower_dirichlet_takes_data_dirichlet_alpha_when_no_alpha_is_given() -> None:
    # Execute
    defaulted = partition_indices(
        _examples(), "flwr:dirichlet", CLIENTS, 0, 0.3, {"min_partition_size": 1}
    )
    explicit = _split("flwr:dirichlet", "alpha=0.3,min_partition_size=1")

    # Assert
    assert defaulted == explicit


def test_natural_id_gives_one_client_per_column_value_in_first_seen_order() -> None:
    # Prepare
    examples = _examples()

    # Execute
    parts = partition_indices(
        examples, "flwr:natural-id", 3, 0, options={"partition_by": "domain"}
    )

    # Assert
    domains = [{examples[i].extra["domain"] for i in part} for part in parts]
    assert domains == [{"bank"}, {"home"}, {"travel"}]


def test_natural_id_with_another_client_count_tells_the_right_count() -> None:
    # Execute
    with pytest.raises(DataError, match="gives 3 clients .* run 3 clients"):
        partition_indices(
            _examples(), "flwr:natural-id", 5, 0, options={"partition_by": "domain"}
        )


ALL_KINDS = [
    ("flwr:iid", ""),
    ("flwr:dirichlet", "alpha=0.5,min_partition_size=1"),
    ("flwr:pathological", "num_classes_per_partition=2"),
    ("flwr:shard", "num_shards_per_partition=2"),
    ("flwr:linear", ""),
    ("flwr:square", ""),
    ("flwr:exponential", ""),
    ("flwr:natural-id", "partition_by=label"),
]


@pytest.mark.parametrize(("kind", "options"), ALL_KINDS)
def test_flower_partitions_repeat_under_the_same_seed(kind: str, options: str) -> None:
    # Execute
    first, second = _split(kind, options, seed=7), _split(kind, options, seed=7)

    # Assert
    assert first == second


@pytest.mark.parametrize(("kind", "options"), ALL_KINDS[:-1])
def test_flower_partitions_change_with_the_seed(kind: str, options: str) -> None:
    # Execute
    first, second = _split(kind, options, seed=7), _split(kind, options, seed=8)

    # Assert
    assert first != second


def test_a_partitioner_refusing_the_rows_names_the_kind() -> None:
    # Execute / Assert: 4 labels cannot give 4 clients 5 labels each
    with pytest.raises(DataError, match="flwr:pathological refused 120 rows"):
        _split("flwr:pathological", "num_classes_per_partition=5")


def test_partition_by_a_missing_column_names_the_row() -> None:
    # Execute / Assert
    with pytest.raises(DataError, match="rows.jsonl:1: no column 'site'"):
        _split("flwr:natural-id", "partition_by=site")


def test_missing_flower_datasets_names_the_extra(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    # Prepare
    hide_package(monkeypatch, "flwr_datasets")

    # Execute / Assert: at the split, and before anything starts
    with pytest.raises(DataError, match=r"pip install 'fedgraft\[partitioners\]'"):
        _split("flwr:iid")
    with pytest.raises(ConfigError, match=r"'data.partition'.*fedgraft\[partitioners"):
        RunConfig.from_flat({"data.partition": "flwr:iid"})


@pytest.mark.parametrize(
    ("settings", "key", "fragment"),
    [
        ({"data.partition": "pathological"}, "data.partition", "flwr:pathological"),
        ({"data.partition": "flwr:random"}, "data.partition", "natural-id"),
        (
            {"data.partition": "flwr:pathological"},
            "data.partition-args",
            "needs num_classes_per_partition",
        ),
        (
            {"data.partition": "flwr:iid", "data.partition-args": "alpha=1"},
            "data.partition-args",
            "takes no option 'alpha'",
        ),
        (
            {"data.partition": "flwr:shard", "data.partition-args": "seed=3"},
            "data.partition-args",
            "seed come from",
        ),
        (
            {"data.partition": "iid", "data.partition-args": "alpha=1"},
            "data.partition-args",
            "only by flwr:<name>",
        ),
        (
            {"data.partition": "flwr:dirichlet", "data.partition-args": "alpha"},
            "data.partition-args",
            "not key=value",
        ),
    ],
)
def test_bad_partition_settings_are_refused_naming_the_key(
    settings: dict[str, object], key: str, fragment: str
) -> None:
    # Execute
    with pytest.raises(ConfigError) as caught:
        RunConfig.from_flat(settings)

    # Assert
    assert f"'{key}'" in str(caught.value) and fragment in str(caught.value)


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("", {}),
        ("num_classes_per_partition=2", {"num_classes_per_partition": 2}),
        ("alpha=0.5, shuffle=false", {"alpha": 0.5, "shuffle": False}),
        (
            "class_assignment_mode=deterministic",
            {"class_assignment_mode": "deterministic"},
        ),
    ],
)
def test_partition_args_are_parsed_with_their_types(
    text: str, expected: dict[str, object]
) -> None:
    assert parse_options(text) == expected


def test_a_natural_id_run_gets_one_client_per_value_from_the_config(
    tmp_path: Path,
) -> None:
    # Prepare
    rows = [
        {"text": e.text, "label": e.label, "domain": e.extra["domain"]}
        for e in _examples()
    ]
    config = RunConfig.from_flat(
        {
            "data.path": str(write_jsonl(tmp_path / "rows.jsonl", rows)),
            "data.partition": "flwr:natural-id",
            "data.partition-args": "partition_by=domain",
        }
    )

    # Execute
    count = default_num_clients(config.data, config.seed, 8)
    clients = all_client_examples(config.data, config.seed, count)

    # Assert
    assert count == len(DOMAINS)
    assert [len({e.extra["domain"] for e in rows}) for rows in clients] == [1, 1, 1]
