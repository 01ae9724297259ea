"""Tests for common/partition.py: seeded, pure splits of rows into clients."""

from __future__ import annotations

import math
from collections import Counter

import pytest

from common.data import DataError, Example
from common.partition import (
    column_partition,
    count_column_values,
    dirichlet_partition,
    holdout_split,
    partition_indices,
)

KINDS = ["iid", "dirichlet", "column:domain"]


def _examples(rows_per_label: int = 20) -> list[Example]:
    """Rows over four domains with two labels each, interleaved."""
    examples = []
    for index in range(rows_per_label):
        for domain in ("bank", "travel", "kitchen", "home"):
            for label in ("a", "b"):
                examples.append(
                    Example(
                        text=f"{domain} {label} {index}",
                        label=f"{domain}-{label}",
                        extra={"domain": domain},
                        where=f"rows.jsonl:{len(examples) + 1}",
                    )
                )
    return examples


def _label_entropy(labels: list[str]) -> float:
    counts = Counter(labels)
    total = sum(counts.values())
    return -sum(c / total * math.log(c / total) for c in counts.values())


@pytest.mark.parametrize("kind", KINDS)
def test_partitions_are_disjoint(kind: str) -> None:
    # Prepare
    examples = _examples()

    # Execute
    parts = partition_indices(examples, kind, 4, seed=0)

    # Assert
    flat = [i for part in parts for i in part]
    assert len(flat) == len(set(flat))


@pytest.mark.parametrize("kind", KINDS)
def test_partitions_cover_every_row(kind: str) -> None:
    # Prepare
    examples = _examples()

    # Execute
    parts = partition_indices(examples, kind, 4, seed=0)

    # Assert
    assert sorted(i for part in parts for i in part) == list(range(len(examples)))


@pytest.mark.parametrize("kind", KINDS)
def test_same_seed_gives_the_same_split(kind: str) -> None:
    # Prepare
    examples = _examples()

    # Execute
    first = partition_indices(examples, kind, 4, seed=3)
    second = partition_indices(examples, kind, 4, seed=3)

    # Assert
    assert first == second


@pytest.mark.parametrize("kind", ["iid", "dirichlet"])
def test_different_seed_gives_a_different_split(kind: str) -> None:
    # Prepare
    examples = _examples()

    # Execute
    first = partition_indices(examples, kind, 4, seed=3)
    second = partition_indices(examples, kind, 4, seed=4)

    # Assert
    assert first != second


def test_iid_parts_are_near_equal() -> None:
    # Prepare
    examples = _examples()[:157]

    # Execute
    parts = partition_indices(examples, "iid", 4, seed=0)

    # Assert
    sizes = [len(part) for part in parts]
    assert max(sizes) - min(sizes) <= 1


def test_column_partition_gives_one_client_per_distinct_value() -> None:
    # Prepare
    examples = _examples()

    # Execute
    names, groups = column_partition(examples, "domain")

    # Assert
    assert names == ["bank", "home", "kitchen", "travel"]
    for name, group in zip(names, groups, strict=True):
        assert {examples[i].extra["domain"] for i in group} == {name}


def test_column_split_holds_one_value_per_client() -> None:
    # Prepare
    examples = _examples()

    # Execute
    parts = partition_indices(examples, "column:domain", 4, seed=0)

    # Assert
    assert all(len({examples[i].extra["domain"] for i in part}) == 1 for part in parts)


def test_count_column_values_counts_distinct_values() -> None:
    # Prepare
    examples = _examples()

    # Execute
    count = count_column_values(examples, "domain")

    # Assert
    assert count == 4


def test_column_split_with_more_clients_than_values_tells_the_right_count() -> None:
    # Prepare
    examples = _examples()

    # Execute
    with pytest.raises(DataError) as caught:
        partition_indices(examples, "column:domain", 6, seed=0)

    # Assert
    message = str(caught.value)
    assert "gives 4 clients" in message
    assert "run 4 clients" in message


