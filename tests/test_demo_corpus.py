"""Tests for common/demo.py: the seeded, label-disjoint demo corpus."""

from __future__ import annotations

from collections.abc import Callable

import pytest

from common.data import Example
from common.demo import DOMAINS, demo_examples, demo_test_examples, demo_train_examples


def _texts(seed: int, split: str = "train") -> list[str]:
    return [e.text for e in demo_examples(10, seed, split)]


def test_corpus_is_deterministic_for_a_seed() -> None:
    # Prepare / Execute
    first, second = _texts(7), _texts(7)

    # Assert
    assert first == second


def test_corpus_differs_across_seeds() -> None:
    # Prepare / Execute
    first, second = _texts(7), _texts(8)

    # Assert
    assert first != second


def test_each_domains_labels_are_disjoint_from_other_domains() -> None:
    # Prepare
    examples = demo_train_examples(0)

    # Execute
    by_domain: dict[str, set[str]] = {}
    for example in examples:
        by_domain.setdefault(example.extra["domain"], set()).add(example.label)

    # Assert
    domains = sorted(by_domain)
    assert domains == sorted(DOMAINS)
    for i, first in enumerate(domains):
        for second in domains[i + 1 :]:
            assert not by_domain[first] & by_domain[second], (first, second)


def test_train_and_test_differ() -> None:
    # Prepare / Execute
    train, test = _texts(0, "train"), _texts(0, "test")

    # Assert
    assert train != test


def test_train_and_test_have_the_same_labels() -> None:
    # Prepare / Execute
    train = {e.label for e in demo_train_examples(0)}
    test = {e.label for e in demo_test_examples(0)}

    # Assert
    assert train == test


@pytest.mark.parametrize(
    ("factory", "per_intent"), [(demo_train_examples, 40), (demo_test_examples, 15)]
)
def test_corpus_has_the_documented_rows_per_intent(
    factory: Callable[[int], list[Example]], per_intent: int
) -> None:
    # Prepare
    intents = sum(len(intents) for intents in DOMAINS.values())

    # Execute
    examples = factory(0)

    # Assert
    assert len(examples) == intents * per_intent


def test_texts_are_non_empty_and_trimmed() -> None:
    # Prepare / Execute
    examples = demo_examples(20, 0, "train")

    # Assert
    assert all(e.text and e.text == e.text.strip() for e in examples)
