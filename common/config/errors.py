"""The error every configuration check raises, and how a check refuses."""

from __future__ import annotations

from dataclasses import dataclass


class ConfigError(ValueError):
    """A configuration key is unknown, has the wrong type, or an invalid value."""


@dataclass(frozen=True)
class Refusal:
    """Why a configuration is refused: the key to change and what to do.

    Attributes
    ----------
    key : str
        The flat key the message names (``config key '<key>': ...``).
    message : str
        What is wrong and how to fix it.
    """

    key: str
    message: str

    def error(self) -> ConfigError:
        """The :class:`ConfigError` that reports this refusal."""
        return ConfigError(f"config key '{self.key}': {self.message}")


def refuse_if(condition: bool, key: str, message: str) -> Refusal | None:
    """A :class:`Refusal` of ``key`` with ``message`` when ``condition`` holds."""
    return Refusal(key, message) if condition else None
