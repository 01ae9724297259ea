"""The ``data.*`` keys: where the rows come from and how they are split."""

from __future__ import annotations

from dataclasses import dataclass

from common.config.keys import above, comma_list, mirror, satisfies, setting

PARTITION_KINDS = ("iid", "dirichlet", "column:<name>")


def _is_partition(kind: str) -> bool:
    return kind in ("iid", "dirichlet") or (
        kind.startswith("column:") and len(kind) > len("column:")
    )


def _check_partition(kind: str) -> str | None:
    if _is_partition(kind):
        return None
    return f"got {kind!r}; use one of {', '.join(PARTITION_KINDS)}"


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
        "comma-separated label map; empty = every label the coordinator sees",
        parse=comma_list,
    )
    partition: str = setting(
        "data.partition",
        "column:domain",
        "`iid`, `dirichlet`, or `column:<name>` (one client per value)",
        check=_check_partition,
    )
    dirichlet_alpha: float = setting(
        "data.dirichlet-alpha",
        0.5,
        "label skew of `dirichlet` (smaller = more skewed)",
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
    def partition_column(self) -> str | None:
        """The column named by ``column:<name>``, or ``None`` for other partitions."""
        if self.partition.startswith("column:"):
            return self.partition.removeprefix("column:")
        return None
