"""The import packages resolve to this repository, and tests are not shipped."""

from __future__ import annotations

import importlib
import importlib.metadata
import tomllib
from pathlib import Path

import pytest

REPO_ROOT = Path(__file__).resolve().parent.parent


@pytest.mark.parametrize("name", ["server", "client", "common", "simulations"])
def test_import_package_resolves_to_this_repository(name: str) -> None:
    # Prepare / Execute
    module = importlib.import_module(name)

    # Assert
    assert module.__file__ is not None, f"{name} is a namespace package"
    assert Path(module.__file__).resolve().is_relative_to(REPO_ROOT)


def test_tests_are_not_a_shipped_package() -> None:
    # Prepare
    pyproject = tomllib.loads((REPO_ROOT / "pyproject.toml").read_text())

    # Execute
    packages = pyproject["tool"]["setuptools"]["packages"]

    # Assert
    assert not any(p == "tests" or p.startswith("tests.") for p in packages)


def test_every_package_folder_is_listed_for_installation() -> None:
    # Prepare
    pyproject = tomllib.loads((REPO_ROOT / "pyproject.toml").read_text())
    roots = ("common", "client", "server", "simulations")

    # Execute
    folders = {
        ".".join(init.parent.relative_to(REPO_ROOT).parts)
        for root in roots
        for init in (REPO_ROOT / root).rglob("__init__.py")
    }

    # Assert: a wheel (not only an editable install) carries every subpackage
    assert folders == set(pyproject["tool"]["setuptools"]["packages"])


@pytest.mark.parametrize("name", ["server", "client", "common", "simulations"])
def test_no_other_installed_distribution_claims_the_name(name: str) -> None:
    # Execute
    owners = importlib.metadata.packages_distributions().get(name, [])

    # Assert: only fedgraft (editable installs do not register their names)
    assert set(owners) <= {"fedgraft"}, f"{name} is also installed by {owners}"
