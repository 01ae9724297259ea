"""Rows of an image classifier: image files and their labels.

Two layouts (``model.task = image-cls``, ``data.path``):

- an image folder: one sub-folder per class, named by its label, holding the images
  (nested folders are searched too);
- a listing file (``.csv``, ``.tsv``, ``.jsonl``, ``.json``, ``.parquet``) with an
  image path column (``data.image-column``) and a label column
  (``data.label-column``); relative paths are read from the listing's folder.

A row is an :class:`~common.data.Example` whose ``text`` is the image's absolute path,
so partitions (iid, dirichlet on labels, ``column:<name>``) and the label map work as
for text. Several paths (commas, glob patterns) give each row a ``source`` column, as
:func:`common.data.load_examples` does. Pixels are read only when a party encodes the
rows (:func:`read_image`), with PIL.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import TYPE_CHECKING

from common.data import (
    SOURCE_COLUMN,
    DataError,
    Example,
    load_examples,
    resolve_paths,
    source_names,
)

if TYPE_CHECKING:  # PIL loads only where pixels are read
    from PIL.Image import Image

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".gif", ".webp", ".tif", ".tiff")


def _is_image(path: Path) -> bool:
    return path.is_file() and path.suffix.lower() in IMAGE_SUFFIXES


def _image_folder(folder: Path) -> list[Example]:
    """One row per image of each class sub-folder, classes in name order."""
    loose = sorted(p.name for p in folder.iterdir() if _is_image(p))
    if loose:
        raise DataError(
            f"{folder}: images must sit in one sub-folder per class (named by its "
            f"label), but {loose[0]} lies at the top"
        )
    classes = sorted(
        p for p in folder.iterdir() if p.is_dir() and not p.name.startswith(".")
    )
    rows: list[Example] = []
    for class_dir in classes:
        images = sorted(p for p in class_dir.rglob("*") if _is_image(p))
        if not images:
            raise DataError(
                f"{class_dir}: class folder holds no images "
                f"({', '.join(IMAGE_SUFFIXES)}); remove it or add its images"
            )
        rows.extend(
            Example(text=os.path.abspath(image), label=class_dir.name, where=str(image))
            for image in images
        )
    if not rows:
        raise DataError(
            f"{folder}: no class sub-folders; an image folder holds one sub-folder "
            "per class, named by its label"
        )
    return rows


def _image_listing(
    listing: Path, image_column: str, label_column: str
) -> list[Example]:
    """Rows of a file listing image paths (relative to its folder) and labels."""
    rows = []
    for row in load_examples(listing, image_column, label_column):
        image = Path(row.text).expanduser()
        if not image.is_absolute():
            image = listing.parent / image
        if not image.is_file():
            raise DataError(
                f"{row.where}: image '{row.text}' not found (looked at {image}); "
                f"paths in column '{image_column}' are relative to {listing.parent}"
            )
        rows.append(
            Example(
                text=os.path.abspath(image),
                label=row.label,
                extra=row.extra,
                where=row.where,
            )
        )
    return rows


def load_image_examples(
    spec: str | Path, image_column: str = "image", label_column: str = "label"
) -> list[Example]:
    """Read the image rows that ``data.path`` (or ``data.test-path``) names.

    Parameters
    ----------
    spec : str or Path
        An image folder, a listing file, or a comma-separated list of these and
        glob patterns.
    image_column, label_column : str
        The columns of listing files.

    Raises
    ------
    DataError
        For a missing path, a folder without class sub-folders or images, a listing
        row without its columns, or an image file that does not exist.
    """
    files = resolve_paths(spec)
    several = not Path(spec).expanduser().exists()
    rows: list[Example] = []
    for path, name in zip(files, source_names(files), strict=True):
        found = (
            _image_folder(path)
            if path.is_dir()
            else _image_listing(path, image_column, label_column)
        )
        if several:
            found = [
                Example(
                    row.text,
                    row.label,
                    {SOURCE_COLUMN: name, **row.extra},
                    row.where,
                )
                for row in found
            ]
        rows.extend(found)
    return rows


def read_image(row: Example) -> Image:
    """The RGB pixels of ``row``'s image.

    Raises
    ------
    DataError
        When the file is missing or not an image PIL can read, naming the row.
    """
    from PIL import Image, UnidentifiedImageError

    try:
        with Image.open(row.text) as image:
            return image.convert("RGB")
    except (OSError, UnidentifiedImageError) as error:
        raise DataError(
            f"{row.where}: {row.text} is not a readable image ({error})"
        ) from None
