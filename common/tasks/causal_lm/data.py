"""Rows of a causal language model, tokenised once with the span that carries loss.

Two kinds of data (``model.task = causal-lm``):

- plain domain text (``data.text-column``): every token carries loss;
- instruction data (``data.prompt-column`` and ``data.response-column``): the prompt
  conditions the response, and only the response tokens (and the end-of-sequence
  token after them) carry loss.

A row is an :class:`~common.data.Example` whose ``text`` is what the loss covers (the
whole text, or the response) and whose ``extra`` holds the prompt under its column
name; its label is empty. Sequences are length-bucketed, not packed: each row stays
one sequence, padded only to the longest row of its batch (see
:mod:`common.batching`), so no attention crosses from one document or conversation
into another, and the loss mask is a single boundary per row.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from common.data import DataError, Example, load_examples

if TYPE_CHECKING:  # transformers loads only where rows are tokenised
    from transformers import PreTrainedTokenizerBase


def load_lm_examples(
    path: str | Path,
    text_column: str,
    prompt_column: str = "",
    response_column: str = "",
) -> list[Example]:
    """Read plain text (``prompt_column`` empty) or instruction rows.

    Parameters
    ----------
    path : str or Path
        In any form :func:`common.data.load_examples` reads.
    text_column : str
        The text of plain rows.
    prompt_column, response_column : str
        The columns of instruction rows; the prompt may be empty, the response not.

    Raises
    ------
    DataError
        When a file is malformed or a row lacks a column, naming file and line.
    """
    if not prompt_column:
        return load_examples(path, text_column, None)
    rows = load_examples(path, response_column, None)
    for row in rows:
        if prompt_column not in row.extra:
            raise DataError(
                f"{row.where}: no column '{prompt_column}' (data.prompt-column); "
                f"columns: {', '.join([response_column, *row.extra])}"
            )
    return rows


@dataclass(frozen=True)
class LmEncoded:
    """Token ids of a list of rows and where their loss starts.

    Attributes
    ----------
    ids : list[list[int]]
        Tokens per row (prompt, then the text the loss covers and the end-of-sequence
        token), at most the run's max length, without padding.
    loss_from : np.ndarray
        ``(n,) int64``: the position of each row's first token that carries loss (1
        for plain text: the first token has nothing to be predicted from).
    """

    ids: list[list[int]]
    loss_from: np.ndarray

    def __len__(self) -> int:
        return len(self.ids)

    def target_tokens(self) -> int:
        """Number of tokens that carry loss over every row."""
        lengths = np.asarray([len(ids) for ids in self.ids], np.int64)
        return int(np.clip(lengths - self.loss_from, 0, None).sum())


def _fit(prompt: list[int], text: list[int], max_length: int) -> tuple[list[int], int]:
    """Cut ``prompt + text`` to ``max_length``: the text keeps at least half of the
    limit (its end is cut), the prompt keeps its end (nearest the response).

    Returns the tokens and how many of them are the prompt's.
    """
    if len(prompt) + len(text) <= max_length:
        return prompt + text, len(prompt)
    keep_text = min(len(text), max(max_length - len(prompt), max_length // 2))
    keep_prompt = max_length - keep_text
    kept = prompt[-keep_prompt:] if keep_prompt else []
    return kept + text[:keep_text], len(kept)


def encode_lm(
    tokenizer: PreTrainedTokenizerBase,
    examples: Sequence[Example],
    prompt_column: str,
    max_length: int,
) -> LmEncoded:
    """Tokenise rows once: the prompt with the tokenizer's special tokens (a BOS where
    the tokenizer adds one), then the text without them, then the end-of-sequence
    token, so that a generation learns to stop.

    Returns
    -------
    LmEncoded
        Rows longer than ``max_length`` are cut by :func:`_fit`.
    """
    if not examples:  # a coordinator without rows (its sites evaluate)
        return LmEncoded([], np.zeros(0, np.int64))
    eos = tokenizer.eos_token_id
    end = [eos] if eos is not None else []
    texts = [example.text for example in examples]
    if not prompt_column:
        bodies = tokenizer(texts, add_special_tokens=True)["input_ids"]
        ids = [
            _fit([], list(body) + (end if body[-1:] != end else []), max_length)[0]
            for body in bodies
        ]
        return LmEncoded(ids, np.ones(len(ids), np.int64))
    prompts = tokenizer(
        [example.extra[prompt_column] for example in examples],
        add_special_tokens=True,
    )["input_ids"]
    bodies = tokenizer(texts, add_special_tokens=False)["input_ids"]
    ids, loss_from = [], []
    for prompt, body in zip(prompts, bodies, strict=True):
        row, prompt_tokens = _fit(list(prompt), list(body) + end, max_length)
        ids.append(row)
        loss_from.append(max(1, prompt_tokens))
    return LmEncoded(ids, np.asarray(loss_from, np.int64))


def save_lm_encoded(encoded: LmEncoded, path: Path) -> None:
    """Write ``encoded`` to ``path`` (``.npz``) atomically."""
    path.parent.mkdir(parents=True, exist_ok=True)
    staging = path.with_name(path.stem + ".tmp.npz")
    np.savez(
        staging,
        ids=np.concatenate([np.asarray(row, np.int32) for row in encoded.ids]),
        lengths=np.asarray([len(row) for row in encoded.ids], np.int64),
        loss_from=encoded.loss_from,
    )
    staging.replace(path)


def load_lm_encoded(path: Path) -> LmEncoded:
    """Read what :func:`save_lm_encoded` wrote."""
    with np.load(path) as arrays:
        bounds = np.cumsum(arrays["lengths"])[:-1]
        ids = [part.tolist() for part in np.split(arrays["ids"], bounds)]
        return LmEncoded(ids, arrays["loss_from"])
