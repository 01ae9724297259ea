"""``eval.every``: the coordinator evaluates before the first round, every N rounds
and after the last; the rounds between leave their ``eval_*`` columns empty."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from common.config import ConfigError, RunConfig
from tests.test_rules import corpus, federate  # noqa: F401  (corpus is a fixture)


def test_eval_every_evaluates_round_0_its_multiples_and_the_last_round(
    tiny_backbone: Path,
    corpus: tuple[Path, Path],  # noqa: F811
    tmp_path: Path,
) -> None:
    # Execute
    run = federate(
        tiny_backbone,
        corpus,
        tmp_path / "out",
        **{"num-server-rounds": 3, "eval.every": 2},
    )

    # Assert: every round trained and wrote its line; rounds 0, 2, 3 were evaluated
    assert [row["round"] for row in run.rows] == [0, 1, 2, 3]
    assert all(row["clients"] == 2 for row in run.rows[1:])
    evaluated = [row["round"] for row in run.rows if row["eval_accuracy"] is not None]
    assert evaluated == [0, 2, 3]
    assert run.rows[1]["eval_loss"] is None
    summary = json.loads((tmp_path / "out" / "summary.json").read_text())
    assert summary["final"]["eval_accuracy"] is not None
    assert summary["best"]["round"] in (0, 2, 3)


@pytest.mark.parametrize(
    ("flat", "words"),
    [
        ({"eval.every": 0}, "at least 1"),
        (
            {
                "eval.every": 2,
                "dp.enabled": True,
                "dp.target-epsilon": 8.0,
            },
            "dp.target-epsilon",
        ),
    ],
)
def test_an_eval_cadence_that_could_end_unevaluated_is_refused_naming_the_key(
    flat: dict[str, object], words: str
) -> None:
    with pytest.raises(ConfigError, match=f"config key 'eval.every'.*{words}"):
        RunConfig.from_flat(flat)
