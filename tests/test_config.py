"""Tests for common/config/: the one reader of the flat kebab-case keys."""

from __future__ import annotations

import tomllib
from pathlib import Path

import pytest

from common.config import (
    AGGREGATION_RULES,
    DEFAULTS,
    KEYS,
    RESUMABLE_CHANGES,
    ConfigError,
    RunConfig,
    parse_assignment,
    reference,
)

REPO_ROOT = Path(__file__).resolve().parent.parent


def test_empty_mapping_gives_the_defaults() -> None:
    # Prepare / Execute
    config = RunConfig.from_flat({})

    # Assert
    assert dict(config.flat) == DEFAULTS


def test_defaults_equal_pyproject_app_config() -> None:
    # Prepare
    pyproject = tomllib.loads((REPO_ROOT / "pyproject.toml").read_text())

    # Execute
    app_config = pyproject["tool"]["flwr"]["app"]["config"]

    # Assert
    assert app_config == DEFAULTS


def test_pyproject_app_config_values_have_the_default_types() -> None:
    # Prepare
    pyproject = tomllib.loads((REPO_ROOT / "pyproject.toml").read_text())
    app_config = pyproject["tool"]["flwr"]["app"]["config"]

    # Execute
    mismatched = {
        key: (type(value).__name__, type(DEFAULTS[key]).__name__)
        for key, value in app_config.items()
        if key in DEFAULTS and type(value) is not type(DEFAULTS[key])
    }

    # Assert
    assert mismatched == {}


def test_unknown_key_is_refused_with_a_suggestion() -> None:
    # Prepare
    flat = {"lora.rank": 16}

    # Execute
    with pytest.raises(ConfigError) as caught:
        RunConfig.from_flat(flat)

    # Assert
    message = str(caught.value)
    assert "'lora.rank'" in message
    assert "did you mean 'lora.r'" in message


def test_unknown_key_without_a_close_match_is_still_named() -> None:
    # Prepare
    flat = {"zzzz": 1}

    # Execute
    with pytest.raises(ConfigError) as caught:
        RunConfig.from_flat(flat)

    # Assert
    assert "'zzzz'" in str(caught.value)
    assert "did you mean" not in str(caught.value)


def test_config_error_is_a_value_error() -> None:
    # Prepare / Execute / Assert
    assert issubclass(ConfigError, ValueError)


@pytest.mark.parametrize(
    ("key", "value"),
    [
        ("lora.r", "eight"),
        ("lora.r", 8.5),
        ("lora.r", True),
        ("lora.dropout", "high"),
        ("lora.dropout", False),
        ("sim.local-baseline", "yes"),
        ("sim.local-baseline", 1),
        ("model.name", 3),
        ("train.lr", None),
    ],
)
def test_wrong_type_is_refused_naming_the_key(key: str, value: object) -> None:
    # Prepare
    flat = {key: value}

    # Execute
    with pytest.raises(ConfigError) as caught:
        RunConfig.from_flat(flat)

    # Assert
    assert f"'{key}'" in str(caught.value)


@pytest.mark.parametrize(
    ("key", "text", "expected"),
    [
        ("sim.local-baseline", "true", True),
        ("sim.local-baseline", "false", False),
        ("sim.local-baseline", "True", True),
        ("sim.local-baseline", "FALSE", False),
        ("lora.r", "16", 16),
        ("num-server-rounds", "5", 5),
        ("lora.dropout", "0.1", 0.1),
        ("train.lr", "1e-3", 1e-3),
        ("train.timeout", "30", 30.0),
        ("model.name", "/models/bert", "/models/bert"),
    ],
)
def test_strings_from_set_are_coerced_to_the_default_type(
    key: str, text: str, expected: object
) -> None:
    # Prepare
    flat = {key: text}

    # Execute
    value = RunConfig.from_flat(flat).flat[key]

    # Assert
    assert value == expected
    assert type(value) is type(DEFAULTS[key])


def test_integer_for_a_float_key_becomes_a_float() -> None:
    # Prepare
    flat = {"train.timeout": 60}

    # Execute
    config = RunConfig.from_flat(flat)

    # Assert
    assert config.train.timeout == 60.0
    assert isinstance(config.train.timeout, float)


@pytest.mark.parametrize(
    ("key", "value"),
    [
        ("num-server-rounds", 0),
        ("model.name", ""),
        ("model.distribute", "sometimes"),
        ("model.max-length", 4),
        ("lora.r", 0),
        ("lora.alpha", 0),
        ("lora.dropout", 1.0),
        ("lora.dropout", -0.1),
        ("lora.target-modules", ""),
        ("lora.target-modules", " , ,"),
        ("data.partition", "random"),
        ("data.partition", "column:"),
        ("data.dirichlet-alpha", 0.0),
        ("data.holdout-fraction", 0.0),
        ("data.holdout-fraction", 1.0),
        ("sim.num-clients", 0),
        ("sim.cpus-per-client", 0.0),
        ("sim.gpus-per-client", -1.0),
        ("train.fraction", 0.0),
        ("train.fraction", 1.5),
        ("train.min-clients", 0),
        ("train.local-epochs", 0),
        ("train.max-steps", -1),
        ("train.batch-size", 0),
        ("train.lr", 0.0),
        ("train.lr", "nan"),
        ("train.lr", "inf"),
        ("train.weight-decay", -0.01),
        ("train.timeout", 0.0),
    ],
)
def test_invalid_value_is_refused_naming_the_key(key: str, value: object) -> None:
    # Prepare
    flat = {key: value}

    # Execute
    with pytest.raises(ConfigError) as caught:
        RunConfig.from_flat(flat)

    # Assert
    assert f"'{key}'" in str(caught.value)


