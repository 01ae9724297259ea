"""The ``fedgraft`` command line: configuration, early errors, predict."""

from __future__ import annotations

import shlex
import tomllib
from pathlib import Path

import pytest

from common.config import DEFAULTS, ConfigError
from simulations.cli import load_config, main


def test_toml_file_and_set_overrides_combine_with_set_winning(tmp_path: Path) -> None:
    config_file = tmp_path / "run.toml"
    config_file.write_text('num-server-rounds = 5\n"train.lr" = 0.01\n')
    config = load_config(
        str(config_file), ["train.lr=0.02", "lora.target-modules=query,key,value"]
    )
    assert config.num_server_rounds == 5 and config.train.lr == 0.02
    assert config.lora.target_modules == ("query", "key", "value")


def test_a_pyproject_style_table_is_read_too(tmp_path: Path) -> None:
    config_file = tmp_path / "pyproject.toml"
    config_file.write_text("[tool.flwr.app.config]\nnum-server-rounds = 7\n")
    assert load_config(str(config_file), []).num_server_rounds == 7


def test_nested_tables_are_refused_with_the_flat_form(tmp_path: Path) -> None:
    config_file = tmp_path / "nested.toml"
    config_file.write_text("[train]\nlr = 0.1\n")
    with pytest.raises(ConfigError, match='flat quoted keys such as "train.lr"'):
        load_config(str(config_file), [])


def test_a_missing_config_file_is_named(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="absent.toml: config file not found"):
        load_config(str(tmp_path / "absent.toml"), [])


@pytest.mark.parametrize(
    ("assignment", "message"),
    [
        ("train.learning-rate=0.1", "unknown config key"),
        ("train.lr=fast", "'train.lr' expects a finite float"),
        ("data.partition=random", "data.partition"),
    ],
)
def test_simulate_refuses_bad_config_before_anything_runs(
    assignment: str, message: str, capsys: pytest.CaptureFixture[str]
) -> None:
    code = main(["simulate", "--set", assignment])
    assert code == 2 and message in capsys.readouterr().err


def test_simulate_refuses_a_missing_data_file_naming_it(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    code = main(["simulate", "--set", f"data.path={tmp_path / 'nope.jsonl'}"])
    assert code == 2 and "nope.jsonl: no such file" in capsys.readouterr().err


def test_keys_output_is_a_config_file_of_the_defaults(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    # Prepare
    assert main(["keys"]) == 0
    pasted = tmp_path / "keys.toml"
    pasted.write_text(capsys.readouterr().out)

    # Execute
    config = load_config(str(pasted), [])

    # Assert
    assert config.flat == DEFAULTS
    assert len(tomllib.loads(pasted.read_text())) == len(DEFAULTS)


def test_keys_set_format_gives_the_defaults_as_overrides(
    capsys: pytest.CaptureFixture[str],
) -> None:
    # Prepare
    assert main(["keys", "--format", "set"]) == 0
    options = shlex.split(capsys.readouterr().out)

    # Execute
    config = load_config(None, options[1::2])

    # Assert
    assert options[::2] == ["--set"] * len(DEFAULTS)
    assert config.flat == DEFAULTS


def test_predict_on_a_folder_without_a_head_says_what_to_point_at(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    assert main(["predict", str(tmp_path), "hello"]) == 2
    assert "point at the merged/ folder" in capsys.readouterr().err


def test_simulate_refuses_secure_aggregation_that_would_overflow_even_the_64_bit_ring(
    capsys: pytest.CaptureFixture[str],
) -> None:
    code = main(
        [
            "simulate",
            "--set",
            "secagg.enabled=true",
            "--set",
            "secagg.clip-norm=1e16",
        ]
    )
    assert (
        code == 2
        and "lower secagg.clip-norm or sample fewer clients" in capsys.readouterr().err
    )


def test_resume_without_a_checkpoint_names_the_missing_file(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    assert main(["simulate", "--resume", str(tmp_path)]) == 2
    assert (
        "checkpoint.safetensors: no checkpoint to resume from"
        in capsys.readouterr().err
    )
