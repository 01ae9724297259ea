"""Flower Datasets' partitioners (``flwr-datasets``) over fedgraft's rows.

``data.partition = flwr:<name>`` picks one, ``data.partition-args`` gives its
keyword arguments as ``key=value`` pairs separated by commas::

    data.partition = "flwr:pathological"
    data.partition-args = "num_classes_per_partition=2"

The rows go to Flower as a table of their row index and the partition column (the
label unless ``partition_by`` names another column), shuffled by the run seed first,
so that every partitioner is a pure function of the seed, as fedgraft's own are (the
size-based ones, linear, square and exponential, take contiguous slices).
``flwr:natural-id`` gives one client per value of ``partition_by``, in the order each
value first appears in the data.
``num_partitions`` and ``seed`` come from the run (``sim.num-clients``, ``seed``).
"""

from __future__ import annotations

import importlib
import importlib.util
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from common.data import DataError, Example

PREFIX = "flwr:"
#: The package and the extra that brings it.
PACKAGE = "flwr_datasets"
EXTRA = "partitioners"
#: ``partition_by = label`` (the default) partitions by each row's label.
LABEL = "label"
_ROW = "row"

OptionValue = bool | int | float | str


@dataclass(frozen=True)
class FlowerPartitioner:
    """How fedgraft calls one of Flower Datasets' partitioners.

    Attributes
    ----------
    class_name : str
        In ``flwr_datasets.partitioner``.
    options : tuple[str, ...]
        The keyword arguments a user may give in ``data.partition-args``.
    required : tuple[str, ...]
        Those without a default.
    by_column : bool
        Takes ``partition_by`` (default: the label).
    seeded : bool
        Takes the run seed.
    counts_clients : bool
        One client per value of the column (natural id), not ``sim.num-clients``.
    """

    class_name: str
    options: tuple[str, ...] = ()
    required: tuple[str, ...] = ()
    by_column: bool = False
    seeded: bool = False
    counts_clients: bool = False


PARTITIONERS: dict[str, FlowerPartitioner] = {
    "iid": FlowerPartitioner("IidPartitioner"),
    "dirichlet": FlowerPartitioner(
        "DirichletPartitioner",
        ("alpha", "min_partition_size", "self_balancing", "shuffle"),
        by_column=True,
        seeded=True,
    ),
    "pathological": FlowerPartitioner(
        "PathologicalPartitioner",
        ("num_classes_per_partition", "class_assignment_mode", "shuffle"),
        required=("num_classes_per_partition",),
        by_column=True,
        seeded=True,
    ),
    "shard": FlowerPartitioner(
        "ShardPartitioner",
        ("num_shards_per_partition", "shard_size", "keep_incomplete_shard", "shuffle"),
        by_column=True,
        seeded=True,
    ),
    "linear": FlowerPartitioner("LinearPartitioner"),
    "square": FlowerPartitioner("SquarePartitioner"),
    "exponential": FlowerPartitioner("ExponentialPartitioner"),
    "natural-id": FlowerPartitioner(
        "NaturalIdPartitioner", by_column=True, counts_clients=True
    ),
}


def _parse_value(text: str) -> OptionValue:
    lowered = text.lower()
    if lowered in ("true", "false"):
        return lowered == "true"
    for kind in (int, float):
        try:
            return kind(text)
        except ValueError:
            pass
    return text


def parse_options(text: str) -> dict[str, OptionValue]:
    """``"a=2,b=x"`` as ``{"a": 2, "b": "x"}`` (ints, floats and true/false are
    converted; anything else stays text).

    Raises
    ------
    ValueError
        For an entry without ``=`` or a key given twice, naming the entry.
    """
    options: dict[str, OptionValue] = {}
    for entry in (part.strip() for part in text.split(",")):
        if not entry:
            continue
        key, sep, value = entry.partition("=")
        key = key.strip()
        if not sep or not key or not value.strip():
            raise ValueError(f"entry {entry!r} is not key=value")
        if key in options:
            raise ValueError(f"{key} is given twice")
        options[key] = _parse_value(value.strip())
    return options


def partitioner_of(kind: str) -> FlowerPartitioner | None:
    """The Flower partitioner ``data.partition = kind`` names, or ``None`` when
    ``kind`` is not ``flwr:<name>``.

    Raises
    ------
    ValueError
        For ``flwr:<name>`` with an unknown name, listing the known ones.
    """
    if not kind.startswith(PREFIX):
        return None
    name = kind.removeprefix(PREFIX)
    if name not in PARTITIONERS:
        raise ValueError(
            f"unknown Flower Datasets partitioner {name!r}; use flwr: with one of "
            f"{', '.join(PARTITIONERS)}"
        )
    return PARTITIONERS[name]


