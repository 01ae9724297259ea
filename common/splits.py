"""Which rows each party sees: a client's training rows and the coordinator's test rows.

The rules, shared by simulation, deployment and the centralised baseline:

- ``data.path`` empty: the built-in demo corpus (its own train and test rows), in a
  simulation only: a deployed coordinator without data keys holds no rows, and its
  label map must be declared (:func:`run_labels`);
- ``data.path`` set: its rows are the training pool; the coordinator evaluates on
  ``data.test-path``, or, when that is empty, on a seeded held-out slice of the pool
  that no client trains on;
- a SuperNode whose node config names ``data-path`` trains on that whole file (less
  a held-out slice it evaluates on, when the sites evaluate and it has no
  ``eval-path``); otherwise (simulation) it takes its ``partition-id`` share of the
  pool, and evaluates on its share of the coordinator's test rows, split as the pool
  is (:func:`site_evaluation_rows`);
- any of these paths may list several files (commas, glob patterns): their rows are
  concatenated, each with its file's stem in ``source``, so ``data.partition =
  column:source`` gives one client per file (see :func:`common.data.load_examples`).
"""

from __future__ import annotations

import json
import logging
import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from common.config import DEFAULTS, DataConfig
from common.data import DataError, Example, label_set
from common.demo import demo_test_examples, demo_train_examples
from common.partition import (
    count_column_values,
    holdout_split,
    partition_indices,
    split_like_training,
)
from common.tasks.registry import task_named

log = logging.getLogger(__name__)

#: ``column:domain``: one client per domain, as the demo corpus is laid out.
DEFAULT_PARTITION = str(DEFAULTS["data.partition"])


def falls_back_to_iid(data: DataConfig, train: Sequence[Example]) -> bool:
    """Whether the default partition, ``column:domain``, meets rows of which none has
    that column: a user's labelled file, then split iid instead of refused."""
    column = DEFAULT_PARTITION.removeprefix("column:")
    return data.partition == DEFAULT_PARTITION and not any(
        column in example.extra for example in train
    )


def partition_kind(data: DataConfig, train: Sequence[Example]) -> str:
    """``data.partition`` as applied to ``train`` (see :func:`falls_back_to_iid`)."""
    return "iid" if falls_back_to_iid(data, train) else data.partition


def read_rows(path: str, data: DataConfig) -> list[Example]:
    """The rows of ``path`` as ``data.task`` reads them (:meth:`Task.read_rows
    <common.tasks.base.Task.read_rows>`), cached per process."""
    return task_named(data.task).read_rows(path, data)


@dataclass(frozen=True)
class Pools:
    """The training pool and the coordinator's evaluation rows of a run."""

    train: list[Example]
    test: list[Example]


def pools(data: DataConfig, seed: int) -> Pools:
    """Training pool and evaluation rows for a data config (see module docstring)."""
    if not data.path:
        train = demo_train_examples(seed)
        test = (
            read_rows(data.test_path, data)
            if data.test_path
            else demo_test_examples(seed)
        )
        return Pools(train, test)
    everything = read_rows(data.path, data)
    if data.test_path:
        return Pools(everything, read_rows(data.test_path, data))
    train, held_out = holdout_split(everything, data.holdout_fraction, seed)
    return Pools(train, held_out)


def evaluation_examples(
    data: DataConfig, seed: int, demo: bool = True
) -> list[Example]:
    """The rows the coordinator evaluates on, without reading ``data.path`` if
    avoidable; none when it holds no data (``demo = False``: a deployment never
    falls back to the demo corpus)."""
    if data.test_path:
        return read_rows(data.test_path, data)
    if not (data.path or demo):
        return []
    return pools(data, seed).test


def coordinator_holds_data(data: DataConfig, demo: bool = True) -> bool:
    """Whether the coordinator has evaluation rows of its own: a data key, or, in a
    simulation, the demo corpus."""
    return bool(data.test_path or data.path or demo)


def declared_labels(data: DataConfig, descriptions_file: str = "") -> tuple[str, ...]:
    """The label map as declared: ``data.labels`` (a comma list, or one file with
    one label a line), else the labels ``head.label-descriptions`` describes, in
    file order; empty when neither is set.

    Raises
    ------
    DataError
        When the file is unreadable or declares no label, naming the file and key.
    """
    if len(data.labels) == 1 and os.path.isfile(data.labels[0]):
        path = data.labels[0]
        lines = Path(path).read_text(encoding="utf-8").splitlines()
        labels = tuple(line.strip() for line in lines if line.strip())
        if not labels:
            raise DataError(f"{path}: no label in it (config key data.labels)")
        return labels
    if data.labels or not descriptions_file:
        return data.labels
    try:
        described = json.loads(Path(descriptions_file).read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError) as error:
        raise DataError(
            f"{descriptions_file}: cannot read the label descriptions ({error}); "
            "config key head.label-descriptions"
        ) from None
    if not isinstance(described, dict) or not described:
        raise DataError(
            f"{descriptions_file}: expected a JSON object mapping each label to its "
            "description (config key head.label-descriptions)"
        )
    return tuple(str(label) for label in described)