@pytest.mark.parametrize(
    "key",
    [
        "data.dirichlet-alpha",
        "train.weight-decay",
        "sim.cpus-per-client",
        "sim.gpus-per-client",
    ],
)
def test_infinite_value_is_refused_naming_the_key(key: str) -> None:
    # Prepare
    flat = {key: "inf"}

    # Execute
    with pytest.raises(ConfigError) as caught:
        RunConfig.from_flat(flat)

    # Assert
    assert f"'{key}'" in str(caught.value)


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("query,value", ("query", "value")),
        (" q_proj , v_proj ,", ("q_proj", "v_proj")),
        ("query,key,value,dense", ("query", "key", "value", "dense")),
        ("query", ("query",)),
    ],
)
def test_lora_target_modules_are_split_on_commas(
    text: str, expected: tuple[str, ...]
) -> None:
    # Prepare
    flat = {"lora.target-modules": text}

    # Execute
    targets = RunConfig.from_flat(flat).lora.target_modules

    # Assert
    assert targets == expected


def test_data_labels_are_split_on_commas() -> None:
    # Prepare
    flat = {"data.labels": "neg, pos ,"}

    # Execute
    labels = RunConfig.from_flat(flat).data.labels

    # Assert
    assert labels == ("neg", "pos")


def test_column_partition_names_its_column() -> None:
    # Prepare
    flat = {"data.partition": "column:site"}

    # Execute
    data = RunConfig.from_flat(flat).data

    # Assert
    assert data.partition_column == "site"


@pytest.mark.parametrize("kind", ["iid", "dirichlet"])
def test_non_column_partition_has_no_column(kind: str) -> None:
    # Prepare / Execute
    data = RunConfig.from_flat({"data.partition": kind}).data

    # Assert
    assert data.partition_column is None


def test_with_overrides_replaces_only_the_given_keys() -> None:
    # Prepare
    base = RunConfig.from_flat({"seed": 7})

    # Execute
    changed = base.with_overrides(**{"lora.r": 4})

    # Assert
    assert changed.lora.r == 4
    assert changed.seed == 7


def test_with_overrides_validates() -> None:
    # Prepare
    base = RunConfig.from_flat({})

    # Execute / Assert
    with pytest.raises(ConfigError, match="'lora.r'"):
        base.with_overrides(**{"lora.r": 0})


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("lora.r=16", ("lora.r", "16")),
        (" lora.r = 16 ", ("lora.r", "16")),
        ('model.name="my model"', ("model.name", "my model")),
        ("data.path=", ("data.path", "")),
        ("data.labels=a=b", ("data.labels", "a=b")),
    ],
)
def test_parse_assignment_splits_key_and_value(
    text: str, expected: tuple[str, str]
) -> None:
    # Prepare / Execute
    result = parse_assignment(text)

    # Assert
    assert result == expected


@pytest.mark.parametrize("text", ["lora.r", "=16", "  =16", ""])
def test_parse_assignment_refuses_text_without_key_and_equals(text: str) -> None:
    # Prepare / Execute / Assert
    with pytest.raises(ConfigError, match="key=value"):
        parse_assignment(text)


def test_parsed_assignment_feeds_from_flat() -> None:
    # Prepare
    key, value = parse_assignment("sim.local-baseline=false")

    # Execute
    config = RunConfig.from_flat({key: value})

    # Assert
    assert config.sim.local_baseline is False


def test_key_reference_in_docs_is_current() -> None:
    # Prepare
    written = (REPO_ROOT / "docs" / "CONFIG.md").read_text()

    # Execute
    generated = reference.markdown()

    # Assert
    assert written == generated, (
        "docs/CONFIG.md is stale; regenerate it with "
        "`python -m common.config.reference > docs/CONFIG.md`"
    )


def test_every_key_is_declared_once_with_a_one_line_doc() -> None:
    # Prepare / Execute
    names = [key.name for key in KEYS]

    # Assert
    assert len(names) == len(set(names)) == len(DEFAULTS)
    assert all(key.doc and "\n" not in key.doc for key in KEYS)


def test_only_keys_declared_resumable_may_change_on_resume() -> None:
    # Prepare
    saved = RunConfig.from_flat({}).as_dict()
    resumed = RunConfig.from_flat({"num-server-rounds": 9, "output.dir": "x"})

    # Execute / Assert
    resumed.check_resumable_from(saved)
    with pytest.raises(ConfigError, match=r"lora\.r \(8 -> 4\)"):
        resumed.with_overrides(**{"lora.r": 4}).check_resumable_from(saved)
    assert set(RESUMABLE_CHANGES) == {key.name for key in KEYS if key.resumable}


def _refused_key(flat: dict[str, object]) -> str | None:
    try:
        RunConfig.from_flat(flat)
    except ConfigError as error:
        return str(error).split("'")[1]
    return None


@pytest.mark.parametrize("rule", list(AGGREGATION_RULES))
def test_secure_aggregation_refuses_exactly_the_rules_needing_each_update(
    rule: str,
) -> None:
    # Prepare
    flat = {"aggregation": rule, "secagg.enabled": True}

    # Execute
    refused = _refused_key(flat) == "aggregation"

    # Assert
    assert refused == AGGREGATION_RULES[rule].needs_individual_updates


@pytest.mark.parametrize("rule", list(AGGREGATION_RULES))
def test_head_only_training_refuses_exactly_the_rules_treating_lora_factors(
    rule: str,
) -> None:
    # Prepare
    flat = {"aggregation": rule, "train.mode": "head"}

    # Execute
    refused = _refused_key(flat) == "aggregation"

    # Assert
    assert refused == AGGREGATION_RULES[rule].treats_lora_factors
