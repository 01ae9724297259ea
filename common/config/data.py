"""The ``data.*`` keys: where the rows come from and how they are split."""

from __future__ import annotations

from dataclasses import dataclass

from common.config.errors import Refusal
from common.config.keys import above, comma_list, mirror, satisfies, setting
from common.flower_partitions import PARTITIONERS as FLOWER_PARTITIONERS
from common.flower_partitions import PREFIX as FLOWER_PREFIX
from common.flower_partitions import (
    OptionValue,
    check_options,
    parse_options,
    partitioner_of,
)
from common.flower_partitions import missing_package as missing_flower_datasets
from common.flower_partitions import partition_column as flower_partition_column

PARTITION_KINDS = ("iid", "dirichlet", "column:<name>", "flwr:<name>")


def _is_partition(kind: str) -> bool:
    return kind in ("iid", "dirichlet") or (
        kind.startswith("column:") and len(kind) > len("column:")
    )


def _check_partition(kind: str) -> str | None:
    if kind.startswith(FLOWER_PREFIX):
        try:
            partitioner_of(kind)
        except ValueError as error:
            return str(error)
        return missing_flower_datasets()
    if _is_partition(kind):
        return None
    hint = (
        f" (Flower Datasets' {kind} is flwr:{kind})"
        if kind in FLOWER_PARTITIONERS
        else ""
    )
    return f"got {kind!r}; use one of {', '.join(PARTITION_KINDS)}{hint}"


def _check_partition_args(text: str) -> str | None:
    try:
        parse_options(text)
    except ValueError as error:
        return str(error)
    return None


@dataclass(frozen=True)
class DataConfig:
    """Where the rows come from and how they are split into clients (``data.*``).

    ``task`` is ``model.task``: what a row holds. ``text-cls``: a text and a label;
    ``causal-lm``: a text the loss covers (``text_column``, or ``response_column``
    after the prompt in ``prompt_column``); ``image-cls``: an image file
    (``image_column``, or an image folder) and a label.
    """

    path: str = setting(
        "data.path",
        "",
        "`.jsonl`, `.json`, `.csv`, `.tsv`, `.txt` (headerless `text<TAB>label` "
        "lines), `.parquet`, or a `datasets.save_to_disk` folder; or a "
        "comma-separated list of these and glob patterns "
        "(`../shared/data/sentiment_labelled_sentences/*_labelled.txt`), read in "
        "order, each row getting a `source` column (its file's stem) so "
        "`data.partition = column:source` gives one client per file; empty = the "
        "demo corpus",
    )
    test_path: str = setting(
        "data.test-path",
        "",
        "held-out file(s) the coordinator evaluates on, in the forms of `data.path`; "
        "empty = a seeded held-out slice of `data.path`",
    )
    text_column: str = setting("data.text-column", "text", "the text column's name")
    label_column: str = setting("data.label-column", "label", "the label column's name")
    labels: tuple[str, ...] = setting(
        "data.labels",
        "",
        "the declared label map: a comma-separated list, or the path of a file with "
        "one label a line; empty = the labels `head.label-descriptions` describes, "
        "else every label the coordinator's rows hold (a deployed coordinator "
        "without data refuses to start without one). Each site refuses rows whose "
        "label is not declared, naming them",
        parse=comma_list,
    )
    partition: str = setting(
        "data.partition",
        "column:domain",
        "`iid`, `dirichlet`, `column:<name>` (one client per value), or "
        "`flwr:<name>`: Flower Datasets' partitioner `iid`, `dirichlet`, "
        "`pathological`, `shard`, `linear`, `square`, `exponential` or `natural-id` "
        '(README, "Experiment tracking and Flower Datasets partitioners"); the '
        "default on rows without a `domain` column splits them `iid` over "
        "`sim.num-clients` and says so",
        check=_check_partition,
    )
    partition_args: str = setting(
        "data.partition-args",
        "",
        "a `flwr:<name>` partitioner's keyword arguments, `key=value` pairs "
        "separated by commas (`num_classes_per_partition=2`); `partition_by` names "
        "the column (default: the label); `num_partitions` and `seed` come from the "
        "run",
        check=_check_partition_args,
    )
    dirichlet_alpha: float = setting(
        "data.dirichlet-alpha",
        0.5,
        "label skew of `dirichlet`, and of `flwr:dirichlet` without an `alpha` "
        "(smaller = more skewed)",
        check=above(0, "must be > 0"),
    )
    holdout_fraction: float = setting(
        "data.holdout-fraction",
        0.2,
        "size of the held-out slice when `data.test-path` is empty",
        check=satisfies(lambda share: 0.0 < share < 1.0, "must be in (0, 1)"),
    )
    task: str = mirror("model.task", "text-cls")
    prompt_column: str = setting(
        "data.prompt-column",
        "",
        "`causal-lm` instruction data: the prompt, which conditions the response but "
        "carries no loss; empty = plain text from `data.text-column` (every token "
        "carries loss)",
    )
    response_column: str = setting(
        "data.response-column",
        "response",
        "`causal-lm` instruction data: the response, the only tokens that carry loss",
    )
    image_column: str = setting(
        "data.image-column",
        "image",
        "`image-cls` listing files: the image path, relative to the listing",
    )

    @property
    def partition_options(self) -> dict[str, OptionValue]:
        """``data.partition-args`` as keyword arguments of a ``flwr:<name>``
        partitioner."""
        return parse_options(self.partition_args)

    @property
    def partition_column(self) -> str | None:
        """The column whose values are the clients: named by ``column:<name>``, or
        ``partition_by`` of ``flwr:natural-id``; ``None`` for other partitions."""
        if self.partition.startswith("column:"):
            return self.partition.removeprefix("column:")
        return flower_partition_column(self.partition, self.partition_options)


def partition_args_fit_the_partitioner(data: DataConfig) -> Refusal | None:
    """``data.partition-args`` holds what the ``flwr:<name>`` partitioner takes.

    Only its options, every required one, and nothing for fedgraft's own kinds.
    """
    try:
        check_options(data.partition, data.partition_options)
    except ValueError as error:
        return Refusal("data.partition-args", str(error))
    return None


RULES = (partition_args_fit_the_partitioner,)
