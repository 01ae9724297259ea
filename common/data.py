"""Reading labelled text rows from the file formats users have.

Every loader returns a list of :class:`Example` plus the extra columns of each row, and
every error names the file and, where there is one, the line or the column. A path may
also name several files (a comma-separated list and glob patterns); their rows are
concatenated and each row records its file in the ``source`` column.
"""

from __future__ import annotations

import csv
import glob
import json
import os
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

SUPPORTED_SUFFIXES = (".jsonl", ".json", ".csv", ".tsv", ".txt", ".parquet")
SOURCE_COLUMN = "source"
_GLOB_CHARACTERS = frozenset("*?[")


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
    records: Iterable[tuple[str, Any]],
    path: Path,
    text_column: str,
    label_column: str | None,
    source: str | None = None,
) -> list[Example]:
    examples: list[Example] = []
    # Without a label column (causal language model text) every label is "".
    columns = (text_column, label_column) if label_column else (text_column,)
    for where, record in records:
        if not isinstance(record, dict):
            raise DataError(
                f"{where}: expected an object with named columns, got {record!r:.80}"
            )
        for column in columns:
            if column not in record:
                raise DataError(
                    f"{where}: no column '{column}' "
                    f"(columns: {', '.join(map(str, record))}); "
                    "set the key that names it (data.text-column, data.label-column; "
                    "data.response-column or data.image-column for those tasks)"
                )
        text = record[text_column]
        label = record[label_column] if label_column else ""
        if not isinstance(text, str) or not text.strip():
            raise DataError(
                f"{where}: column '{text_column}' must be non-empty text, "
                f"got {text!r:.80}"
            )
        if label_column and (
            label is None or (isinstance(label, str) and not label.strip())
        ):
            raise DataError(f"{where}: column '{label_column}' is empty")
        extra = {str(k): _as_label(v) for k, v in record.items() if k not in columns}
        if source is not None and SOURCE_COLUMN not in record:
            # A file's own ``source`` column wins: it was there before the list was.
            extra[SOURCE_COLUMN] = source
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


def _headerless_records(path: Path) -> Iterable[tuple[str, Any]]:
    """Rows of a headerless ``text<TAB>label`` file, read as columns text and label.

    Lines end at ``\\n`` only (a ``\\r`` before it is dropped): the UCI sentiment
    files hold U+0085 inside sentences, which ``str.splitlines`` would take for a line
    break. Quotes are text, and whitespace around each field (the IMDB file pads every
    sentence) is dropped.
    """
    with path.open(encoding="utf-8-sig", newline="\n") as handle:
        for number, raw in enumerate(handle, start=1):
            line = raw.rstrip("\r\n")
            if not line.strip():
                continue
            fields = line.split("\t")
            if len(fields) != 2:
                raise DataError(
                    f"{path}:{number}: expected 2 tab-separated fields (text, label), "
                    f"found {len(fields)}; a .txt file holds headerless "
                    "'sentence<TAB>label' lines (for other layouts use a .tsv file "
                    "whose first line names the columns)"
                )
            text, label = (value.strip() for value in fields)
            yield f"{path}:{number}", {"text": text, "label": label}


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


def _names_one_path(spec: str | Path) -> bool:
    """Whether ``spec`` is itself an existing file or folder (not a list or pattern)."""
    return Path(spec).expanduser().exists()


def resolve_paths(spec: str | Path) -> list[Path]:
    """The files and ``save_to_disk`` folders that ``data.path`` names.

    Parameters
    ----------
    spec : str or Path
        One path, or a comma-separated list whose entries are paths or glob patterns
        (``sites/*.txt``; ``**`` descends into folders). A path that exists as
        written is taken whole, even if it holds a comma or a glob character.

    Returns
    -------
    list[Path]
        In the order given, each pattern's matches sorted by name; a file named twice
        is kept at its first place.

    Raises
    ------
    DataError
        When the spec names nothing, a path is missing or a pattern matches no file.
    """
    if _names_one_path(spec):
        return [Path(spec).expanduser()]
    entries = [entry.strip() for entry in str(spec).split(",") if entry.strip()]
    if not entries:
        raise DataError(
            f"'{spec}' names no file; give a path, a comma-separated list of paths or "
            "a glob pattern (data.path / data.test-path)"
        )
    files: list[Path] = []
    seen: set[str] = set()
    for entry in entries:
        path = Path(entry).expanduser()
        where = "" if path.is_absolute() else f"; relative to {Path.cwd()}"
        if path.exists():
            matches = [path]
        elif _GLOB_CHARACTERS & set(entry):
            matches = [Path(m) for m in sorted(glob.glob(str(path), recursive=True))]
            if not matches:
                raise DataError(
                    f"{entry}: the pattern matches no file (check data.path / "
                    f"data.test-path{where})"
                )
        else:
            raise DataError(
                f"{path}: no such file or directory (check data.path / "
                f"data.test-path{where})"
            )
        for match in matches:
            key = os.path.abspath(match)
            if key not in seen:
                seen.add(key)
                files.append(match)
    return files


