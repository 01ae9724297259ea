"""The ``head.*`` keys: how the classification head starts."""

from __future__ import annotations

from dataclasses import dataclass

from common.config.errors import Refusal, refuse_if
from common.config.keys import above, one_of, satisfies, setting

HEAD_INITS = ("label-names", "random", "closed-form")
#: ``head.closed-form``'s variants (solved in :mod:`common.closed_form`).
CLOSED_FORMS = ("lda", "ridge", "ncm")


@dataclass(frozen=True)
class HeadConfig:
    """How the classification head starts (``head.*``)."""

    init: str = setting(
        "head.init",
        "label-names",
        "`label-names`: head rows are the scaled, normalised embeddings of the label "
        "names (or of their descriptions), so round 0 already classifies zero-shot; "
        "`random`: small random rows; `closed-form`: before round 0 the sites send "
        "sums of their rows' frozen-backbone features (through the secure sum when "
        "`secagg.enabled`) and the coordinator solves the head "
        "(`head.closed-form`); it starts from the label-name rows should that round "
        "fail",
        check=one_of(HEAD_INITS),
    )
    closed_form: str = setting(
        "head.closed-form",
        "lda",
        "with `head.init = closed-form`: `lda` (shared covariance; counts, class "
        "sums and the Gram matrix go up), `ridge` (least squares onto one-hot "
        "labels; the same sums), `ncm` (nearest class mean; counts and class sums "
        "only)",
        check=one_of(CLOSED_FORMS),
    )
    closed_form_shrinkage: float = setting(
        "head.closed-form-shrinkage",
        0.1,
        "`lda`: weight of `tr(S)/d * I` in the shrunk covariance; `ridge`: the "
        "penalty over the mean eigenvalue of the Gram matrix; in (0, 1]",
        check=satisfies(lambda value: 0.0 < value <= 1.0, "must be in (0, 1]"),
    )
    feature_clip: float = setting(
        "head.feature-clip",
        100.0,
        "with `head.init = closed-form`: each row's pooled features are scaled into "
        "this L2 ball before they are summed (it bounds the secure sum; above every "
        "row's norm it changes nothing); a site holds at most `secagg.max-weight` "
        "rows for a secure statistics round",
        check=above(0, "must be > 0"),
    )
    label_descriptions: str = setting(
        "head.label-descriptions",
        "",
        'JSON file `{"label": "text to embed for it"}`; labels it leaves out use '
        'their names (`book_flight` -> "book flight"); read only with '
        "`head.init = label-names`",
    )


def descriptions_need_label_names(head: HeadConfig) -> Refusal | None:
    """``head.label-descriptions`` is read only by the label-name rows (``head.init =
    label-names``, and ``closed-form``'s fallback)."""
    return refuse_if(
        bool(head.label_descriptions) and head.init == "random",
        "head.label-descriptions",
        "is only read when head.init = label-names (or closed-form)",
    )


RULES = (descriptions_need_label_names,)