def check_options(kind: str, options: Mapping[str, OptionValue]) -> None:
    """Refuse options ``flwr:<name>`` does not take, or a required one missing.

    Raises
    ------
    ValueError
        Naming the option and the accepted ones.
    """
    spec = partitioner_of(kind)
    if spec is None:
        if options:
            raise ValueError(f"is read only by flwr:<name> partitions, not {kind}")
        return
    accepted = (*spec.options, *(("partition_by",) if spec.by_column else ()))
    for key in options:
        if key not in accepted:
            raise ValueError(
                f"{kind} takes no option {key!r} "
                f"(it takes: {', '.join(accepted) or 'none'}; num_partitions and "
                "seed come from sim.num-clients and seed)"
            )
    for key in spec.required:
        if key not in options:
            raise ValueError(f"{kind} needs {key}, e.g. {key}=2")


def partition_column(kind: str, options: Mapping[str, OptionValue]) -> str | None:
    """The column whose values are the clients (``flwr:natural-id``), else ``None``."""
    spec = partitioner_of(kind)
    if spec is None or not spec.counts_clients:
        return None
    return str(options.get("partition_by", LABEL))


def column_values(examples: Sequence[Example], column: str) -> list[str]:
    """Each row's value of ``column`` (``label``: the row's label).

    Raises
    ------
    DataError
        When a row lacks the column, naming the row.
    """
    if column == LABEL:
        return [example.label for example in examples]
    values = []
    for example in examples:
        if column not in example.extra:
            raise DataError(
                f"{example.where}: no column '{column}' to partition by (see "
                "data.partition and data.partition-args); use iid or dirichlet instead"
            )
        values.append(example.extra[column])
    return values


def missing_package() -> str | None:
    """Why ``flwr:<name>`` cannot run here (Flower Datasets is not installed), or
    ``None``."""
    if importlib.util.find_spec(PACKAGE) is not None:
        return None
    return (
        "flwr:<name> needs Flower Datasets, which is not installed; install the "
        f"extra: pip install 'fedgraft[{EXTRA}]'"
    )


def _partitioner_module() -> Any:
    problem = missing_package()
    if problem is not None:
        raise DataError(f"data.partition = {problem}")
    return importlib.import_module(f"{PACKAGE}.partitioner")


def _table(examples: Sequence[Example], column: str, seed: int | None) -> Any:
    """The rows as a ``datasets.Dataset`` of their index and ``column``, in an order
    shuffled by ``seed`` (``None``: file order)."""
    import datasets

    order = (
        np.arange(len(examples))
        if seed is None
        else np.random.default_rng(seed).permutation(len(examples))
    )
    values = column_values(examples, column)
    return datasets.Dataset.from_dict(
        {_ROW: order.tolist(), column: [values[i] for i in order]}
    )


def flower_partition(
    examples: Sequence[Example],
    kind: str,
    num_clients: int,
    seed: int,
    options: Mapping[str, OptionValue],
    dirichlet_alpha: float,
) -> list[list[int]]:
    """Row indices of every client under Flower Datasets' partitioner ``kind``.

    Parameters
    ----------
    kind : str
        ``flwr:<name>``.
    options : Mapping
        ``data.partition-args``, parsed.
    dirichlet_alpha : float
        ``alpha`` of ``flwr:dirichlet`` when the options give none.

    Raises
    ------
    DataError
        When Flower Datasets is missing, a row lacks the column, the partitioner
        refuses the rows or settings (its reason quoted), or a natural-id split gives
        another number of clients than the run has.
    """
    spec = partitioner_of(kind)
    assert spec is not None, kind
    column = str(options.get("partition_by", LABEL))
    arguments: dict[str, Any] = {**options}
    if spec.by_column:
        arguments["partition_by"] = column
    if not spec.counts_clients:
        arguments["num_partitions"] = num_clients
    if spec.seeded:
        arguments["seed"] = seed
    if kind == f"{PREFIX}dirichlet":
        arguments.setdefault("alpha", dirichlet_alpha)
    partitioner = getattr(_partitioner_module(), spec.class_name)
    try:
        split = partitioner(**arguments)
        # A natural-id split needs no shuffle: its clients follow the file's order.
        split.dataset = _table(examples, column, None if spec.counts_clients else seed)
        parts = [
            sorted(split.load_partition(i)[_ROW]) for i in range(split.num_partitions)
        ]
    except ValueError as error:
        raise DataError(
            f"data.partition = {kind} refused {len(examples)} rows for "
            f"{num_clients} clients: {error}"
        ) from None
    if len(parts) != num_clients:
        raise DataError(
            f"data.partition = {kind} gives {len(parts)} clients (one per value of "
            f"'{column}') but the run has {num_clients}; run {len(parts)} clients "
            "(sim.num-clients, or num-supernodes for flwr run)"
        )
    return parts
