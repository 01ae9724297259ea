"""The built-in demo corpus: seeded, deterministic, and label-disjoint across domains.

Each domain has its own vocabulary and its own intents, and the demo gives one domain
to each client. A client alone can therefore only ever predict its own intents, while
the federated model learns all of them: the shared model visibly beats every client.
"""

from __future__ import annotations

import numpy as np

from common.data import Example

#: domain -> intent -> phrases that express it.
DOMAINS: dict[str, dict[str, list[str]]] = {
    "banking": {
        "transfer_money": [
            "send money to",
            "wire funds to",
            "move cash over to",
            "transfer a payment to",
        ],
        "check_balance": [
            "how much is in",
            "show the balance of",
            "what is left in",
            "check the funds in",
        ],
        "freeze_card": [
            "block the card for",
            "freeze my debit card on",
            "lock the credit card of",
            "stop the card linked to",
        ],
    },
    "travel": {
        "book_flight": [
            "book a flight for",
            "reserve plane tickets for",
            "get me a seat on a flight for",
            "find airfare for",
        ],
        "hotel_reservation": [
            "reserve a hotel room for",
            "book a place to stay for",
            "find lodging for",
            "get a hotel suite for",
        ],
        "lost_luggage": [
            "the airline lost the suitcase of",
            "my baggage never arrived for",
            "find the missing bags of",
            "report lost luggage for",
        ],
    },
    "kitchen": {
        "recipe_request": [
            "give me a recipe for",
            "how do I cook",
            "what are the steps to bake",
            "show a dish made with",
        ],
        "nutrition_info": [
            "how many calories are in",
            "what protein does",
            "list the nutrients of",
            "is there much sugar in",
        ],
        "cooking_time": [
            "how long should I roast",
            "how many minutes to boil",
            "what is the oven time for",
            "when is it done grilling",
        ],
    },
    "home": {
        "lights_on": [
            "switch on the lamps in",
            "turn the lights on in",
            "brighten the room of",
            "power up the lighting in",
        ],
        "thermostat": [
            "set the heating in",
            "make it warmer in",
            "lower the temperature of",
            "adjust the thermostat in",
        ],
        "lock_doors": [
            "lock the front door of",
            "secure every entrance of",
            "bolt the doors in",
            "make sure the locks are shut in",
        ],
    },
}

_OBJECTS: dict[str, list[str]] = {
    "banking": [
        "my savings account",
        "the checking account",
        "my joint account",
        "the business account",
    ],
    "travel": [
        "the trip to Lisbon",
        "our vacation in Kyoto",
        "the journey to Denver",
        "the weekend in Rome",
    ],
    "kitchen": [
        "a chicken curry",
        "the lentil soup",
        "fresh salmon",
        "a loaf of sourdough",
    ],
    "home": [
        "the living room",
        "the upstairs bedroom",
        "the garage",
        "the guest house",
    ],
}

_OPENERS = [
    "please",
    "can you",
    "I need to",
    "could you",
    "hey, ",
    "quickly",
    "",
    "I would like to",
]
_CLOSERS = [
    "",
    "today",
    "right now",
    "please",
    "when you can",
    "this evening",
    "thanks",
]


def demo_examples(rows_per_intent: int, seed: int, split: str) -> list[Example]:
    """Generate ``rows_per_intent`` rows for every intent of every domain.

    Parameters
    ----------
    rows_per_intent : int
        Rows per intent.
    seed : int
        The corpus is a pure function of the seed and the split.
    split : str
        ``train`` or ``test``; the two use different random streams.

    Returns
    -------
    list[Example]
        Rows with ``text``, ``label`` and the ``domain`` column.
    """
    stream = {"train": 0, "test": 1}[split]
    rng = np.random.default_rng([seed, stream])
    examples = []
    for domain, intents in DOMAINS.items():
        for intent, phrases in intents.items():
            for _ in range(rows_per_intent):
                words = [
                    _OPENERS[rng.integers(len(_OPENERS))],
                    phrases[rng.integers(len(phrases))],
                    _OBJECTS[domain][rng.integers(len(_OBJECTS[domain]))],
                    _CLOSERS[rng.integers(len(_CLOSERS))],
                ]
                text = " ".join(word for word in words if word).strip()
                examples.append(
                    Example(
                        text=text,
                        label=intent,
                        extra={"domain": domain},
                        where=f"<demo corpus {split} row {len(examples)}>",
                    )
                )
    return examples


def demo_train_examples(seed: int) -> list[Example]:
    """The demo's training rows: 40 per intent, 12 intents in 4 domains."""
    return demo_examples(40, seed, "train")


def demo_test_examples(seed: int) -> list[Example]:
    """The demo's held-out rows: 15 per intent."""
    return demo_examples(15, seed, "test")
