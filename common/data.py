"""Reading labelled text rows from the file formats users have.

Every loader returns a list of :class:`Example` plus the extra columns of each row, and
every error names the file and, where there is one, the line or the column.
"""

from __future__ import annotations

import csv
import json
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

SUPPORTED_SUFFIXES = (".jsonl", ".json", ".csv", ".tsv", ".parquet")


class DataError(ValueError):
    """A data file is missing or malformed; the message names file, line or column."""


@dataclass(frozen=True)
class Example:
    """One labelled text.

    Attributes
    ----------
    text : str
        The input text.
    label : str
        The label as a string (numeric labels are kept as their decimal text).
    extra : dict[str, str]
        The row's other columns, e.g. ``domain`` for ``data.partition = column:domain``.
    where : str
        ``file:line`` (or ``file:row``) for error messages.
    """

    text: str
    label: str
    extra: dict[str, str] = field(default_factory=dict, compare=False)
    where: str = field(default="", compare=False)


def _as_label(value: Any) -> str:
    if isinstance(value, bool):
        return str(int(value))
    if isinstance(value, float) and value.is_integer():
        return str(int(value))
    return str(value)


def _records_to_examples(
    records: Iterable[tuple[str, Any]], path: Path, text_column: str, label_column: str
) -> list[Example]:
    examples: list[Example] = []
    for where, record in records:
        if not isinstance(record, dict):
            raise DataError(
                f"{where}: expected an object with named columns, got {record!r:.80}"
            )
        for column in (text_column, label_column):
            if column not in record:
                raise DataError(
                    f"{where}: no column '{column}' "
                    f"(columns: {', '.join(map(str, record))}); "
                    f"set data.text-column / data.label-column to the right names"
                )
        text, label = record[text_column], record[label_column]
        if not isinstance(text, str) or not text.strip():
            raise DataError(
                f"{where}: column '{text_column}' must be non-empty text, "
                f"got {text!r:.80}"
            )
        if label is None or (isinstance(label, str) and not label.strip()):
            raise DataError(f"{where}: column '{label_column}' is empty")
        extra = {
            str(k): _as_label(v)
            for k, v in record.items()
            if k not in (text_column, label_column)
        }
        examples.append(
            Example(text=text, label=_as_label(label), extra=extra, where=where)
        )
    if not examples:
        raise DataError(f"{path}: holds no rows")
    return examples


def _jsonl_records(path: Path) -> Iterable[tuple[str, Any]]:
    with path.open(encoding="utf-8-sig") as handle:
        for number, line in enumerate(handle, start=1):
            if not line.strip():
                continue
            try:
                yield f"{path}:{number}", json.loads(line)
            except json.JSONDecodeError as error:
                raise DataError(
                    f"{path}:{number}: not valid JSON ({error.msg})"
                ) from None


def _json_records(path: Path) -> Iterable[tuple[str, Any]]:
    try:
        document = json.loads(path.read_text(encoding="utf-8-sig"))
    except json.JSONDecodeError as error:
        raise DataError(
            f"{path}:{error.lineno}: not valid JSON ({error.msg})"
        ) from None
    if isinstance(document, dict) and isinstance(document.get("data"), list):
        document = document["data"]
    if not isinstance(document, list):
        raise DataError(
            f"{path}: expected a list of row objects (or {{'data': [...]}})"
        )
    return ((f"{path}:row {index}", row) for index, row in enumerate(document))


def _delimited_records(path: Path, delimiter: str) -> Iterable[tuple[str, Any]]:
    with path.open(encoding="utf-8-sig", newline="") as handle:
        # TSV has no quoting convention: a quote is text. CSV keeps its quoting rules.
        quoting = csv.QUOTE_NONE if delimiter == "\t" else csv.QUOTE_MINIMAL
        reader = csv.DictReader(handle, delimiter=delimiter, quoting=quoting)
        if reader.fieldnames is None:
            raise DataError(f"{path}: empty file; the first line must name the columns")
        for row in reader:
            if None in row or any(value is None for value in row.values()):
                raise DataError(
                    f"{path}:{reader.line_num}: expected {len(reader.fieldnames)} "
                    f"columns ({', '.join(reader.fieldnames)})"
                )
            yield f"{path}:{reader.line_num}", row


