"""How a key is declared: once, on the dataclass field that holds its value.

A section of the configuration is a frozen dataclass whose fields are declared with
:func:`setting`: the flat key, its default (whose type is the key's type), a one-line
doc, whether a resumed run may change it, its check, and, for a key whose value is
parsed (a comma-separated list), the parser. A field whose default factory is a
section dataclass nests that section; :func:`mirror` copies another key's value into
a section that needs it. Everything else (the defaults, coercion of TOML and ``--set`` values, the resume
check, the key reference in docs/CONFIG.md) walks these declarations with
:func:`declared_keys` and :func:`build`.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterator, Mapping
from dataclasses import Field, dataclass, field, fields, is_dataclass
from typing import Any

from common.config.errors import ConfigError, Refusal

ConfigValue = bool | int | float | str
#: A key's check: the message when ``value`` is refused, else ``None``.
Check = Callable[[Any], str | None]

_KEY = "fedgraft.key"
_MIRROR = "fedgraft.mirror"


@dataclass(frozen=True)
class Key:
    """One flat configuration key, as declared by :func:`setting`.

    Attributes
    ----------
    name : str
        The flat kebab-case key, e.g. ``lora.r``.
    default : ConfigValue
        Its default; ``type(default)`` is the key's type.
    doc : str
        What it means, one line of Markdown (the key reference's text).
    resumable : bool
        A resumed run may change it; every other key must match the checkpoint's.
    check : Check or None
        Refuses a value of the right type that is still invalid.
    parse : Callable or None
        Turns the flat value into the attribute's value (e.g. a comma list into a
        tuple); ``None`` keeps it.
    """

    name: str
    default: ConfigValue
    doc: str
    resumable: bool = False
    check: Check | None = None
    parse: Callable[[Any], Any] | None = None

    @property
    def type(self) -> type:
        """``bool``, ``int``, ``float`` or ``str``: the type of the default."""
        return type(self.default)

    def value_of(self, flat_value: ConfigValue) -> Any:
        """The attribute's value for the (coerced) flat value."""
        return self.parse(flat_value) if self.parse else flat_value

    def refusal(self, value: Any) -> Refusal | None:
        """The refusal of the attribute ``value``, or ``None`` when it passes."""
        message = self.check(value) if self.check else None
        return None if message is None else Refusal(self.name, message)

    def coerce(self, value: Any) -> ConfigValue:
        """``value`` as this key's type (from TOML, ``--set`` text or Python).

        Raises
        ------
        ConfigError
            Naming the key, its type and default, when ``value`` does not convert.
        """
        converted = _CONVERTERS[self.type](value)
        if converted is None:
            raise ConfigError(
                f"config key '{self.name}' expects a "
                f"{'finite ' if self.type is float else ''}{self.type.__name__} "
                f"(default {self.default!r}) but got {value!r}"
            )
        return converted


def _to_bool(value: Any) -> bool | None:
    if isinstance(value, bool):
        return value
    if isinstance(value, str) and value.lower() in ("true", "false"):
        return value.lower() == "true"
    return None


def _to_int(value: Any) -> int | None:
    if isinstance(value, int) and not isinstance(value, bool):
        return value
    if isinstance(value, str):
        try:
            return int(value)
        except ValueError:
            return None
    return None


def _to_float(value: Any) -> float | None:
    number: float | None = None
    if isinstance(value, int | float) and not isinstance(value, bool):
        number = float(value)
    elif isinstance(value, str):
        try:
            number = float(value)
        except ValueError:
            return None
    return number if number is not None and math.isfinite(number) else None


def _to_str(value: Any) -> str | None:
    return value if isinstance(value, str) else None


_CONVERTERS: dict[type, Callable[[Any], ConfigValue | None]] = {
    bool: _to_bool,
    int: _to_int,
    float: _to_float,
    str: _to_str,
}


def setting(
    name: str,
    default: ConfigValue,
    doc: str,
    *,
    check: Check | None = None,
    resumable: bool = False,
    parse: Callable[[Any], Any] | None = None,
) -> Any:
    """Declare the dataclass field that holds key ``name`` (see :class:`Key`)."""
    key = Key(name, default, doc, resumable, check, parse)
    return field(default=key.value_of(default), metadata={_KEY: key})


def mirror(name: str, default: ConfigValue) -> Any:
    """Declare a field that copies key ``name``, declared in another section."""
    return field(default=default, metadata={_MIRROR: name})


def _section(item: Field[Any]) -> type | None:
    factory = item.default_factory
    return factory if isinstance(factory, type) and is_dataclass(factory) else None


def declared_keys(cls: type) -> Iterator[Key]:
    """Every key declared on dataclass ``cls`` and its sections, in field order."""
    for item in fields(cls):
        if _KEY in item.metadata:
            yield item.metadata[_KEY]
        elif (nested := _section(item)) is not None:
            yield from declared_keys(nested)


def build(cls: type, values: Mapping[str, ConfigValue], **extra: Any) -> Any:
    """An instance of ``cls`` from coerced flat ``values`` (and ``extra`` fields)."""
    given: dict[str, Any] = dict(extra)
    for item in fields(cls):
        if _KEY in item.metadata:
            key: Key = item.metadata[_KEY]
            given[item.name] = key.value_of(values[key.name])
        elif (nested := _section(item)) is not None:
            given[item.name] = build(nested, values)
        elif _MIRROR in item.metadata:
            given[item.name] = values[item.metadata[_MIRROR]]
    return cls(**given)


def key_refusals(config: Any) -> Iterator[Refusal]:
    """The refusals of each key's own check on built ``config``, in field order."""
    for item in fields(config):
        value = getattr(config, item.name)
        if _KEY in item.metadata:
            refusal = item.metadata[_KEY].refusal(value)
            if refusal is not None:
                yield refusal
        elif _section(item) is not None:
            yield from key_refusals(value)


def one_of(choices: tuple[str, ...]) -> Check:
    """Accept only ``choices``: ``got 'x'; use one of a, b``."""
    return lambda value: (
        None if value in choices else f"got {value!r}; use one of {', '.join(choices)}"
    )


def satisfies(predicate: Callable[[Any], bool], message: str) -> Check:
    """Refuse with ``message`` a value for which ``predicate`` is false."""
    return lambda value: None if predicate(value) else message


def share() -> Check:
    """Accept a share of a whole, in ``(0, 1]``."""
    return satisfies(lambda value: 0.0 < value <= 1.0, "must be in (0, 1]")


def at_least(bound: float, message: str) -> Check:
    """Accept values ``>= bound``."""
    return satisfies(lambda value: value >= bound, message)


def above(bound: float, message: str) -> Check:
    """Accept values ``> bound``."""
    return satisfies(lambda value: value > bound, message)


def comma_list(text: str) -> tuple[str, ...]:
    """``" a, b ,"`` -> ``("a", "b")``: the parser of comma-separated keys."""
    return tuple(item.strip() for item in text.split(",") if item.strip())