def source_names(files: Sequence[Path]) -> list[str]:
    """Each file's stem; where two stems clash, every file's path below their common
    folder, so that ``column:source`` never merges two sites by accident."""
    stems = [file.stem for file in files]
    if len(set(stems)) == len(stems):
        return stems
    absolute = [Path(os.path.abspath(file)) for file in files]
    base = os.path.commonpath([str(file.parent) for file in absolute])
    return [file.relative_to(base).as_posix() for file in absolute]


def _load_file(
    source: Path, text_column: str, label_column: str | None, source_name: str | None
) -> list[Example]:
    if source.is_dir():
        records = _saved_dataset_records(source)
    else:
        suffix = source.suffix.lower()
        readers = {
            ".jsonl": _jsonl_records,
            ".json": _json_records,
            ".csv": lambda p: _delimited_records(p, ","),
            ".tsv": lambda p: _delimited_records(p, "\t"),
            ".txt": _headerless_records,
            ".parquet": _parquet_records,
        }
        if suffix not in readers:
            raise DataError(
                f"{source}: unsupported format '{suffix}'; use one of "
                f"{', '.join(SUPPORTED_SUFFIXES)} or a save_to_disk directory"
            )
        records = readers[suffix](source)
    return _records_to_examples(records, source, text_column, label_column, source_name)


def load_examples(
    path: str | Path, text_column: str = "text", label_column: str | None = "label"
) -> list[Example]:
    """Load labelled rows from one or several files or ``save_to_disk`` directories.

    Parameters
    ----------
    path : str or Path
        A ``.jsonl``, ``.json``, ``.csv``, ``.tsv``, ``.txt`` (headerless
        ``text<TAB>label`` lines) or ``.parquet`` file, or a directory written by
        ``datasets.save_to_disk``; or a comma-separated list of such paths and glob
        patterns (see :func:`resolve_paths`).
    text_column, label_column : str
        Column names of the text and the label; ``label_column = None`` reads
        unlabelled text (every label is ``""``).

    Returns
    -------
    list[Example]
        The rows of every file in turn. For a list or a pattern each row's ``extra``
        also holds ``source``: its file's stem (e.g. ``yelp_labelled``), unless the
        file has a ``source`` column of its own. A single path adds no column.

    Raises
    ------
    DataError
        When a file is missing, malformed, empty, or lacks a named column, or a
        pattern matches no file.
    """
    files = resolve_paths(path)
    if _names_one_path(path):
        return _load_file(files[0], text_column, label_column, None)
    examples: list[Example] = []
    for file, name in zip(files, source_names(files), strict=True):
        examples.extend(_load_file(file, text_column, label_column, name))
    return examples


def label_set(examples: Sequence[Example]) -> tuple[str, ...]:
    """Sorted distinct labels, numerically when every label is an integer."""
    labels = {example.label for example in examples}
    if all(label.lstrip("-").isdigit() for label in labels):
        return tuple(sorted(labels, key=int))
    return tuple(sorted(labels))


def untrained_labels(
    evaluation: Sequence[Example], train: Iterable[Example]
) -> dict[str, str]:
    """Labels of the evaluation rows that no training row has, each with where it
    first appears (``file:line``), in label order: no client can learn them."""
    trained = {example.label for example in train}
    first: dict[str, str] = {}
    for example in evaluation:
        if example.label not in trained:
            first.setdefault(example.label, example.where)
    return {label: first[label] for label in label_set(evaluation) if label in first}


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