def _arrow_records(table: Any, source: Path) -> Iterable[tuple[str, Any]]:
    return (
        (f"{source}:row {index}", row) for index, row in enumerate(table.to_pylist())
    )


def _parquet_records(path: Path) -> Iterable[tuple[str, Any]]:
    import pyarrow.parquet as pq

    try:
        table = pq.read_table(path)
    except Exception as error:  # pyarrow raises several types for a bad file
        raise DataError(f"{path}: not a readable parquet file ({error})") from None
    return _arrow_records(table, path)


def _saved_dataset_records(path: Path) -> Iterable[tuple[str, Any]]:
    """Rows of a directory written by ``datasets.Dataset.save_to_disk``."""
    import pyarrow as pa

    shards = sorted(path.glob("data-*.arrow")) or sorted(path.glob("*.arrow"))
    if not shards:
        raise DataError(
            f"{path}: a directory must be written by datasets' save_to_disk "
            "(data-*.arrow files); for a DatasetDict point at one split's folder"
        )
    tables = []
    for shard in shards:
        try:
            with pa.memory_map(str(shard)) as source:
                tables.append(pa.ipc.open_stream(source).read_all())
        except pa.ArrowInvalid as error:
            raise DataError(f"{shard}: not a readable arrow shard ({error})") from None
    return _arrow_records(pa.concat_tables(tables), path)


def load_examples(
    path: str | Path, text_column: str = "text", label_column: str = "label"
) -> list[Example]:
    """Load labelled rows from a file or a ``save_to_disk`` directory.

    Parameters
    ----------
    path : str or Path
        A ``.jsonl``, ``.json``, ``.csv``, ``.tsv`` or ``.parquet`` file, or a
        directory written by ``datasets.save_to_disk``.
    text_column, label_column : str
        Column names of the text and the label.

    Returns
    -------
    list[Example]

    Raises
    ------
    DataError
        When the file is missing, malformed, empty, or lacks a named column.
    """
    source = Path(path).expanduser()
    if not source.exists():
        raise DataError(
            f"{source}: no such file or directory (check data.path / data.test-path)"
        )
    if source.is_dir():
        records = _saved_dataset_records(source)
    else:
        suffix = source.suffix.lower()
        readers = {
            ".jsonl": _jsonl_records,
            ".json": _json_records,
            ".csv": lambda p: _delimited_records(p, ","),
            ".tsv": lambda p: _delimited_records(p, "\t"),
            ".parquet": _parquet_records,
        }
        if suffix not in readers:
            raise DataError(
                f"{source}: unsupported format '{suffix}'; use one of "
                f"{', '.join(SUPPORTED_SUFFIXES)} or a save_to_disk directory"
            )
        records = readers[suffix](source)
    return _records_to_examples(records, source, text_column, label_column)


def label_set(examples: Sequence[Example]) -> tuple[str, ...]:
    """Sorted distinct labels, numerically when every label is an integer."""
    labels = {example.label for example in examples}
    if all(label.lstrip("-").isdigit() for label in labels):
        return tuple(sorted(labels, key=int))
    return tuple(sorted(labels))


def encode_labels(examples: Sequence[Example], labels: Sequence[str]) -> list[int]:
    """Map each example's label to its index in ``labels``.

    Raises
    ------
    DataError
        For the first example whose label is outside ``labels``, naming its line.
    """
    index = {label: position for position, label in enumerate(labels)}
    encoded = []
    for example in examples:
        if example.label not in index:
            shown = ", ".join(list(labels)[:10]) + (", ..." if len(labels) > 10 else "")
            raise DataError(
                f"{example.where}: label '{example.label}' is not in the run's "
                "label map "
                f"({shown}); add it to data.labels or to the coordinator's test set"
            )
        encoded.append(index[example.label])
    return encoded
