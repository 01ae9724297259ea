"""Where flat keys come from: a TOML file and ``--set key=value`` overrides."""

from __future__ import annotations

import re
import tomllib
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from common.config.errors import ConfigError
from common.config.run import RunConfig


def parse_assignment(text: str) -> tuple[str, str]:
    """Split a ``key=value`` override as given to ``--set``.

    Raises
    ------
    ConfigError
        When ``text`` has no ``=`` or an empty key.
    """
    key, sep, value = text.partition("=")
    if not sep or not key.strip():
        raise ConfigError(f"override {text!r} must look like key=value, e.g. lora.r=16")
    return key.strip(), value.strip().strip('"')


def _key_line(text: str, key: str) -> int | None:
    """The 1-based line of ``text`` where ``key`` is assigned (quoted or not) or
    opens a table; ``None`` when it cannot be found."""
    pattern = re.compile(
        rf"""^[ \t]*(\[[ \t]*)?(["']?){re.escape(key)}\2[ \t]*(=|\.|\])""", re.MULTILINE
    )
    match = pattern.search(text)
    return None if match is None else text.count("\n", 0, match.start()) + 1


def _read_config_file(path: Path) -> tuple[dict[str, Any], str]:
    """The flat keys of a config file and its text.

    Raises
    ------
    ConfigError
        Naming the file (and the line) when it is missing, not TOML, or nested.
    """
    try:
        text = path.read_text()
        document = tomllib.loads(text)
    except FileNotFoundError:
        raise ConfigError(f"{path}: config file not found") from None
    except tomllib.TOMLDecodeError as error:  # its message names line and column
        raise ConfigError(f"{path}: not valid TOML ({error})") from None
    flat = (
        document.get("tool", {}).get("flwr", {}).get("app", {}).get("config", document)
    )
    nested = [key for key, value in flat.items() if isinstance(value, dict)]
    if nested:
        line = _key_line(text, nested[0])
        raise ConfigError(
            f"{path}{f':{line}' if line else ''}: use flat quoted keys such as "
            f'"train.lr" = 0.001, not tables ({", ".join(nested)})'
        )
    return dict(flat), text


def _file_error(
    path: Path, text: str, values: Mapping[str, Any], error: ConfigError
) -> str:
    """``error`` located in the config file: at the line of the first of its
    ``values`` that is wrong on its own, else of the first key the message names."""
    for key, value in values.items():
        try:
            RunConfig.from_flat({key: value})
        except ConfigError as alone:
            return f"{path}:{_key_line(text, key) or '?'}: {alone}"
    named = [key for key in values if f"'{key}'" in str(error)]
    line = _key_line(text, named[0]) if named else None
    return f"{path}{f':{line}' if line else ''}: {error}"


def load_config(
    config_file: str | None,
    assignments: Sequence[str],
    base: Mapping[str, Any] | None = None,
) -> RunConfig:
    """Defaults (or ``base``), then the TOML file, then ``--set`` overrides; validated.

    A TOML file may hold the flat keys at its top level or under
    ``[tool.flwr.app.config]`` (so a pyproject.toml works too).

    Raises
    ------
    ConfigError
        Naming the file and line, or the ``--set`` key, that is wrong.
    """
    flat: dict[str, Any] = dict(base or {})
    from_file: dict[str, Any] = {}
    text = ""
    if config_file:
        from_file, text = _read_config_file(Path(config_file))
        flat.update(from_file)
    for assignment in assignments:
        key, value = parse_assignment(assignment)
        flat[key] = value
        from_file.pop(key, None)  # the override, not the file, is then to blame
    try:
        return RunConfig.from_flat(flat)
    except ConfigError as error:
        if not from_file:
            raise
        raise ConfigError(
            _file_error(Path(str(config_file)), text, from_file, error)
        ) from None
