"""The optional packages tracking needs, and the message that names the missing one.

Tracking packages live in the ``tracking`` extra so that the default install stays
lean; a key that needs one says which package and which extra to install.
"""

from __future__ import annotations

import importlib
import importlib.util
from types import ModuleType

#: The extra that brings every tracking package.
EXTRA = "tracking"


def missing_package(module: str, key: str) -> str | None:
    """Why ``key`` cannot work here (its package is not installed), or ``None``;
    the message goes after the key's name.

    Parameters
    ----------
    module : str
        The importable module (``mlflow``, ``tensorboard``).
    key : str
        The config key that asked for it.
    """
    top = module.split(".")[0]
    if importlib.util.find_spec(top) is not None:
        return None
    return (
        f"needs the '{top}' package, which is not installed; install the extra: "
        f"pip install 'fedgraft[{EXTRA}]' (or leave {key} empty)"
    )


def import_tracking_package(module: str, key: str) -> ModuleType:
    """Import ``module`` for ``key``.

    Raises
    ------
    ModuleNotFoundError
        Naming ``key`` and the extra to install, when the package is missing.
    """
    problem = missing_package(module, key)
    if problem is not None:
        raise ModuleNotFoundError(f"{key} {problem}")
    return importlib.import_module(module)