def run_labels(
    data: DataConfig,
    seed: int,
    descriptions_file: str = "",
    demo: bool = True,
) -> tuple[str, ...]:
    """The run's label map: declared (:func:`declared_labels`), else every label the
    coordinator sees; none for a causal language model.

    Raises
    ------
    DataError
        When nothing declares the map and the coordinator holds no data (a
        deployment without data keys), naming the keys to set.
    """
    if not task_named(data.task).has_labels:
        return ()
    declared = declared_labels(data, descriptions_file)
    if declared:
        return declared
    if not coordinator_holds_data(data, demo):
        raise DataError(
            "the coordinator holds no data to read the label map from: declare it "
            "with data.labels (a comma list, or a file with one label a line) or "
            "head.label-descriptions"
        )
    if data.test_path and data.path:
        # Both sides exist: the map must cover training labels missing from the test
        # set.
        both = pools(data, seed)
        return label_set([*both.train, *both.test])
    if data.test_path:
        return label_set(evaluation_examples(data, seed))
    both = pools(data, seed)
    return label_set([*both.train, *both.test])


def client_examples(
    data: DataConfig,
    seed: int,
    partition_id: int,
    num_partitions: int,
    site_data_path: str = "",
    hold_out: bool = False,
) -> list[Example]:
    """The training rows of one client.

    Parameters
    ----------
    data : DataConfig
        The run's data settings (sent by the coordinator).
    seed : int
        The run seed; partitions are a pure function of it.
    partition_id, num_partitions : int
        This client's share in simulation.
    site_data_path : str
        A deployed site's own file (node config ``data-path``); overrides the pool.
    hold_out : bool
        The site evaluates on a held-out slice of that file (it has no
        ``eval-path``): it trains on the rest (see :func:`site_evaluation_rows`).

    Raises
    ------
    DataError
        When the file cannot be read or the client would get no rows.
    """
    if site_data_path:
        rows = read_rows(site_data_path, data)
        return holdout_split(rows, data.holdout_fraction, seed)[0] if hold_out else rows
    if not 0 <= partition_id < num_partitions:
        raise DataError(
            f"partition-id {partition_id} is outside 0..{num_partitions - 1}; "
            "check the node config"
        )
    return all_client_examples(data, seed, num_partitions)[partition_id]


def site_evaluation_rows(
    data: DataConfig,
    seed: int,
    partition_id: int,
    num_partitions: int,
    site_data_path: str = "",
    eval_path: str = "",
) -> list[Example]:
    """The rows a site scores the global model on.

    Its own file (node config ``eval-path``); else, for a site with its own data, a
    seeded held-out slice of it (``data.holdout-fraction``) that
    :func:`client_examples` leaves out of training; else (simulation) its share of
    the coordinator's evaluation rows, split as the training pool is
    (:func:`common.partition.split_like_training`).
    """
    if eval_path:
        return read_rows(eval_path, data)
    if site_data_path:
        rows = read_rows(site_data_path, data)
        return holdout_split(rows, data.holdout_fraction, seed)[1]
    both = pools(data, seed)
    parts = split_like_training(
        both.train, both.test, data.partition, num_partitions, seed
    )
    return [both.test[i] for i in parts[partition_id]]


def checked_site_rows(
    train: Sequence[Example],
    evaluation: Sequence[Example],
    labels: Sequence[str],
) -> list[Example]:
    """Check a site's rows against the declared label map; its evaluation rows
    that the map can score.

    A training label outside the map stops the site; evaluation rows with such a
    label are only logged and left out (they cannot be scored).

    Raises
    ------
    DataError
        Naming every undeclared training label and the keys that declare the map.
    """
    if not labels:  # a causal language model has no label map
        return list(evaluation)
    declared = set(labels)
    first: dict[str, str] = {}
    for example in train:
        if example.label not in declared:
            first.setdefault(example.label, example.where)
    if first:
        undeclared = sorted(first)
        raise DataError(
            f"this site's rows have labels the run does not declare: "
            f"{', '.join(undeclared[:20])}"
            + (f" (and {len(undeclared) - 20} more)" if len(undeclared) > 20 else "")
            + f" (first at {first[undeclared[0]]}); add them to data.labels (or "
            "head.label-descriptions) at the coordinator, or remove those rows"
        )
    unknown = sorted({e.label for e in evaluation} - declared)
    if unknown:
        log.warning(
            "evaluation rows with labels the run does not declare are left out: %s",
            ", ".join(unknown[:20]),
        )
    return [e for e in evaluation if e.label in declared]


def all_client_examples(
    data: DataConfig, seed: int, num_clients: int
) -> list[list[Example]]:
    """Every simulated client's rows, in partition order (for baselines and checks)."""
    train = pools(data, seed).train
    parts = partition_indices(
        train,
        partition_kind(data, train),
        num_clients,
        seed,
        data.dirichlet_alpha,
        data.partition_options,
    )
    return [[train[i] for i in part] for part in parts]


def default_num_clients(data: DataConfig, seed: int, configured: int) -> int:
    """Clients a simulation needs: the column's value count for ``column:<name>``
    and ``flwr:natural-id``."""
    train = pools(data, seed).train
    column = data.partition_column
    if column is None or partition_kind(data, train) != data.partition:
        return configured
    return count_column_values(train, column)


def describe_sizes(parts: Sequence[Sequence[Example]]) -> str:
    """``"120, 118, 131"``: row counts for log lines."""
    return ", ".join(str(len(part)) for part in parts)
