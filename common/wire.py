"""Conversions between numpy state and Flower records, and JSON in config records.

The only module of ``common`` that knows Flower's record types, so that the protocol's
payloads are built the same way on both sides.
"""

from __future__ import annotations

import json
import math
from collections.abc import Mapping
from typing import Any

import numpy as np
from flwr.app import Array, ArrayRecord, ConfigRecord


def to_array_record(arrays: Mapping[str, np.ndarray]) -> ArrayRecord:
    """An ArrayRecord holding each array under its name."""
    return ArrayRecord(
        {name: Array(np.ascontiguousarray(value)) for name, value in arrays.items()}
    )


def from_array_record(record: ArrayRecord) -> dict[str, np.ndarray]:
    """Numpy arrays by name from an ArrayRecord."""
    return {name: array.numpy() for name, array in record.items()}


def json_field(record: ConfigRecord, key: str) -> Any:
    """Decode the JSON text stored under ``key``.

    Raises
    ------
    ValueError
        When the key is missing or does not hold JSON, naming the key.
    """
    if key not in record:
        raise ValueError(
            f"instruction lacks '{key}': coordinator and client versions differ"
        )
    try:
        return json.loads(str(record[key]))
    except json.JSONDecodeError as error:
        raise ValueError(f"instruction '{key}' is not valid JSON: {error}") from None


def wire_bytes(value: object, what: str) -> bytes:
    """``value`` when it is a bytes field of a record.

    A peer controls what its records hold: ``bytes(n)`` of a crafted integer ``n``
    would allocate ``n`` zero bytes (MemoryError, OverflowError), so only ``bytes``
    values pass.

    Raises
    ------
    TypeError
        When ``value`` is anything else, naming ``what``.
    """
    if not isinstance(value, bytes):
        raise TypeError(f"{what} must be bytes, got {describe(value)}")
    return value


def wire_list(value: object, what: str) -> list[object]:
    """``value`` when it is a list field of a record.

    Raises
    ------
    TypeError
        When ``value`` is not a list, naming ``what``.
    """
    if not isinstance(value, list):
        raise TypeError(f"{what} must be a list, got {describe(value)}")
    return value


#: Flower node ids are unsigned 64-bit integers (records carry them as decimal text).
NODE_ID_LIMIT = 2**64


def describe(value: object) -> str:
    """A short description of a field a peer sent, safe for any size (a huge
    integer's decimal form alone could take seconds or raise)."""
    if isinstance(value, bool):
        return repr(value)
    if isinstance(value, int):
        if value.bit_length() > 64:
            return f"a {value.bit_length()}-bit integer"
        return repr(value)
    if isinstance(value, float):
        return repr(value)
    if isinstance(value, str):
        if len(value) > 40:
            return f"{value[:40]!r}... ({len(value)} characters)"
        return repr(value)
    if isinstance(value, bytes):
        return f"{len(value)} bytes"
    if isinstance(value, list):
        return f"a list of {len(value)}"
    return f"a {type(value).__name__}"


def wire_int(value: object, what: str, low: int, high: int) -> int:
    """``value`` when it is an integer field (not a bool) within ``[low, high]``.

    Raises
    ------
    TypeError
        When ``value`` is not an integer, naming ``what``.
    ValueError
        When it is out of range, naming ``what`` and the range.
    """
    if isinstance(value, bool) or not isinstance(value, int):
        raise TypeError(f"{what} must be an integer, got {describe(value)}")
    if not low <= value <= high:
        raise ValueError(f"{what} must be in [{low}, {high}], got {describe(value)}")
    return value


def wire_float(value: object, what: str, low: float, high: float) -> float:
    """``value`` as a float when it is a finite number (not a bool) within
    ``[low, high]``.

    Raises
    ------
    TypeError
        When ``value`` is not a number, naming ``what``.
    ValueError
        When it is NaN, infinite or out of range, naming ``what``.
    """
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise TypeError(f"{what} must be a number, got {describe(value)}")
    try:
        number = float(value)
    except OverflowError:
        number = math.inf
    if not (math.isfinite(number) and low <= number <= high):
        raise ValueError(
            f"{what} must be a finite number in [{low:g}, {high:g}], "
            f"got {describe(value)}"
        )
    return number


def wire_node_id(value: object, what: str) -> int:
    """A node id: decimal ASCII text (or an integer) in ``[0, 2^64)``.

    Raises
    ------
    TypeError, ValueError
        Naming ``what``, for anything else.
    """
    if isinstance(value, str):
        if not (value.isascii() and value.isdigit() and len(value) <= 20):
            raise ValueError(
                f"{what} must be a node id in decimal, got {describe(value)}"
            )
        value = int(value)
    return wire_int(value, what, 0, NODE_ID_LIMIT - 1)


def wire_ids(value: object, what: str) -> list[int]:
    """A list of distinct node ids (:func:`wire_node_id`).

    Raises
    ------
    TypeError, ValueError
        Naming ``what``, for a non-list, a malformed id or an id listed twice.
    """
    ids = [
        wire_node_id(item, f"{what}[{index}]")
        for index, item in enumerate(wire_list(value, what))
    ]
    if len(set(ids)) != len(ids):
        twice = next(node for node in ids if ids.count(node) > 1)
        raise ValueError(f"{what} lists node {twice} twice")
    return ids


def wire_blobs(value: object, what: str, size: int | None = None) -> list[bytes]:
    """A list of bytes fields (each of ``size`` bytes, when given).

    Raises
    ------
    TypeError, ValueError
        Naming ``what`` and the index, for a non-list, a non-bytes item or one of
        the wrong size.
    """
    blobs = [
        wire_bytes(item, f"{what}[{index}]")
        for index, item in enumerate(wire_list(value, what))
    ]
    if size is not None:
        wrong = next((i for i, blob in enumerate(blobs) if len(blob) != size), None)
        if wrong is not None:
            raise ValueError(
                f"{what}[{wrong}] must be {size} bytes, got {len(blobs[wrong])}"
            )
    return blobs
