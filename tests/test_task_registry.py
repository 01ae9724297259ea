"""Tasks and aggregation rules are asked, not named: the registries are the only
places that know their names (issue 16)."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

from client.sites import SITE_OPENERS
from common.config import AGGREGATION_RULES, TASKS, ConfigError, RunConfig
from common.tasks import TASKS as REGISTERED
from common.tasks import task_named, write_task_file
from simulations.cli import main

ROOT = Path(__file__).resolve().parent.parent
#: Benchmarks compare names only to pick the runs a user asked for.
SOURCE_PACKAGES = ("common", "client", "server", "simulations")
#: Where a task's name may be compared: the task packages declare their own.
TASK_HOMES = (ROOT / "common" / "tasks",)
#: Where a rule's name may appear: its declaration and its class.
RULE_HOMES = (
    ROOT / "common" / "config" / "aggregation_rules.py",
    ROOT / "server" / "aggregation",
)


def _compared_strings(path: Path) -> list[tuple[int, str]]:
    """Each string constant ``path`` compares with ``==``, ``!=``, ``in`` or
    ``not in`` (either side, or inside a compared tuple, list or set)."""
    found = []
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if not isinstance(node, ast.Compare):
            continue
        for operand in [node.left, *node.comparators]:
            items = (
                operand.elts
                if isinstance(operand, ast.Tuple | ast.List | ast.Set)
                else [operand]
            )
            found += [
                (item.lineno, item.value)
                for item in items
                if isinstance(item, ast.Constant) and isinstance(item.value, str)
            ]
    return found


def _comparisons_of(names: set[str], homes: tuple[Path, ...]) -> list[str]:
    places = []
    for package in SOURCE_PACKAGES:
        for path in sorted((ROOT / package).rglob("*.py")):
            if any(path.is_relative_to(home) for home in homes):
                continue
            places += [
                f"{path.relative_to(ROOT)}:{line}: {value!r}"
                for line, value in _compared_strings(path)
                if value in names
            ]
    return places


def test_no_task_name_is_compared_outside_the_task_registry() -> None:
    # Execute
    places = _comparisons_of(set(REGISTERED), TASK_HOMES)

    # Assert
    assert places == [], "ask the task (common.tasks) instead: " + "; ".join(places)


def test_no_rule_name_is_compared_outside_the_rule_declarations() -> None:
    # Execute
    places = _comparisons_of(set(AGGREGATION_RULES), RULE_HOMES)

    # Assert
    assert places == [], "read the rule's traits instead: " + "; ".join(places)


def test_the_name_scan_finds_a_comparison(tmp_path: Path) -> None:
    # Prepare
    source = tmp_path / "probe.py"
    source.write_text('if task == "causal-lm" or rule in ("ffa", "x"):\n    pass\n')

    # Execute
    found = _compared_strings(source)

    # Assert
    assert (1, "causal-lm") in found and (1, "ffa") in found


def test_model_task_accepts_exactly_the_registered_tasks() -> None:
    # Assert
    assert TASKS == tuple(REGISTERED) == ("text-cls", "causal-lm", "image-cls")
    with pytest.raises(ConfigError, match="model.task"):
        RunConfig.from_flat({"model.task": "seq2seq"})


def test_every_registered_task_has_a_site() -> None:
    # Assert
    assert set(SITE_OPENERS) == set(REGISTERED.values())


def test_an_unknown_task_name_lists_the_known_ones() -> None:
    # Execute / Assert
    with pytest.raises(ValueError, match="text-cls, causal-lm, image-cls"):
        task_named("seq2seq")


@pytest.mark.parametrize(
    ("task", "flat", "key"),
    [
        ("image-cls", {"head.init": "label-names", "data.path": "x"}, "head.init"),
        ("image-cls", {"head.init": "random"}, "data.path"),
        ("causal-lm", {"train.mode": "lp-ft"}, "train.mode"),
        ("text-cls", {"data.prompt-column": "prompt"}, "data.prompt-column"),
    ],
)
def test_a_task_refuses_what_it_cannot_run(
    task: str, flat: dict[str, object], key: str
) -> None:
    # Execute / Assert
    with pytest.raises(ConfigError, match=f"config key '{key}'"):
        RunConfig.from_flat({"model.task": task, **flat})


@pytest.mark.parametrize(
    ("recorded", "command", "message"),
    [
        ("causal-lm", "predict", "is a causal language model; use `fedgraft generate"),
        ("image-cls", "generate", "image-cls model; `generate` needs a causal-lm run"),
        ("seq2seq", "predict", "task 'seq2seq' is not one of text-cls, causal-lm"),
    ],
)
def test_a_saved_model_is_used_only_as_its_task_allows(
    recorded: str,
    command: str,
    message: str,
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
) -> None:
    # Prepare
    write_task_file(tmp_path, recorded)

    # Execute
    code = main([command, str(tmp_path), "a text"])

    # Assert
    assert code == 2 and message in capsys.readouterr().err


def test_every_registered_task_has_a_baseline_trainee() -> None:
    # Prepare
    from simulations.baselines import TRAINEES

    # Assert
    assert set(TRAINEES) == set(REGISTERED.values())
