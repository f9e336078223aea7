"""Exact attention on any device and dtype, blockwise so memory stays O(block * keys).

This is the CPU path of every first-party backend and the ground truth their GPU
kernels are checked against. It never expands K/V to the query heads: query heads of
one group are stacked along the row axis and multiplied against their shared KV head.

Accumulation is float32 (float64 for float64 inputs); ``out`` comes back in q's dtype,
``lse`` in float32.
"""

from __future__ import annotations

from typing import Callable, Optional

import torch

from .contract import AttentionResult

__all__ = [
    "compute_dtype",
    "attend_keys",
    "blockwise_attention",
    "masked_attention",
    "causal_rows_attention",
]

# (row_start, row_end) -> (key_index [M] int64 sorted, keep-mask broadcastable to [B, Hq, rows, M] or None)
KeySelector = Callable[[int, int], "tuple[torch.Tensor, Optional[torch.Tensor]]"]


def compute_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if dtype == torch.float64 else torch.float32


def attend_keys(q, k, v, scale: float, key_index: torch.Tensor, keep: Optional[torch.Tensor]):
    """Attention of query rows ``q`` [B, Hq, n, D] over the keys ``key_index`` of k/v.

    ``keep`` (bool, broadcastable to [B, Hq, n, M]) masks individual (row, key) pairs.
    Returns float ``out`` [B, Hq, n, D] (compute dtype) and ``lse`` [B, Hq, n] float32.
    """
    B, Hq, n, D = q.shape
    Hkv = k.shape[1]
    G = Hq // Hkv
    cd = compute_dtype(q.dtype)
    M = key_index.numel()
    if M == 0:
        return (
            torch.zeros(B, Hq, n, D, dtype=cd, device=q.device),
            torch.full((B, Hq, n), float("-inf"), dtype=torch.float32, device=q.device),
        )
    kb = k.index_select(2, key_index).to(cd)  # [B, Hkv, M, D]
    vb = v.index_select(2, key_index).to(cd)
    qg = q.to(cd).reshape(B, Hkv, G * n, D)  # heads h = kv*G + g stack on the row axis
    s = torch.matmul(qg, kb.transpose(-1, -2)).mul_(scale).view(B, Hq, n, M)
    if keep is not None:
        s = s.masked_fill(~keep, float("-inf"))
    # one exp pass: p = exp(s - m) / sum, lse = m + log(sum); rows with no key keep lse = -inf, out = 0
    m = s.amax(dim=-1, keepdim=True)
    m = torch.where(torch.isfinite(m), m, torch.zeros_like(m))
    p = torch.exp(s - m)
    total = p.sum(dim=-1, keepdim=True)
    lse = (m + torch.log(total)).squeeze(-1)  # log(0) = -inf for empty rows
    p = p / torch.where(total > 0, total, torch.ones_like(total))
    out = torch.matmul(p.view(B, Hkv, G * n, M), vb).view(B, Hq, n, D)
    return out, lse.float()


def blockwise_attention(
    q, k, v, *, scale: float, select: KeySelector, block_rows: int = 256
) -> AttentionResult:
    """Attention where each block of query rows attends the keys ``select(i0, i1)`` returns.

    ``select`` must return a superset of the keys any row of the block may see, with a
    keep-mask that removes the rest; it is the only place a backend's pattern enters.
    """
    B, Hq, Nq, D = q.shape
    cd = compute_dtype(q.dtype)
    out = torch.empty(B, Hq, Nq, D, dtype=cd, device=q.device)
    lse = torch.empty(B, Hq, Nq, dtype=torch.float32, device=q.device)
    # keep the score block around 2^24 elements
    rows = max(1, min(block_rows, (1 << 24) // max(1, B * Hq * k.shape[2])))
    for i0 in range(0, Nq, rows):
        i1 = min(Nq, i0 + rows)
        key_index, keep = select(i0, i1)
        o, l = attend_keys(q[:, :, i0:i1], k, v, scale, key_index, keep)
        out[:, :, i0:i1] = o
        lse[:, :, i0:i1] = l
    return AttentionResult(out.to(q.dtype), lse)


def masked_attention(q, k, v, mask: torch.Tensor, *, scale: float) -> AttentionResult:
    """Attention under an explicit keep-mask broadcastable to [B, Hq, Nq, Nk] (small sizes)."""
    Nk = k.shape[2]
    key_index = torch.arange(Nk, device=q.device)

    def select(i0, i1):
        return key_index, mask[..., i0:i1, :]

    return blockwise_attention(q, k, v, scale=scale, select=select)


def causal_rows_attention(q_rows, k, v, *, positions: torch.Tensor, scale: float) -> AttentionResult:
    """Key-dense attention of gathered query rows, each over its whole causal prefix.

    Parameters
    ----------
    q_rows : (batch, q_heads, R, head_dim)
    k, v : (batch, kv_heads, kv_len, head_dim)
    positions : (R,) int64, sorted ascending
        Absolute position of each row; row r attends keys ``0 .. positions[r]``.
    """
    if q_rows.shape[2] == 0:
        B, Hq, _, D = q_rows.shape
        return AttentionResult(
            q_rows.new_zeros(B, Hq, 0, D),
            torch.zeros(B, Hq, 0, dtype=torch.float32, device=q_rows.device),
        )
    positions = positions.to(q_rows.device)

    def select(i0, i1):
        p = positions[i0:i1]
        hi = int(p.max()) + 1
        key_index = torch.arange(hi, device=q_rows.device)
        return key_index, key_index[None, :] <= p[:, None]

    return blockwise_attention(q_rows, k, v, scale=scale, select=select)
