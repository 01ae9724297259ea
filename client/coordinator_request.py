"""The coordinator's requests, as a site reads them: every field checked before use.

A site takes nothing in a coordinator's message on trust. Before this module, the
key stages called ``bytes(n)`` and ``int(x)`` on whatever the coordinator put in a
record: ``bytes(2**62)`` raises MemoryError, ``bytes(2**63)`` OverflowError, a
merely large ``n`` allocates ``n`` zero bytes and can get the site's process killed,
a text of digits reads as a list of node ids, and a NaN slips past every ``<``
floor. Here each field is read with its type and range (``common.wire``); anything
else is a :class:`MalformedRequest`, a site refusal that names the stage and the
field, which the stage handlers log before Flower turns it into an error reply.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TypeVar

from flwr.app import ConfigRecord, Message

from client.site_policy import SiteRefusal
from common.wire import (
    describe,
    wire_blobs,
    wire_bytes,
    wire_float,
    wire_ids,
    wire_int,
)

T = TypeVar("T")

#: Largest round number a site accepts (rounds count up from 0 in a run).
MAX_ROUND = 2**31 - 1
#: Largest cohort, threshold or number of clients a site accepts in one round.
MAX_CLIENTS = 2**20


class MalformedRequest(SiteRefusal):
    """A field of the coordinator's request is missing, of the wrong type or out of
    range; the message names the stage and the field."""


_MISSING = object()


class CoordinatorRequest:
    """Typed, checked access to one config record of a coordinator's message.

    Parameters
    ----------
    record : ConfigRecord
        The record as received.
    stage : str
        What the message asks for (``advertise``, ``share keys``, ``train``, ...),
        for the refusal's text.
    """

    def __init__(self, record: ConfigRecord, stage: str) -> None:
        self.record = record
        self.stage = stage

    @classmethod
    def of(cls, message: Message, name: str, stage: str) -> CoordinatorRequest:
        """The config record ``name`` of ``message``.

        Raises
        ------
        MalformedRequest
            When the message has no such config record.
        """
        records = message.content.config_records
        if name not in records:
            raise MalformedRequest(
                f"the coordinator's {stage} message has no '{name}' record; "
                "refusing it (coordinator and site versions may differ)"
            )
        return cls(records[name], stage)

    def __contains__(self, key: str) -> bool:
        return key in self.record

    def _read(
        self, key: str, check: Callable[[object, str], T], default: object
    ) -> T:
        if key not in self.record:
            if default is not _MISSING:
                return default  # type: ignore[return-value]
            raise MalformedRequest(
                f"the coordinator's {self.stage} message lacks '{key}'; refusing it "
                "(coordinator and site versions may differ)"
            )
        try:
            return check(self.record[key], f"'{key}'")
        except (TypeError, ValueError) as error:
            raise MalformedRequest(
                f"the coordinator's {self.stage} message is malformed: {error}; "
                "refusing it"
            ) from None

    def integer(
        self, key: str, low: int, high: int, default: object = _MISSING
    ) -> int:
        """An integer field in ``[low, high]``."""
        return self._read(key, lambda v, what: wire_int(v, what, low, high), default)

    def number(
        self, key: str, low: float, high: float, default: object = _MISSING
    ) -> float:
        """A finite number field in ``[low, high]``."""
        return self._read(
            key, lambda v, what: wire_float(v, what, low, high), default
        )

    def text(self, key: str, default: object = _MISSING) -> str:
        """A text field."""

        def check(value: object, what: str) -> str:
            if not isinstance(value, str):
                raise TypeError(f"{what} must be text, got {describe(value)}")
            return value

        return self._read(key, check, default)

    def flag(self, key: str, default: object = _MISSING) -> bool:
        """A boolean field."""

        def check(value: object, what: str) -> bool:
            if not isinstance(value, bool):
                raise TypeError(f"{what} must be true or false, got {describe(value)}")
            return value

        return self._read(key, check, default)

    def node_ids(self, key: str, default: object = _MISSING) -> list[int]:
        """A list of distinct node ids."""
        return self._read(key, wire_ids, default)

    def blob(self, key: str, size: int | None = None) -> bytes:
        """A bytes field (of ``size`` bytes, when given)."""

        def check(value: object, what: str) -> bytes:
            blob = wire_bytes(value, what)
            if size is not None and len(blob) != size:
                raise ValueError(f"{what} must be {size} bytes, got {len(blob)}")
            return blob

        return self._read(key, check, _MISSING)

    def blobs(
        self,
        key: str,
        count: int,
        size: int | None = None,
        default: object = _MISSING,
    ) -> list[bytes]:
        """A list of exactly ``count`` bytes fields (each of ``size`` bytes, when
        given)."""

        def check(value: object, what: str) -> list[bytes]:
            blobs = wire_blobs(value, what, size)
            if len(blobs) != count:
                raise ValueError(
                    f"{what} holds {len(blobs)} entries for {count} node(s)"
                )
            return blobs

        return self._read(key, check, default)

    def server_round(self, key: str) -> int:
        """The round number."""
        return self.integer(key, 0, MAX_ROUND)
