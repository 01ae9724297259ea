"""Splitting rows into clients: IID, Dirichlet label skew, one client per column
value, or one of Flower Datasets' partitioners (:mod:`common.flower_partitions`).

Every function is pure and seeded: the coordinator and each simulated client compute
the same split independently, so no row ever travels between them.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import numpy as np

from common.data import DataError, Example
from common.flower_partitions import OptionValue, column_values, flower_partition


def holdout_split(
    examples: Sequence[Example], fraction: float, seed: int
) -> tuple[list[Example], list[Example]]:
    """Split off a seeded held-out slice for the coordinator's evaluation.

    Returns
    -------
    (train, held_out) : tuple of lists
    """
    order = np.random.default_rng(seed).permutation(len(examples))
    cut = max(1, round(len(examples) * fraction))
    held_out = [examples[i] for i in sorted(order[:cut])]
    train = [examples[i] for i in sorted(order[cut:])]
    return train, held_out


def iid_partition(num_rows: int, num_clients: int, seed: int) -> list[list[int]]:
    """Shuffle row indices and deal them into ``num_clients`` near-equal parts."""
    order = np.random.default_rng(seed).permutation(num_rows)
    return [sorted(part.tolist()) for part in np.array_split(order, num_clients)]


def dirichlet_partition(
    labels: Sequence[str], num_clients: int, alpha: float, seed: int
) -> list[list[int]]:
    """Label-skewed split: each label's rows go to clients in Dirichlet(alpha) shares.

    Smaller ``alpha`` gives more skew. Every client receives at least one row when there
    are at least as many rows as clients (a row is moved from the largest client).
    """
    rng = np.random.default_rng(seed)
    parts: list[list[int]] = [[] for _ in range(num_clients)]
    for label in sorted(set(labels)):
        rows = np.array([i for i, value in enumerate(labels) if value == label])
        rng.shuffle(rows)
        shares = rng.dirichlet(np.full(num_clients, alpha))
        cuts = (np.cumsum(shares)[:-1] * len(rows)).astype(int)
        for client, chunk in enumerate(np.split(rows, cuts)):
            parts[client].extend(chunk.tolist())
    for client in range(num_clients):
        if not parts[client]:
            donor = max(range(num_clients), key=lambda c: len(parts[c]))
            if len(parts[donor]) > 1:
                parts[client].append(parts[donor].pop())
    return [sorted(part) for part in parts]


def column_partition(
    examples: Sequence[Example], column: str
) -> tuple[list[str], list[list[int]]]:
    """One client per distinct value of ``column``, in sorted value order.

    Raises
    ------
    DataError
        When a row lacks the column, naming the row.
    """
    groups: dict[str, list[int]] = {}
    for index, example in enumerate(examples):
        if column not in example.extra:
            raise DataError(
                f"{example.where}: no column '{column}' to partition by "
                f"(data.partition = column:{column}); use iid or dirichlet instead"
            )
        groups.setdefault(example.extra[column], []).append(index)
    names = sorted(groups)
    return names, [groups[name] for name in names]


def partition_indices(
    examples: Sequence[Example],
    kind: str,
    num_clients: int,
    seed: int,
    dirichlet_alpha: float = 0.5,
    options: Mapping[str, OptionValue] | None = None,
) -> list[list[int]]:
    """Row indices of every client for ``data.partition = kind``.

    For ``column:<name>`` each distinct value is one client; with fewer clients than
    values, each client holds several whole values (never more clients than values).
    ``flwr:<name>`` is Flower Datasets' partitioner of that name, called with
    ``options`` (``data.partition-args``).

    Raises
    ------
    DataError
        When a client would receive no rows, or there are more clients than values
        of the partition column.
    """
    if kind == "iid":
        parts = iid_partition(len(examples), num_clients, seed)
    elif kind == "dirichlet":
        parts = dirichlet_partition(
            [e.label for e in examples], num_clients, dirichlet_alpha, seed
        )
    elif kind.startswith("column:"):
        column = kind.removeprefix("column:")
        names, groups = column_partition(examples, column)
        if num_clients > len(groups):
            raise DataError(
                f"data.partition = {kind} gives {len(groups)} clients "
                f"({', '.join(names[:12])}) but the run has {num_clients}; run "
                f"{len(groups)} clients "
                "(sim.num-clients, or num-supernodes for flwr run)"
            )
        # Fewer clients than values: deal the values out, so client i holds values
        # i, i + n, i + 2n, ... and each value still lives at exactly one client.
        parts = [
            sorted(i for group in groups[client::num_clients] for i in group)
            for client in range(num_clients)
        ]
    elif kind.startswith("flwr:"):
        parts = flower_partition(
            examples, kind, num_clients, seed, options or {}, dirichlet_alpha
        )
    else:
        raise DataError(
            f"data.partition: unknown kind {kind!r}; "
            "use iid, dirichlet, column:<name> or flwr:<name>"
        )
    for client, part in enumerate(parts):
        if not part:
            raise DataError(
                f"client {client} receives no rows under data.partition = {kind} "
                f"({len(examples)} rows, {num_clients} clients); use fewer clients "
                "or a larger data.dirichlet-alpha"
            )
    return parts


def split_like_training(
    train: Sequence[Example],
    test: Sequence[Example],
    kind: str,
    num_clients: int,
    seed: int,
) -> list[list[int]]:
    """Row indices of ``test`` for each client, split as ``train`` is split.

    ``column:<name>``: each client gets the test rows of the column values it trains
    on, so the clients' test rows together are the test rows of the training values
    (a value only the test rows have goes to no client). ``iid`` and ``dirichlet``:
    the test rows are dealt out IID (seeded), so every client's share follows the
    whole test set's distribution and together they are exactly the test set; a
    Dirichlet skew is not copied onto the test rows, whose shares would then measure
    the skew rather than the model.

    Raises
    ------
    DataError
        When a row lacks the partition column, naming the row.
    """
    if not kind.startswith("column:"):
        return iid_partition(len(test), num_clients, seed)
    column = kind.removeprefix("column:")
    names, _ = column_partition(train, column)
    owner = {name: position % num_clients for position, name in enumerate(names)}
    test_names, groups = column_partition(test, column) if test else ([], [])
    parts: list[list[int]] = [[] for _ in range(num_clients)]
    for name, group in zip(test_names, groups, strict=True):
        if name in owner:
            parts[owner[name]].extend(group)
    return [sorted(part) for part in parts]


def count_column_values(examples: Sequence[Example], column: str) -> int:
    """Number of distinct values of ``column`` (the client count of a column split);
    ``label`` counts the labels."""
    return len(set(column_values(examples, column)))
