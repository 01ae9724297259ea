"""The ``head.*`` keys: how the classification head starts."""

from __future__ import annotations

from dataclasses import dataclass

from common.config.errors import Refusal, refuse_if
from common.config.keys import one_of, setting

HEAD_INITS = ("label-names", "random")


@dataclass(frozen=True)
class HeadConfig:
    """How the classification head starts (``head.*``)."""

    init: str = setting(
        "head.init",
        "label-names",
        "`label-names`: head rows are the scaled, normalised embeddings of the label "
        "names (or of their descriptions), so round 0 already classifies zero-shot; "
        "`random`: small random rows",
        check=one_of(HEAD_INITS),
    )
    label_descriptions: str = setting(
        "head.label-descriptions",
        "",
        'JSON file `{"label": "text to embed for it"}`; labels it leaves out use '
        'their names (`book_flight` -> "book flight"); read only with '
        "`head.init = label-names`",
    )


def descriptions_need_label_names(head: HeadConfig) -> Refusal | None:
    """``head.label-descriptions`` is read only by ``head.init = label-names``."""
    return refuse_if(
        bool(head.label_descriptions) and head.init != "label-names",
        "head.label-descriptions",
        "is only read when head.init = label-names",
    )


RULES = (descriptions_need_label_names,)