def test_column_split_with_fewer_clients_keeps_each_value_at_one_client() -> None:
    # Prepare
    examples = _examples()

    # Execute
    parts = partition_indices(examples, "column:domain", 3, seed=0)

    # Assert
    owners: dict[str, set[int]] = {}
    for client, part in enumerate(parts):
        for i in part:
            owners.setdefault(examples[i].extra["domain"], set()).add(client)
    assert all(len(clients) == 1 for clients in owners.values())


def test_column_split_on_a_missing_column_names_the_row() -> None:
    # Prepare
    examples = _examples()

    # Execute
    with pytest.raises(DataError) as caught:
        partition_indices(examples, "column:site", 4, seed=0)

    # Assert
    assert "rows.jsonl:1" in str(caught.value)
    assert "'site'" in str(caught.value)


def test_client_left_without_rows_is_refused() -> None:
    # Prepare
    examples = _examples()[:3]

    # Execute
    with pytest.raises(DataError) as caught:
        partition_indices(examples, "iid", 5, seed=0)

    # Assert
    assert "receives no rows" in str(caught.value)


def test_dirichlet_client_left_without_rows_is_refused() -> None:
    # Prepare
    examples = _examples()[:2]

    # Execute
    with pytest.raises(DataError, match="receives no rows"):
        partition_indices(examples, "dirichlet", 4, seed=0, dirichlet_alpha=0.01)


def test_unknown_partition_kind_is_refused() -> None:
    # Prepare
    examples = _examples()

    # Execute / Assert
    with pytest.raises(DataError, match="'random'"):
        partition_indices(examples, "random", 4, seed=0)


def test_dirichlet_gives_every_client_a_row_when_rows_suffice() -> None:
    # Prepare
    labels = ["a"] * 10

    # Execute
    parts = dirichlet_partition(labels, 8, alpha=0.01, seed=0)

    # Assert
    assert all(parts)


def test_dirichlet_with_small_alpha_is_more_skewed_than_with_large_alpha() -> None:
    # Prepare
    examples = _examples(rows_per_label=50)
    labels = [e.label for e in examples]

    def mean_entropy(alpha: float) -> float:
        entropies = []
        for seed in range(5):
            parts = dirichlet_partition(labels, 4, alpha, seed)
            entropies += [_label_entropy([labels[i] for i in part]) for part in parts]
        return sum(entropies) / len(entropies)

    # Execute
    skewed, even = mean_entropy(0.05), mean_entropy(100.0)

    # Assert
    assert skewed < even - 0.5


def test_holdout_split_is_disjoint_and_covers_every_row() -> None:
    # Prepare
    examples = _examples()

    # Execute
    train, held_out = holdout_split(examples, 0.2, seed=0)

    # Assert
    train_ids = {e.text for e in train}
    held_ids = {e.text for e in held_out}
    assert not train_ids & held_ids
    assert train_ids | held_ids == {e.text for e in examples}


@pytest.mark.parametrize(("fraction", "expected"), [(0.2, 32), (0.5, 80), (0.01, 2)])
def test_holdout_split_is_sized_by_fraction(fraction: float, expected: int) -> None:
    # Prepare
    examples = _examples()

    # Execute
    train, held_out = holdout_split(examples, fraction, seed=0)

    # Assert
    assert len(held_out) == expected
    assert len(train) == len(examples) - expected


def test_holdout_split_keeps_at_least_one_row() -> None:
    # Prepare
    examples = _examples()[:5]

    # Execute
    _, held_out = holdout_split(examples, 0.01, seed=0)

    # Assert
    assert len(held_out) == 1


def test_holdout_split_is_seeded() -> None:
    # Prepare
    examples = _examples()

    # Execute
    first = holdout_split(examples, 0.2, seed=1)
    second = holdout_split(examples, 0.2, seed=1)
    third = holdout_split(examples, 0.2, seed=2)

    # Assert
    assert first == second
    assert first != third
