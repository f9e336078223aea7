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
from typing import Iterable, Optional

import torch

__all__ = ["AttentionResult", "Finisher", "merge", "merge_many", "LN2", "lse_from_base2"]

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


class Finisher:
    """A corrector's row-local work, fused into the last merge of an implementation's partials.

    An implementation whose class sets ``finishes = True`` accepts ``run(..., finisher=f)``: instead
    of merging its last two partial results (e.g. window keys and sink keys) and writing the result,
    it hands each range of rows to :meth:`finish` exactly once, every range starting at a multiple
    of :attr:`align`. The finisher merges, corrects and writes those rows in one pass over memory.
    The caller then calls :meth:`close` on the implementation's result for the rows a pass over
    partials cannot write (for Δ: the anchor rows, which other ranges' rows read, and the tail).

    ``SparseAttention`` asks the corrector for one (``Corrector.finisher(rows, dense)``, after
    computing the dense rows) only when the chosen implementation finishes; the corrector returns
    None when it cannot fuse (then the implementation merges and the corrector combines as usual).
    """

    #: every range handed to :meth:`finish` starts at a multiple of this (rows of the pattern)
    align: int = 1

    def finish(self, b: int, r0: int, acc_out: torch.Tensor, acc_lse: torch.Tensor,
               part_out: Optional[torch.Tensor], part_lse: Optional[torch.Tensor], *, lse_scale: float,
               lse_out: torch.Tensor) -> None:
        """Rows ``r0 .. r0 + n - 1`` of batch item ``b``.

        Parameters
        ----------
        acc_out : (q_heads, n, head_dim), any strides with unit stride on head_dim
            One partial result's rows; receives the finished rows (in place).
        acc_lse : (q_heads, n) float32, in units of ``lse_scale`` (natural log = value * lse_scale)
        part_out, part_lse : the same shapes, the partial over the other keys, or None (nothing to merge)
        lse_scale : float (``math.log(2)`` for FlashInfer's base-2 lse, 1.0 for natural log)
        lse_out : (q_heads, n) float32, receives the finished lse (natural log)
        """
        raise NotImplementedError

    def close(self, result: AttentionResult) -> AttentionResult:
        """The corrected result, after :meth:`finish` saw every row of the pattern.

        ``result`` holds every query row (batch, q_heads, q_len, ·), lse in natural log; rows past
        the pattern's are not computed. Writes in place where it can and returns the result.
        """
        raise NotImplementedError
