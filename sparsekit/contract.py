"""The one contract every backend and corrector speaks: ``(out, lse)``.

``out`` is attention output over some set of keys, ``lse`` the float32 natural-log
log-sum-exp of the *scaled* scores over exactly those keys. Two partial results over
disjoint key sets merge exactly into the result over their union (xformers' and
FlashAttention's split-KV algebra), which is what lets sparse pieces be computed
separately and combined.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Iterable

import torch

__all__ = ["AttentionResult", "merge", "merge_many", "LN2", "lse_from_base2"]

LN2 = math.log(2.0)


@dataclass(frozen=True)
class AttentionResult:
    """Attention over a set of keys.

    Attributes
    ----------
    out : (batch, q_heads, q_len, head_dim)
        Output rows, in the dtype of the query.
    lse : (batch, q_heads, q_len), float32
        ``log(sum_j exp(scale * q . k_j))`` over the keys this result attended
        (natural log). ``-inf`` marks a row that attended no key (its ``out`` is 0).

    For rows a corrector changed, ``lse`` is documented by that corrector (see
    :class:`sparsekit.Delta`); such rows are estimates, not exact partials.
    """

    out: torch.Tensor
    lse: torch.Tensor

    def __iter__(self):  # allows ``out, lse = result``
        yield self.out
        yield self.lse


def lse_from_base2(lse2: torch.Tensor) -> torch.Tensor:
    """Convert a base-2 log-sum-exp (FlashInfer's convention) to natural log, float32."""
    return lse2.float() * LN2


def _compute_dtype(dtype: torch.dtype) -> torch.dtype:
    """float64 stays float64; every narrower float accumulates in float32."""
    return torch.float64 if dtype == torch.float64 else torch.float32


def merge(a: AttentionResult, b: AttentionResult) -> AttentionResult:
    """Combine two partial results over *disjoint* key sets into the result over their union.

    ``out = (exp(lse_a) out_a + exp(lse_b) out_b) / (exp(lse_a) + exp(lse_b))`` computed
    stably in float32; ``lse = logaddexp(lse_a, lse_b)``. Rows where both sides are
    empty (``-inf``) stay empty. Shapes must match exactly.
    """
    if a.out.shape != b.out.shape or a.lse.shape != b.lse.shape:
        raise ValueError(
            f"merge: shapes differ: out {tuple(a.out.shape)} vs {tuple(b.out.shape)}, "
            f"lse {tuple(a.lse.shape)} vs {tuple(b.lse.shape)}"
        )
    la, lb = a.lse.float(), b.lse.float()
    lse = torch.logaddexp(la, lb)
    finite = torch.isfinite(lse)
    safe = torch.where(finite, lse, torch.zeros_like(lse))
    wa = torch.where(finite, torch.exp(la - safe), torch.zeros_like(lse)).unsqueeze(-1)
    wb = torch.where(finite, torch.exp(lb - safe), torch.zeros_like(lse)).unsqueeze(-1)
    cd = _compute_dtype(a.out.dtype)
    out = wa.to(cd) * a.out.to(cd) + wb.to(cd) * b.out.to(cd)
    return AttentionResult(out.to(a.out.dtype), lse)


def merge_many(results: Iterable[AttentionResult]) -> AttentionResult:
    """:func:`merge` over any number of partial results on pairwise disjoint key sets."""
    results = list(results)
    if not results:
        raise ValueError("merge_many: needs at least one result")
    lses = torch.stack([r.lse.float() for r in results])
    lse = torch.logsumexp(lses, dim=0)
    finite = torch.isfinite(lse)
    safe = torch.where(finite, lse, torch.zeros_like(lse))
    cd = _compute_dtype(results[0].out.dtype)
    out = torch.zeros(results[0].out.shape, dtype=cd, device=results[0].out.device)
    for r, l in zip(results, lses):
        w = torch.where(finite, torch.exp(l - safe), torch.zeros_like(l))
        out += w.unsqueeze(-1).to(cd) * r.out.to(cd)
    return AttentionResult(out.to(results[0].out.dtype), lse)
