"""Tokenising once and batching with dynamic padding in length buckets."""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from dataclasses import dataclass

import numpy as np
import torch
from transformers import PreTrainedTokenizerBase


@dataclass(frozen=True)
class Encoded:
    """Token ids of a list of texts with their label indices.

    Attributes
    ----------
    ids : list[list[int]]
        Token ids per text, truncated to the run's max length, without padding.
    labels : np.ndarray
        ``(n,) int64`` label indices.
    """

    ids: list[list[int]]
    labels: np.ndarray

    def __len__(self) -> int:
        return len(self.ids)


def encode(
    tokenizer: PreTrainedTokenizerBase,
    texts: Sequence[str],
    labels: Sequence[int],
    max_length: int,
) -> Encoded:
    """Tokenise ``texts`` once (no padding: batches pad to their own longest row);
    no texts (a coordinator without evaluation rows) give no rows."""
    if not texts:
        return Encoded(ids=[], labels=np.zeros(0, np.int64))
    ids = tokenizer(list(texts), truncation=True, max_length=max_length)["input_ids"]
    return Encoded(ids=list(ids), labels=np.asarray(labels, dtype=np.int64))


def collate(
    encoded: Encoded, rows: Sequence[int], pad_id: int
) -> dict[str, torch.Tensor]:
    """Pad the chosen rows to their longest member."""
    width = max(len(encoded.ids[r]) for r in rows)
    input_ids = torch.full(
        (len(rows), width), pad_id, dtype=torch.long
    )  # (batch, width)
    attention = torch.zeros((len(rows), width), dtype=torch.long)
    for line, row in enumerate(rows):
        tokens = encoded.ids[row]
        input_ids[line, : len(tokens)] = torch.tensor(tokens)
        attention[line, : len(tokens)] = 1
    return {
        "input_ids": input_ids,
        "attention_mask": attention,
        "labels": torch.from_numpy(encoded.labels[list(rows)]),
    }


def bucketed_order(
    lengths: Sequence[int], batch_size: int, rng: np.random.Generator
) -> list[list[int]]:
    """Shuffled batches of rows of similar length.

    Rows are shuffled, cut into pools of 50 batches, sorted by length inside each pool,
    cut into batches, and the batches are shuffled: little padding, still random.
    """
    order = rng.permutation(len(lengths))
    pool_size = batch_size * 50
    batches: list[list[int]] = []
    for start in range(0, len(order), pool_size):
        pool = sorted(
            order[start : start + pool_size].tolist(), key=lambda r: lengths[r]
        )
        batches.extend(
            pool[i : i + batch_size] for i in range(0, len(pool), batch_size)
        )
    rng.shuffle(batches)  # type: ignore[arg-type]
    return batches


def sequential_batches(lengths: Sequence[int], batch_size: int) -> Iterator[list[int]]:
    """Deterministic length-sorted batches for evaluation."""
    order = sorted(range(len(lengths)), key=lambda r: lengths[r])
    for start in range(0, len(order), batch_size):
        yield order[start : start + batch_size]
