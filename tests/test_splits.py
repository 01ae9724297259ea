"""Tests for common/splits.py: which rows each party of a run sees."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from common.config import DataConfig, RunConfig
from common.data import DataError
from common.demo import demo_test_examples, demo_train_examples
from common.splits import (
    all_client_examples,
    client_examples,
    default_num_clients,
    evaluation_examples,
    pools,
    run_labels,
)
from tests.conftest import shared_data, write_jsonl

SEED = 5
DOMAIN_LABELS = (("bank", ("send", "balance")), ("travel", ("flight", "hotel")))


def _data(**flat: object) -> DataConfig:
    return RunConfig.from_flat(flat).data


def _pool(tmp_path: Path, name: str = "pool.jsonl", rows_per_label: int = 10) -> Path:
    rows = [
        {"text": f"{domain} {label} row {index}", "label": label, "domain": domain}
        for domain, labels in DOMAIN_LABELS
        for label in labels
        for index in range(rows_per_label)
    ]
    return write_jsonl(tmp_path / name, rows)


def test_empty_data_path_trains_on_the_demo_corpus() -> None:
    # Prepare
    data = _data(**{"data.path": ""})

    # Execute
    result = pools(data, SEED)

    # Assert
    assert result.train == demo_train_examples(SEED)


def test_empty_data_path_evaluates_on_the_demo_test_rows() -> None:
    # Prepare
    data = _data(**{"data.path": ""})

    # Execute
    rows = evaluation_examples(data, SEED)

    # Assert
    assert rows == demo_test_examples(SEED)


def test_demo_clients_follow_the_domain_column() -> None:
    # Prepare
    data = _data(**{"data.path": ""})

    # Execute
    clients = all_client_examples(data, SEED, 4)

    # Assert
    assert [{e.extra["domain"] for e in rows} for rows in clients] == [
        {"banking"},
        {"home"},
        {"kitchen"},
        {"travel"},
    ]


def test_held_out_rows_never_reach_a_client(tmp_path: Path) -> None:
    # Prepare
    data = _data(**{"data.path": str(_pool(tmp_path)), "data.partition": "iid"})

    # Execute
    held_out = evaluation_examples(data, SEED)
    clients = [client_examples(data, SEED, pid, 3) for pid in range(3)]

    # Assert
    held_texts = {e.text for e in held_out}
    client_texts = {e.text for rows in clients for e in rows}
    assert held_texts
    assert not held_texts & client_texts


def test_held_out_and_client_rows_cover_the_pool(tmp_path: Path) -> None:
    # Prepare
    pool = _pool(tmp_path)
    data = _data(**{"data.path": str(pool), "data.partition": "column:domain"})

    # Execute
    held_out = evaluation_examples(data, SEED)
    clients = all_client_examples(data, SEED, 2)

    # Assert
    texts = [e.text for e in held_out] + [e.text for rows in clients for e in rows]
    assert len(texts) == 40
    assert len(set(texts)) == 40


def test_held_out_slice_is_sized_by_holdout_fraction(tmp_path: Path) -> None:
    # Prepare
    data = _data(**{"data.path": str(_pool(tmp_path)), "data.holdout-fraction": 0.25})

    # Execute
    held_out = evaluation_examples(data, SEED)

    # Assert
    assert len(held_out) == 10


def test_test_path_is_the_evaluation_set_and_the_pool_is_whole(tmp_path: Path) -> None:
    # Prepare
    pool = _pool(tmp_path)
    test_rows: list[dict[str, object]] = [{"text": "only test", "label": "send"}]
    test = write_jsonl(tmp_path / "test.jsonl", test_rows)
    data = _data(**{"data.path": str(pool), "data.test-path": str(test)})

    # Execute
    result = pools(data, SEED)

    # Assert
    assert [e.text for e in result.test] == ["only test"]
    assert len(result.train) == 40


def test_site_data_path_overrides_the_pool(tmp_path: Path) -> None:
    # Prepare
    site = write_jsonl(tmp_path / "site.jsonl", [{"text": "site row", "label": "send"}])
    data = _data(**{"data.path": str(_pool(tmp_path))})

    # Execute
    rows = client_examples(data, SEED, 0, 2, site_data_path=str(site))

    # Assert
    assert [e.text for e in rows] == ["site row"]


def test_site_data_path_ignores_the_partition_id(tmp_path: Path) -> None:
    # Prepare
    site = write_jsonl(tmp_path / "site.jsonl", [{"text": "site row", "label": "send"}])
    data = _data()

    # Execute
    rows = client_examples(data, SEED, 99, 1, site_data_path=str(site))

    # Assert
    assert len(rows) == 1


def test_partition_id_out_of_range_is_refused() -> None:
    # Prepare
    data = _data()

    # Execute / Assert
    with pytest.raises(DataError, match="partition-id 4 is outside 0..3"):
        client_examples(data, SEED, 4, 4)


def test_client_examples_match_all_client_examples(tmp_path: Path) -> None:
    # Prepare
    data = _data(**{"data.path": str(_pool(tmp_path)), "data.partition": "iid"})

    # Execute
    each = [client_examples(data, SEED, pid, 3) for pid in range(3)]

    # Assert
    assert each == all_client_examples(data, SEED, 3)


def test_run_labels_prefers_data_labels(tmp_path: Path) -> None:
    # Prepare
    data = _data(**{"data.path": str(_pool(tmp_path)), "data.labels": "z,y,x"})

    # Execute
    labels = run_labels(data, SEED)

    # Assert
    assert labels == ("z", "y", "x")


def test_run_labels_covers_train_and_test_labels(tmp_path: Path) -> None:
    # Prepare
    pool = _pool(tmp_path)
    test = write_jsonl(tmp_path / "test.jsonl", [{"text": "t", "label": "refund"}])
    data = _data(**{"data.path": str(pool), "data.test-path": str(test)})

    # Execute
    labels = run_labels(data, SEED)

    # Assert
    assert labels == ("balance", "flight", "hotel", "refund", "send")


def test_run_labels_without_data_path_are_the_demo_intents() -> None:
    # Prepare
    data = _data()

    # Execute
    labels = run_labels(data, SEED)

    # Assert
    assert len(labels) == 12


def test_default_num_clients_is_the_column_value_count(tmp_path: Path) -> None:
    # Prepare
    pool = _pool(tmp_path)
    data = _data(**{"data.path": str(pool), "data.partition": "column:domain"})

    # Execute
    count = default_num_clients(data, SEED, configured=7)

    # Assert
    assert count == 2


def test_default_num_clients_is_the_configured_count_for_iid() -> None:
    # Prepare
    data = _data(**{"data.partition": "iid"})

    # Execute
    count = default_num_clients(data, SEED, configured=7)

    # Assert
    assert count == 7


def test_rewritten_pool_file_is_read_again(tmp_path: Path) -> None:
    # Prepare
    path = _pool(tmp_path, rows_per_label=10)
    data = _data(**{"data.path": str(path), "data.test-path": str(path)})
    before = len(pools(data, SEED).train)
    _pool(tmp_path, rows_per_label=5)
    os.utime(path, (1, 1))

    # Execute
    after = len(pools(data, SEED).train)

    # Assert
    assert (before, after) == (40, 20)


def test_rewritten_pool_under_home_is_read_again(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Prepare
    monkeypatch.setenv("HOME", str(tmp_path))
    path = _pool(tmp_path, rows_per_label=10)
    data = _data(**{"data.path": "~/pool.jsonl", "data.test-path": "~/pool.jsonl"})
    before = len(pools(data, SEED).train)
    _pool(tmp_path, rows_per_label=5)
    os.utime(path, (1, 1))

    # Execute
    after = len(pools(data, SEED).train)

    # Assert
    assert (before, after) == (40, 20)


def _sites(tmp_path: Path, rows_per_label: int = 5) -> Path:
    """Three headerless ``<site>_labelled.txt`` files in ``tmp_path / "sites"``."""
    folder = tmp_path / "sites"
    folder.mkdir()
    for site in ("amazon", "imdb", "yelp"):
        lines = [
            f'{site} "{label}" row {index}\t{label}\n'
            for label in ("0", "1")
            for index in range(rows_per_label)
        ]
        (folder / f"{site}_labelled.txt").write_text("".join(lines))
    return folder


def test_column_source_gives_one_client_per_listed_file(tmp_path: Path) -> None:
    # Prepare
    folder = _sites(tmp_path)
    listed = ",".join(str(folder / f"{s}_labelled.txt") for s in ("yelp", "amazon"))
    data = _data(**{"data.path": listed, "data.partition": "column:source"})

    # Execute
    clients = all_client_examples(data, SEED, 2)

    # Assert
    assert [{e.extra["source"] for e in rows} for rows in clients] == [
        {"amazon_labelled"},
        {"yelp_labelled"},
    ]


def test_glob_data_path_sets_one_client_per_matched_file(tmp_path: Path) -> None:
    # Prepare
    folder = _sites(tmp_path)
    data = _data(
        **{
            "data.path": str(folder / "*_labelled.txt"),
            "data.partition": "column:source",
        }
    )

    # Execute
    count = default_num_clients(data, SEED, configured=7)

    # Assert
    assert count == 3


def test_glob_test_path_is_the_evaluation_set(tmp_path: Path) -> None:
    # Prepare
    folder = _sites(tmp_path, rows_per_label=2)
    data = _data(**{"data.test-path": str(folder / "*.txt")})

    # Execute
    rows = evaluation_examples(data, SEED)

    # Assert
    assert len(rows) == 12
    assert {e.label for e in rows} == {"0", "1"}


def test_file_newly_matched_by_the_pattern_is_read(tmp_path: Path) -> None:
    # Prepare
    folder = _sites(tmp_path, rows_per_label=2)
    pattern = str(folder / "*.txt")
    data = _data(**{"data.path": pattern, "data.test-path": pattern})
    before = len(pools(data, SEED).train)
    (folder / "zeta_labelled.txt").write_text("new row\t1\n")

    # Execute
    after = len(pools(data, SEED).train)

    # Assert
    assert (before, after) == (12, 13)


def test_missing_file_in_the_data_path_list_is_refused(tmp_path: Path) -> None:
    # Prepare
    folder = _sites(tmp_path)
    absent = folder / "absent.txt"
    data = _data(**{"data.path": f"{folder / 'imdb_labelled.txt'},{absent}"})

    # Execute / Assert
    with pytest.raises(DataError, match="absent.txt: no such file"):
        pools(data, SEED)


def test_test_path_pattern_matching_no_file_is_refused(tmp_path: Path) -> None:
    # Prepare
    folder = _sites(tmp_path)
    pattern = str(folder / "*.csv")
    data = _data(**{"data.test-path": pattern})

    # Execute
    with pytest.raises(DataError) as caught:
        evaluation_examples(data, SEED)

    # Assert
    assert f"{pattern}: the pattern matches no file" in str(caught.value)


def test_shared_sentiment_sites_give_three_clients() -> None:
    # Prepare
    folder = shared_data("sentiment_labelled_sentences")
    data = _data(
        **{
            "data.path": str(folder / "*_labelled.txt"),
            "data.partition": "column:source",
        }
    )

    # Execute
    clients = all_client_examples(data, SEED, 3)

    # Assert
    assert [{e.extra["source"] for e in rows} for rows in clients] == [
        {"amazon_cells_labelled"},
        {"imdb_labelled"},
        {"yelp_labelled"},
    ]
    assert sum(len(rows) for rows in clients) + len(pools(data, SEED).test) == 3000
