"""LoRA factor pairs as low-rank updates: products, and factorisation at a rank.

A LoRA module adds ``(alpha / r) · B·A`` to a frozen weight, with ``A`` of shape
``(r, in)`` and ``B`` of shape ``(out, r)``. Clients of different ranks (FlexLoRA) can
only be combined through these products; the truncated SVD turns a product back into
factors of any rank. Truncations are nested: the rank-``k`` truncation of a rank-``K``
truncation (``k <= K``) is the rank-``k`` truncation of the original.
"""

from __future__ import annotations

from collections.abc import Mapping

import numpy as np

from common.sharing import LORA_A, LORA_B


def factor_pairs(names: list[str] | Mapping[str, object]) -> dict[str, tuple[str, str]]:
    """``module -> (A name, B name)`` for every LoRA module among ``names``.

    Raises
    ------
    ValueError
        When a module has one factor without the other.
    """
    pairs: dict[str, tuple[str, str]] = {}
    for name in names:
        if LORA_A in name:
            module = name.split(LORA_A)[0]
            partner = name.replace(LORA_A, LORA_B)
            if partner not in names:
                raise ValueError(f"LoRA factor {name!r} has no {partner!r}")
            pairs[module] = (name, partner)
    return pairs


def rank_of(state: Mapping[str, np.ndarray]) -> int | None:
    """The rank of the LoRA factors in ``state`` (``None`` without factors)."""
    ranks = {state[a].shape[0] for a, _ in factor_pairs(state).values()}
    if len(ranks) > 1:
        raise ValueError(f"LoRA factors of mixed ranks {sorted(ranks)}")
    return ranks.pop() if ranks else None


def product(a: np.ndarray, b: np.ndarray, alpha: float) -> np.ndarray:
    """The update ``(alpha / r) · B·A`` of one module: ``(out, in) float64``."""
    rank = a.shape[0]  # a: (r, in), b: (out, r)
    return (alpha / rank) * (b.astype(np.float64) @ a.astype(np.float64))


def factorise(
    update: np.ndarray, rank: int, alpha: float
) -> tuple[np.ndarray, np.ndarray]:
    """The rank-``rank`` truncated SVD of ``update`` as LoRA factors ``(A, B)``.

    ``A = V_rᵀ`` (orthonormal rows, so a zero update still gives B a gradient, like
    LoRA's own initialisation) and ``B = U_r·S_r·(rank / alpha)``, so that
    ``(alpha / rank) · B·A`` is the best rank-``rank`` approximation of ``update``.
    """
    u, s, vt = np.linalg.svd(update, full_matrices=False)  # u: (out, k), vt: (k, in)
    if rank > s.size:
        raise ValueError(f"rank {rank} exceeds the update's size {update.shape}")
    a = vt[:rank]  # (rank, in)
    b = u[:, :rank] * s[:rank] * (rank / alpha)  # (out, rank)
    return a.astype(np.float32), b.astype(np.float32)


def at_rank(
    state: Mapping[str, np.ndarray], rank: int, alpha: float
) -> dict[str, np.ndarray]:
    """``state`` with every LoRA pair refactorised at ``rank`` (other tensors
    kept).

    A pair whose B is still zero (LoRA's initialisation) has no update to keep; its
    first ``rank`` rows of A and columns of B are taken as they are, so the site starts
    from the same seeded random A rather than from the SVD's arbitrary basis of a zero
    matrix.
    """
    out = dict(state)
    for a_name, b_name in factor_pairs(state).values():
        a, b = state[a_name], state[b_name]  # a: (R, in), b: (out, R)
        if not np.any(b):
            out[a_name] = np.ascontiguousarray(a[:rank], np.float32)
            out[b_name] = np.zeros((b.shape[0], rank), np.float32)
            continue
        out[a_name], out[b_name] = factorise(product(a, b, alpha), rank, alpha)
    return out
