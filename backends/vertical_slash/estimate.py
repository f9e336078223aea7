"""Vertical-slash estimation and selection: scores from the last queries, then the kept columns and diagonals.

MInference (https://arxiv.org/abs/2407.02490). Exact semantics: ``backends/vertical_slash/__init__.py``.
"""

from __future__ import annotations

from typing import Sequence, Union

import torch
import torch.nn.functional as F

from sparsekit.reference import compute_dtype
from sparsekit.validate import check_int_option

__all__ = ["Budget", "estimate_scores", "select_top", "split_budget", "per_head"]

Budget = Union[int, str, Sequence[int]]


def estimate_scores(q, k, *, scale: float, q_offset: int, last_q: int):
    """Vertical and slash scores from the last ``last_q`` query rows.

    Parameters
    ----------
    q : (batch, q_heads, q_len, head_dim)
    k : (batch, kv_heads, kv_len, head_dim)

    Returns
    -------
    vertical : (batch, q_heads, P + 1) float
        ``vertical[j] = sum_r A[r, j]`` over the estimation rows ``r``.
    slash : (batch, q_heads, P + 1) float
        ``slash[o] = sum_r A[r, pos_r - o]`` (the sum along diagonal ``o``).
    Both in float32 (float64 for float64 inputs); ``P = q_offset + q_len - 1``.
    """
    B, Hq, Nq, D = q.shape
    Hkv = k.shape[1]
    G = Hq // Hkv
    W = q_offset + Nq  # keys 0..P
    L = min(last_q, Nq)
    cd = compute_dtype(q.dtype)
    ql = q[:, :, Nq - L:].reshape(B, Hkv, G * L, D)
    kk = k[:, :, :W]
    if q.is_cuda and q.dtype in (torch.float16, torch.bfloat16):
        s = torch.matmul(ql, kk.transpose(-1, -2)).to(cd)  # tensor-core matmul, fp32 after
    else:
        s = torch.matmul(ql.to(cd), kk.to(cd).transpose(-1, -2))
    s = s.view(B, Hq, L, W)
    s.mul_(scale)
    # causal inside the estimation block: row r (position W - L + r) sees keys <= its position
    tri = torch.ones(L, L, dtype=torch.bool, device=q.device).triu_(1)
    s[..., W - L:].masked_fill_(tri, float("-inf"))
    a = torch.softmax(s, dim=-1)
    del s
    vertical = a.sum(dim=-2)
    # slash: left-pad each row by L zeros; the strided view puts diagonal o of row r at column
    # u = P - o for every row, so a plain sum over rows gives the diagonal sums (u reversed).
    ap = F.pad(a, (L, 0)).reshape(B * Hq, L, W + L)
    del a
    diag = ap.as_strided((B * Hq, L, W), (L * (W + L), W + L + 1, 1), ap.storage_offset() + 1).sum(dim=1)
    slash = diag.flip(-1).view(B, Hq, W)
    return vertical, slash


def split_budget(value) -> list:
    """``"1000/800/..."`` or a sequence -> list of per-head budgets (ints when they parse)."""
    if isinstance(value, str):
        out = []
        for part in value.split("/"):
            try:
                out.append(int(part))
            except ValueError:
                out.append(part.strip())
        return out
    return list(value)


def per_head(budget: Budget, Hq: int, what: str) -> list[int]:
    if isinstance(budget, int):
        return [budget] * Hq
    b = split_budget(budget)
    if len(b) != Hq:
        raise ValueError(f"vertical_slash: {what} has {len(b)} per-head budgets but q has {Hq} heads")
    return b


def select_top(score: torch.Tensor, forced: int, budgets: list[int]):
    """Keep the first ``forced`` candidates, then the best scores, ``max(budget, forced)`` in all.

    score (batch, q_heads, W) -> (index (batch, q_heads, K) int64 ascending, padded with W;
    count (q_heads,) int64). Ties keep the lower index (stable sort).
    """
    B, Hq, W = score.shape
    nkeep = torch.tensor([min(W, max(bud, forced)) for bud in budgets], dtype=torch.int64)
    K = int(nkeep.max())
    s = score.clone()
    s[..., : min(forced, W)] = float("inf")
    order = torch.sort(s, dim=-1, descending=True, stable=True).indices[..., :K]
    valid = torch.arange(K, device=score.device)[None, :] < nkeep.to(score.device)[:, None]  # (Hq, K)
    idx = torch.where(valid, order, torch.full_like(order, W)).sort(dim=-1).values
    return idx, nkeep


