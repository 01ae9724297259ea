"""Tests for common/data.py: reading labelled rows from the formats users have."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from common.data import DataError, Example, encode_labels, label_set, load_examples
from tests.conftest import shared_data, write_jsonl

ROWS: list[dict[str, object]] = [
    {"text": "send money to my savings", "label": "transfer", "domain": "bank"},
    {"text": "book a flight for the trip", "label": "flight", "domain": "travel"},
    {"text": "how much is in my account", "label": "balance", "domain": "bank"},
]
EXPECTED = [Example(str(row["text"]), str(row["label"])) for row in ROWS]


def _write_delimited(path: Path, rows: list[dict[str, object]], delimiter: str) -> Path:
    header = delimiter.join(rows[0])
    lines = [delimiter.join(str(value) for value in row.values()) for row in rows]
    path.write_text("\n".join([header, *lines]) + "\n")
    return path


def _write_parquet(path: Path, rows: list[dict[str, object]]) -> Path:
    import pyarrow as pa
    import pyarrow.parquet as pq

    pq.write_table(pa.Table.from_pylist(rows), path)
    return path


def test_jsonl_rows_are_read(tmp_path: Path) -> None:
    # Prepare
    path = write_jsonl(tmp_path / "rows.jsonl", ROWS)

    # Execute
    examples = load_examples(path)

    # Assert
    assert examples == EXPECTED


def test_blank_lines_in_jsonl_are_skipped(tmp_path: Path) -> None:
    # Prepare
    path = tmp_path / "rows.jsonl"
    path.write_text(json.dumps(ROWS[0]) + "\n\n" + json.dumps(ROWS[1]) + "\n")

    # Execute
    examples = load_examples(path)

    # Assert
    assert examples == EXPECTED[:2]


def test_extra_columns_are_kept(tmp_path: Path) -> None:
    # Prepare
    path = write_jsonl(tmp_path / "rows.jsonl", ROWS)

    # Execute
    examples = load_examples(path)

    # Assert
    assert [e.extra for e in examples] == [{"domain": str(r["domain"])} for r in ROWS]


def test_json_list_rows_are_read(tmp_path: Path) -> None:
    # Prepare
    path = tmp_path / "rows.json"
    path.write_text(json.dumps(ROWS))

    # Execute
    examples = load_examples(path)

    # Assert
    assert examples == EXPECTED


def test_json_data_object_rows_are_read(tmp_path: Path) -> None:
    # Prepare
    path = tmp_path / "rows.json"
    path.write_text(json.dumps({"version": 1, "data": ROWS}))

    # Execute
    examples = load_examples(path)

    # Assert
    assert examples == EXPECTED


def test_json_object_without_data_list_is_refused(tmp_path: Path) -> None:
    # Prepare
    path = tmp_path / "rows.json"
    path.write_text(json.dumps({"rows": ROWS}))

    # Execute
    with pytest.raises(DataError) as caught:
        load_examples(path)

    # Assert
    assert str(path) in str(caught.value)


def test_csv_rows_are_read(tmp_path: Path) -> None:
    # Prepare
    path = _write_delimited(tmp_path / "rows.csv", ROWS, ",")

    # Execute
    examples = load_examples(path)

    # Assert
    assert examples == EXPECTED


def test_csv_quoted_text_with_commas_is_read(tmp_path: Path) -> None:
    # Prepare
    path = tmp_path / "rows.csv"
    path.write_text('text,label\n"hello, world",greet\n')

    # Execute
    examples = load_examples(path)

    # Assert
    assert examples == [Example("hello, world", "greet")]


def test_tsv_rows_are_read(tmp_path: Path) -> None:
    # Prepare
    path = _write_delimited(tmp_path / "rows.tsv", ROWS, "\t")

    # Execute
    examples = load_examples(path)

    # Assert
    assert examples == EXPECTED


def test_tsv_text_with_double_quotes_is_read_verbatim(tmp_path: Path) -> None:
    # Prepare
    path = tmp_path / "rows.tsv"
    path.write_text('sentence\tlabel\n"quoted" film\t1\n')

    # Execute
    (example,) = load_examples(path, text_column="sentence")

    # Assert
    assert example.text == '"quoted" film'


def test_csv_with_a_byte_order_mark_is_read(tmp_path: Path) -> None:
    # Prepare
    path = tmp_path / "rows.csv"
    path.write_bytes("\ufefftext,label\nhello,greet\n".encode())

    # Execute
    examples = load_examples(path)

    # Assert
    assert examples == [Example("hello", "greet")]


def test_jsonl_with_a_byte_order_mark_is_read(tmp_path: Path) -> None:
    # Prepare
    path = tmp_path / "rows.jsonl"
    path.write_bytes(("\ufeff" + json.dumps(ROWS[0]) + "\n").encode())

    # Execute
    examples = load_examples(path)

    # Assert
    assert examples == EXPECTED[:1]


def test_parquet_rows_are_read(tmp_path: Path) -> None:
    # Prepare
    path = _write_parquet(tmp_path / "rows.parquet", ROWS)

    # Execute
    examples = load_examples(path)

    # Assert
    assert examples == EXPECTED


def test_save_to_disk_directory_is_read(tmp_path: Path) -> None:
    # Prepare
    datasets = pytest.importorskip("datasets")
    directory = tmp_path / "saved"
    datasets.Dataset.from_list(ROWS).save_to_disk(str(directory))

    # Execute
    examples = load_examples(directory)

    # Assert
    assert examples == EXPECTED


def test_directory_without_arrow_shards_is_refused(tmp_path: Path) -> None:
    # Prepare
    directory = tmp_path / "empty-dir"
    directory.mkdir()

    # Execute
    with pytest.raises(DataError) as caught:
        load_examples(directory)

    # Assert
    assert str(directory) in str(caught.value)
    assert "save_to_disk" in str(caught.value)


def test_custom_column_names_are_honoured(tmp_path: Path) -> None:
    # Prepare
    path = write_jsonl(tmp_path / "rows.jsonl", [{"sentence": "fine film", "y": "pos"}])

    # Execute
    examples = load_examples(path, text_column="sentence", label_column="y")

    # Assert
    assert examples == [Example("fine film", "pos")]


def test_malformed_jsonl_names_file_and_line(tmp_path: Path) -> None:
    # Prepare
    path = tmp_path / "rows.jsonl"
    path.write_text(json.dumps(ROWS[0]) + "\n" + json.dumps(ROWS[1]) + "\n{not json\n")

    # Execute
    with pytest.raises(DataError) as caught:
        load_examples(path)

    # Assert
    assert f"{path}:3" in str(caught.value)


def test_malformed_json_names_file_and_line(tmp_path: Path) -> None:
    # Prepare
    path = tmp_path / "rows.json"
    path.write_text('[\n{"text": "a", "label": "b"},\n{oops}\n]')

    # Execute
    with pytest.raises(DataError) as caught:
        load_examples(path)

    # Assert
    assert f"{path}:3" in str(caught.value)


def test_missing_label_column_is_named(tmp_path: Path) -> None:
    # Prepare
    path = write_jsonl(tmp_path / "rows.jsonl", [{"text": "hello", "intent": "greet"}])

    # Execute
    with pytest.raises(DataError) as caught:
        load_examples(path)

    # Assert
    message = str(caught.value)
    assert "'label'" in message
    assert f"{path}:1" in message


def test_missing_text_column_is_named(tmp_path: Path) -> None:
    # Prepare
    rows: list[dict[str, object]] = [{"sentence": "hi", "label": "g"}]
    path = _write_delimited(tmp_path / "rows.csv", rows, ",")

    # Execute
    with pytest.raises(DataError) as caught:
        load_examples(path)

    # Assert
    assert "'text'" in str(caught.value)


def test_csv_row_with_too_few_columns_names_the_line(tmp_path: Path) -> None:
    # Prepare
    path = tmp_path / "rows.csv"
    path.write_text("text,label,domain\nhello,greet,chat\nbye,farewell\n")

    # Execute
    with pytest.raises(DataError) as caught:
        load_examples(path)

    # Assert
    assert f"{path}:3" in str(caught.value)


def test_empty_text_is_refused_naming_the_line(tmp_path: Path) -> None:
    # Prepare
    path = write_jsonl(tmp_path / "rows.jsonl", [ROWS[0], {"text": "  ", "label": "x"}])

    # Execute
    with pytest.raises(DataError) as caught:
        load_examples(path)

    # Assert
    assert f"{path}:2" in str(caught.value)


def test_missing_file_is_named(tmp_path: Path) -> None:
    # Prepare
    path = tmp_path / "absent.jsonl"

    # Execute
    with pytest.raises(DataError) as caught:
        load_examples(path)

    # Assert
    assert str(path) in str(caught.value)


def test_unsupported_suffix_is_refused(tmp_path: Path) -> None:
    # Prepare
    path = tmp_path / "rows.xlsx"
    path.write_text("text,label\nhello,greet\n")

    # Execute
    with pytest.raises(DataError) as caught:
        load_examples(path)

    # Assert
    assert "'.xlsx'" in str(caught.value)
    assert str(path) in str(caught.value)


def test_file_without_rows_is_refused(tmp_path: Path) -> None:
    # Prepare
    path = tmp_path / "rows.jsonl"
    path.write_text("\n")

    # Execute
    with pytest.raises(DataError) as caught:
        load_examples(path)

    # Assert
    assert str(path) in str(caught.value)


def test_unreadable_parquet_is_refused_naming_the_file(tmp_path: Path) -> None:
    # Prepare
    path = tmp_path / "rows.parquet"
    path.write_bytes(b"not parquet at all")

    # Execute
    with pytest.raises(DataError) as caught:
        load_examples(path)

    # Assert
    assert str(path) in str(caught.value)


@pytest.mark.parametrize(
    ("label", "expected"),
    [
        (1, "1"),
        (0, "0"),
        (-2, "-2"),
        (3.0, "3"),
        (2.5, "2.5"),
        (True, "1"),
        ("pos", "pos"),
    ],
)
def test_labels_come_back_as_decimal_strings(
    tmp_path: Path, label: object, expected: str
) -> None:
    # Prepare
    path = write_jsonl(tmp_path / "rows.jsonl", [{"text": "some text", "label": label}])

    # Execute
    (example,) = load_examples(path)

    # Assert
    assert example.label == expected


def test_parquet_integer_labels_come_back_as_decimal_strings(tmp_path: Path) -> None:
    # Prepare
    rows: list[dict[str, object]] = [
        {"text": "a", "label": 1},
        {"text": "b", "label": 0},
    ]
    path = _write_parquet(tmp_path / "rows.parquet", rows)

    # Execute
    examples = load_examples(path)

    # Assert
    assert [e.label for e in examples] == ["1", "0"]


def test_label_set_sorts_integers_numerically() -> None:
    # Prepare
    examples = [Example("t", label) for label in ("10", "2", "-1", "2", "1")]

    # Execute
    labels = label_set(examples)

    # Assert
    assert labels == ("-1", "1", "2", "10")


def test_label_set_sorts_text_labels_alphabetically() -> None:
    # Prepare
    examples = [Example("t", label) for label in ("pos", "neg", "10", "pos")]

    # Execute
    labels = label_set(examples)

    # Assert
    assert labels == ("10", "neg", "pos")


def test_encode_labels_maps_to_indices() -> None:
    # Prepare
    examples = [Example("t", label) for label in ("b", "a", "c", "a")]

    # Execute
    encoded = encode_labels(examples, ("a", "b", "c"))

    # Assert
    assert encoded == [1, 0, 2, 0]


def test_encode_labels_names_file_and_line_of_an_unknown_label(tmp_path: Path) -> None:
    # Prepare
    path = write_jsonl(
        tmp_path / "rows.jsonl",
        [{"text": "a", "label": "pos"}, {"text": "b", "label": "neutral"}],
    )
    examples = load_examples(path)

    # Execute
    with pytest.raises(DataError) as caught:
        encode_labels(examples, ("neg", "pos"))

    # Assert
    message = str(caught.value)
    assert f"{path}:2" in message
    assert "'neutral'" in message


def test_shared_sst2_dev_set_is_read() -> None:
    # Prepare
    path = shared_data("sst2", "dev.tsv")

    # Execute
    examples = load_examples(path, text_column="sentence", label_column="label")

    # Assert
    assert len(examples) == sum(1 for _ in path.open(encoding="utf-8")) - 1
    assert label_set(examples) == ("0", "1")


def _write_sites(directory: Path) -> list[Path]:
    """Two headerless ``.txt`` sites plus a ``.jsonl`` one, two rows each."""
    directory.mkdir(parents=True, exist_ok=True)
    (directory / "beta.txt").write_text("beta good\t1\nbeta bad\t0\n")
    (directory / "alpha.txt").write_text("alpha good\t1\nalpha bad\t0\n")
    gamma: list[dict[str, object]] = [
        {"text": "gamma good", "label": 1},
        {"text": "gamma bad", "label": 0},
    ]
    write_jsonl(directory / "gamma.jsonl", gamma)
    return [directory / "beta.txt", directory / "alpha.txt", directory / "gamma.jsonl"]


def test_headerless_txt_rows_are_read_as_text_and_label(tmp_path: Path) -> None:
    # Prepare
    path = tmp_path / "site_labelled.txt"
    path.write_text('He said "wow" and left.  \t1\n\n"Awful"\t0 \n')

    # Execute
    examples = load_examples(path)

    # Assert
    assert examples == [
        Example('He said "wow" and left.', "1"),
        Example('"Awful"', "0"),
    ]
    assert [e.where for e in examples] == [f"{path}:1", f"{path}:3"]


def test_txt_lines_end_only_at_newlines(tmp_path: Path) -> None:
    # Prepare: U+0085 (NEL) sits inside an IMDB sentence; Windows line endings
    path = tmp_path / "site.txt"
    path.write_bytes("The script is\x85was there a script?\t0\r\nfine\t1\r\n".encode())

    # Execute
    examples = load_examples(path)

    # Assert
    assert examples == [
        Example("The script is\x85was there a script?", "0"),
        Example("fine", "1"),
    ]


@pytest.mark.parametrize(
    ("line", "fields"),
    [("no tab at all", 1), ("a\tb\t1", 3), ("trailing tab\t1\t", 3)],
)
def test_txt_line_without_exactly_one_tab_names_the_line(
    tmp_path: Path, line: str, fields: int
) -> None:
    # Prepare
    path = tmp_path / "site.txt"
    path.write_text(f"good film\t1\n{line}\nbad film\t0\n")

    # Execute
    with pytest.raises(DataError) as caught:
        load_examples(path)

    # Assert
    message = str(caught.value)
    assert f"{path}:2" in message
    assert f"found {fields}" in message


def test_txt_line_with_an_empty_label_names_the_line(tmp_path: Path) -> None:
    # Prepare
    path = tmp_path / "site.txt"
    path.write_text("good film\t1\nbad film\t \n")

    # Execute
    with pytest.raises(DataError) as caught:
        load_examples(path)

    # Assert
    assert f"{path}:2" in str(caught.value)


def test_comma_separated_paths_are_concatenated_in_the_given_order(
    tmp_path: Path,
) -> None:
    # Prepare
    beta, alpha, gamma = _write_sites(tmp_path)

    # Execute
    examples = load_examples(f"{beta}, {alpha},{gamma}")

    # Assert
    assert [e.text for e in examples] == [
        "beta good",
        "beta bad",
        "alpha good",
        "alpha bad",
        "gamma good",
        "gamma bad",
    ]
    assert [e.extra["source"] for e in examples] == [
        "beta",
        "beta",
        "alpha",
        "alpha",
        "gamma",
        "gamma",
    ]


def test_glob_pattern_reads_its_matches_in_sorted_order(tmp_path: Path) -> None:
    # Prepare
    _write_sites(tmp_path)

    # Execute
    examples = load_examples(str(tmp_path / "*.txt"))

    # Assert
    assert [(e.extra["source"], e.label) for e in examples] == [
        ("alpha", "1"),
        ("alpha", "0"),
        ("beta", "1"),
        ("beta", "0"),
    ]


def test_file_named_twice_in_a_list_is_read_once(tmp_path: Path) -> None:
    # Prepare
    beta, _, _ = _write_sites(tmp_path)

    # Execute
    examples = load_examples(f"{beta},{tmp_path / '*.txt'}")

    # Assert
    assert [e.extra["source"] for e in examples] == ["beta"] * 2 + ["alpha"] * 2


def test_a_file_own_source_column_is_kept_in_a_list(tmp_path: Path) -> None:
    # Prepare
    own = write_jsonl(
        tmp_path / "own.jsonl", [{"text": "t", "label": "x", "source": "web"}]
    )
    (tmp_path / "plain.txt").write_text("u\tx\n")

    # Execute
    examples = load_examples(f"{own},{tmp_path / 'plain.txt'}")

    # Assert
    assert [e.extra["source"] for e in examples] == ["web", "plain"]


def test_clashing_stems_become_paths_below_the_common_folder(tmp_path: Path) -> None:
    # Prepare
    for site in ("site0", "site1"):
        (tmp_path / site).mkdir()
        (tmp_path / site / "train.txt").write_text(f"{site} row\t1\n")

    # Execute
    examples = load_examples(str(tmp_path / "site*" / "train.txt"))

    # Assert
    assert [e.extra["source"] for e in examples] == [
        "site0/train.txt",
        "site1/train.txt",
    ]


def test_single_path_with_a_comma_in_its_name_is_read_whole(tmp_path: Path) -> None:
    # Prepare
    path = write_jsonl(tmp_path / "a,b.jsonl", ROWS)

    # Execute
    examples = load_examples(str(path))

    # Assert
    assert examples == EXPECTED
    assert "source" not in examples[0].extra


def test_missing_file_in_a_list_is_named(tmp_path: Path) -> None:
    # Prepare
    beta, _, _ = _write_sites(tmp_path)
    absent = tmp_path / "absent.txt"

    # Execute
    with pytest.raises(DataError) as caught:
        load_examples(f"{beta},{absent}")

    # Assert
    assert f"{absent}: no such file" in str(caught.value)


def test_pattern_matching_no_file_is_named(tmp_path: Path) -> None:
    # Prepare
    _write_sites(tmp_path)
    pattern = str(tmp_path / "*.csv")

    # Execute
    with pytest.raises(DataError) as caught:
        load_examples(f"{tmp_path / '*.txt'},{pattern}")

    # Assert
    assert f"{pattern}: the pattern matches no file" in str(caught.value)


@pytest.mark.parametrize("spec", [",", " , "])
def test_list_naming_no_path_is_refused(spec: str) -> None:
    # Prepare / Execute
    with pytest.raises(DataError) as caught:
        load_examples(spec)

    # Assert
    assert "names no file" in str(caught.value)


def test_shared_sentiment_sites_are_read_one_source_each() -> None:
    # Prepare
    folder = shared_data("sentiment_labelled_sentences")

    # Execute
    examples = load_examples(str(folder / "*_labelled.txt"))

    # Assert
    counts: dict[str, int] = {}
    for example in examples:
        counts[example.extra["source"]] = counts.get(example.extra["source"], 0) + 1
    assert counts == {
        "amazon_cells_labelled": 1000,
        "imdb_labelled": 1000,
        "yelp_labelled": 1000,
    }
    assert {e.label for e in examples} == {"0", "1"}
    assert all(e.text == e.text.strip() for e in examples)
