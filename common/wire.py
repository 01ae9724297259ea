"""Conversions between numpy state and Flower records, and JSON in config records.

The only module of ``common`` that knows Flower's record types, so that the protocol's
payloads are built the same way on both sides.
"""

from __future__ import annotations

import json
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
        raise TypeError(f"{what} must be bytes, got {type(value).__name__}")
    return value


def wire_list(value: object, what: str) -> list[object]:
    """``value`` when it is a list field of a record.

    Raises
    ------
    TypeError
        When ``value`` is not a list, naming ``what``.
    """
    if not isinstance(value, list):
        raise TypeError(f"{what} must be a list, got {type(value).__name__}")
    return value
