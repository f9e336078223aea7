"""Vertical-slash selection -> :class:`~sparsekit.pattern.Pattern`: slash pages as block lists, verticals as columns.

Row blocks follow absolute positions (block ``b`` = positions ``[b*block_q, (b+1)*block_q)`` of this
call), so the pattern's ``block_shift`` is ``q_offset % block_q``. A kept diagonal ``o`` crosses, in row
block ``b``, the key pages that hold ``p - o`` for the block's rows ``p``; those pages are the block's
listed key blocks (page = ``block_k`` keys). Kept columns are the pattern's columns (per query head).
"""

from __future__ import annotations

import torch

from sparsekit.pattern import Pattern

__all__ = ["slash_lists", "vs_pattern"]


def _cover(offsets: torch.Tensor, *, q_offset: int, Nq: int, block_q: int, block_k: int) -> torch.Tensor:
    """(B, Hq, Ko) kept offsets (padded with W) -> covered page shifts (B, Hq, 3, S) bool."""
    P = q_offset + Nq - 1
    W = P + 1
    bq, bk = block_q, block_k
    m = bq // bk
    b_first, b_last = q_offset // bq, P // bq
    S = (b_last + 1) * m
    r0_first = q_offset - b_first * bq
    r1_first = min(P - b_first * bq, bq - 1)
    r0 = torch.tensor([r0_first, 0, 0], device=offsets.device)
    r1 = torch.tensor([r1_first, bq - 1, P - b_last * bq], device=offsets.device)
    o = offsets[:, :, None, :]  # (B, Hq, 1, Ko)
    lo = -torch.div(r1[:, None] - o, bk, rounding_mode="floor")
    hi = (-torch.div(r0[:, None] - o, bk, rounding_mode="floor")).clamp(max=b_last * m)
    ok = (o < W) & (lo <= hi)
    lo = torch.where(ok, lo + m - 1, torch.zeros_like(lo))
    hi = torch.where(ok, hi + m, torch.zeros_like(hi))
    w = ok.to(torch.int32)
    B, Hq = offsets.shape[:2]
    diff = torch.zeros(B, Hq, 3, S + 1, dtype=torch.int32, device=offsets.device)
    diff.scatter_add_(-1, lo, w)
    diff.scatter_add_(-1, hi, -w)
    return diff.cumsum(-1)[..., :S] > 0



def _block_rows(q_offset: int, nq: int, block_q: int, device):
    """Per row block of the call: (first position, last position, kind 0 first / 1 full / 2 last)."""
    P = q_offset + nq - 1
    b_first = q_offset // block_q
    n_blocks = P // block_q - b_first + 1
    b = torch.arange(b_first, b_first + n_blocks, device=device)
    p_first = torch.clamp(b * block_q, min=q_offset)
    p_last = torch.clamp(b * block_q + block_q - 1, max=P)
    kind = torch.ones_like(b)
    kind[0] = 0
    if n_blocks > 1:
        kind[-1] = 2
    return p_first, p_last, kind


def slash_lists(offsets: torch.Tensor, *, q_offset: int, nq: int, block_q: int, block_k: int):
    """CSR ``(indptr, pages)`` over (batch * q_heads, row block) of the pages the kept diagonals cross.

    offsets (B, Hq, Ko) int64 kept diagonal offsets ascending, padded with ``W = q_offset + nq``.
    Pages ascend inside a segment; the last one is the page of the block's last row (offset 0).
    """
    covered = _cover(offsets, q_offset=q_offset, Nq=nq, block_q=block_q, block_k=block_k)  # (B, Hq, 3, S)
    B, Hq, _, S = covered.shape
    dev = offsets.device
    m = block_q // block_k
    BH = B * Hq
    cov = covered.reshape(BH, 3, S)
    shv = torch.arange(S, device=dev) - (m - 1)
    big = torch.iinfo(torch.int64).max
    asc = torch.where(cov, shv, torch.full_like(shv, big)).sort(dim=-1).values  # (BH, 3, S)
    ccum = cov.to(torch.int64).cumsum(-1)
    p_first, _, kind = _block_rows(q_offset, nq, block_q, dev)
    NB = p_first.numel()
    bm = (p_first // block_q) * m  # (NB,)
    cnt = ccum[:, kind, (bm + m - 1).clamp(max=S - 1)]  # (BH, NB): shifts <= bm
    flat_cnt = cnt.reshape(-1)
    total = int(flat_cnt.sum())
    req = torch.repeat_interleave(torch.arange(BH * NB, device=dev), flat_cnt, output_size=total)
    start = torch.cumsum(flat_cnt, 0) - flat_cnt
    t = torch.arange(total, device=dev) - start[req]
    bh, b = req // NB, req % NB
    sh = asc[bh, kind[b], flat_cnt[req] - 1 - t]
    indptr = torch.zeros(BH * NB + 1, dtype=torch.int64, device=dev)
    indptr[1:] = flat_cnt.cumsum(0)
    return indptr, bm[b] - sh


def vs_pattern(q, k, *, q_offset: int, cols: torch.Tensor, offsets: torch.Tensor, block_q: int, block_k: int) -> Pattern:
    """The pattern of kept columns ``cols`` and diagonals ``offsets`` ((B, Hq, K) each, padded with ``W``)."""
    nq = q.shape[2]
    W = q_offset + nq
    indptr, pages = slash_lists(offsets, q_offset=q_offset, nq=nq, block_q=block_q, block_k=block_k)
    columns = torch.where(cols < W, cols, torch.full_like(cols, -1))
    return Pattern.from_blocks(q, k, q_offset=q_offset, block_q=block_q, block_k=block_k,
                               block_shift=q_offset % block_q, blocks=(indptr, pages), columns=columns,
                               sorted_unique=True)
