"""The layering contracts in pyproject.toml ``[tool.importlinter]`` hold."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

from tests.conftest import REPO_ROOT


def test_the_import_linter_contracts_are_kept() -> None:
    # Execute
    result = subprocess.run(
        [str(Path(sys.executable).parent / "lint-imports"), "--no-cache"],
        cwd=REPO_ROOT,
        capture_output=True,
        text=True,
        check=False,
    )

    # Assert
    assert result.returncode == 0, result.stdout + result.stderr
    assert "0 broken" in result.stdout
