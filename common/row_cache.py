"""Rows read from disk, cached per process until a file they come from changes.

A simulation reads the same ``data.path`` for the coordinator and for every virtual
client of a worker; each read checks the files' modification times, so a rewritten
file, or a pattern that newly matches a file, is read again.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from functools import lru_cache

from common.data import Example, load_examples, resolve_paths


@lru_cache(maxsize=8)
def _cached_load(
    path: str,
    stamps: tuple[tuple[str, float], ...],
    text_column: str,
    label_column: str,
) -> tuple[Example, ...]:
    # ``stamps`` is part of the cache key only: a file that is rewritten, or that a
    # pattern newly matches or no longer matches, makes the rows be read again.
    del stamps
    return tuple(load_examples(path, text_column, label_column))


def read_examples(path: str, text_column: str, label_column: str) -> list[Example]:
    """:func:`common.data.load_examples`, cached per process until a file changes.

    ``path`` is one path or a comma-separated list of paths and glob patterns.
    """
    files = [os.path.abspath(file) for file in resolve_paths(path)]
    stamps = tuple(
        (file, os.stat(file).st_mtime if os.path.exists(file) else 0.0)
        for file in files
    )
    return list(_cached_load(path, stamps, text_column, label_column))


@lru_cache(maxsize=8)
def _cached_rows(
    path: str,
    stamps: tuple[tuple[str, float], ...],
    loader: Callable[..., list[Example]],
    columns: tuple[str, ...],
) -> tuple[Example, ...]:
    del stamps  # cache key only, as in _cached_load
    return tuple(loader(path, *columns))


def read_watched(
    path: str, loader: Callable[..., list[Example]], columns: tuple[str, ...]
) -> list[Example]:
    """``loader(path, *columns)``, cached per process until a file, or an image
    folder's class folder, changes."""
    files = [os.path.abspath(file) for file in resolve_paths(path)]
    # An image folder changes when a class folder gains or loses an image.
    watched = files + [
        os.path.join(file, entry.name)
        for file in files
        if os.path.isdir(file)
        for entry in os.scandir(file)
        if entry.is_dir()
    ]
    stamps = tuple((file, os.stat(file).st_mtime) for file in watched)
    return list(_cached_rows(path, stamps, loader, columns))
