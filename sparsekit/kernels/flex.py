"""FlexAttention (``torch.nn.attention.flex_attention``) for any pattern (``flex``), on CUDA.

The pattern enters twice: a ``mask_mod`` that evaluates the exact rule of
:class:`~sparsekit.pattern.Pattern` for each (row, key) (causal and (band or listed block or
column)), and a 128 x 128 block mask (Flex's default tile) listing every tile where that rule may
hold, built from :meth:`Pattern.lower`, so Flex skips the rest. The listed-block lookup is a dense
``(groups, query blocks, key blocks)`` table: this implementation refuses patterns where that table
would pass 2**28 entries (FlashInfer or Triton run those).
"""

from __future__ import annotations

from typing import ClassVar

import torch

from ..contract import AttentionResult
from ..executor import Implementation, head_dim_reason

__all__ = ["Flex"]

_FB = 128
_MAX_TABLE = 1 << 28
_COMPILED: dict = {}


def _flex_fn():
    from torch.nn.attention.flex_attention import flex_attention

    if "fn" not in _COMPILED:
        _COMPILED["fn"] = torch.compile(flex_attention, dynamic=False)
    return _COMPILED["fn"]


def _has_flex() -> bool:
    try:
        from torch.nn.attention.flex_attention import BlockMask, flex_attention  # noqa: F401
    except ImportError:
        return False
    return True


def _tile_table(p, L) -> torch.Tensor:
    """bool (groups, Q tiles, KV tiles): 128 x 128 tiles that hold a visible pair of some row."""
    dev = p.device
    G, NQB = L.groups, L.n_qblocks
    nf, ng = -(-p.nq // _FB), -(-p.nk // _FB)
    rb = p.row_bounds()
    t = torch.zeros(G, nf, ng, dtype=torch.bool, device=dev)

    def mark(seg, k_lo, k_hi):
        qb = seg % NQB
        g = seg // NQB
        f_lo, f_hi = rb[qb] // _FB, (rb[qb + 1] - 1) // _FB
        c_lo, c_hi = k_lo // _FB, (k_hi - 1) // _FB
        span_f = int((f_hi - f_lo).max()) + 1 if seg.numel() else 0
        span_c = int((c_hi - c_lo).max()) + 1 if seg.numel() else 0
        for df in range(span_f):
            for dc in range(span_c):
                f, c = f_lo + df, c_lo + dc
                ok = (f <= f_hi) & (c <= c_hi)
                t[g[ok], f[ok], c[ok]] = True

    cnt = L.indptr[1:] - L.indptr[:-1]
    seg = torch.repeat_interleave(torch.arange(G * NQB, device=dev), cnt, output_size=L.kblock.numel())
    k0 = L.kblock.to(torch.int64) * p.block_k
    mark(seg, k0, torch.clamp(k0 + p.block_k, max=p.nk))
    if L.has_columns:
        ccnt = L.col_indptr[1:] - L.col_indptr[:-1]
        cseg = torch.repeat_interleave(torch.arange(G * NQB, device=dev), ccnt, output_size=L.col_index.numel())
        mark(cseg, L.col_index, L.col_index + 1)
    return t


class Flex(Implementation):
    """Any pattern through compiled FlexAttention with an exact ``mask_mod`` (CUDA)."""

    name: ClassVar[str] = "flex"

    @staticmethod
    def available_reason():
        if not _has_flex():
            return "this torch has no FlexAttention"
        return None if torch.cuda.is_available() else "no CUDA device"

    family: ClassVar[str] = "flex"
    rank: ClassVar[int] = 60

    def refuse(self, pattern, q, k):
        if q.device.type != "cuda":
            return "needs CUDA tensors (compiled FlexAttention)"
        if not _has_flex():
            return "this torch has no FlexAttention"
        if q.dtype not in (torch.float16, torch.bfloat16, torch.float32):
            return f"dtype {q.dtype}"
        why = head_dim_reason(q.shape[-1])
        if why:
            return why
        if pattern.block_indptr is not None and pattern.groups * pattern.n_qblocks * pattern.n_kblocks > _MAX_TABLE:
            return "the listed-block table would pass 2**28 entries"
        return None

    def prepare(self, pattern, q, k, *, scale: float):
        from torch.nn.attention.flex_attention import BlockMask

        p = pattern
        dev = p.device
        L = p.lower()
        tiles = _tile_table(p, L)  # [G, nf, ng]
        Bp, Hp, G = p.group_batch, p.group_heads, p.groups
        nf, ng = tiles.shape[1], tiles.shape[2]
        num = tiles.sum(-1).to(torch.int32).view(Bp, Hp, nf)
        idx = torch.sort((~tiles).to(torch.int8), dim=-1, stable=True).indices.to(torch.int32).view(Bp, Hp, nf, ng)
        if Hp not in (1, p.q_heads):
            rep = p.q_heads // Hp
            num, idx = num.repeat_interleave(rep, 1), idx.repeat_interleave(rep, 1)
        pos = p.row_positions()
        table = None
        if p.block_indptr is not None:
            table = torch.zeros(G * p.n_qblocks * (p.n_kblocks + 1), dtype=torch.bool, device=dev)
            table[p._listed_keys()] = True
            table = table.view(G, p.n_qblocks, p.n_kblocks + 1)
        colmask = None
        if p.columns is not None:
            colmask = torch.zeros(G, p.nk + 1, dtype=torch.bool, device=dev)
            c = p.columns.reshape(G, -1)
            colmask.scatter_(1, torch.where(c >= 0, c, torch.full_like(c, p.nk)), True)
        Hq, shift, bq, bk, window, sink = p.q_heads, p.block_shift, p.block_q, p.block_k, p.window, p.sink
        hp_div = Hq // Hp

        def mask_mod(b, h, q_idx, kv_idx):
            at = pos[q_idx]
            vis = kv_idx < sink
            if window:
                vis = vis | (kv_idx > at - window)
            g = (b if Bp > 1 else 0) * Hp + h // hp_div
            if table is not None:
                vis = vis | table[g, (q_idx + shift) // bq, kv_idx // bk]
            if colmask is not None:
                vis = vis | colmask[g, kv_idx]
            return (kv_idx <= at) & vis

        bm = BlockMask.from_kv_blocks(num, idx, BLOCK_SIZE=_FB, mask_mod=mask_mod, seq_lengths=(p.nq, p.nk))
        return bm

    def run(self, pattern, state, q, k, v, *, scale: float, out=None):
        out, lse = _flex_fn()(q, k, v, block_mask=state, scale=scale, enable_gqa=q.shape[1] != k.shape[1],
                              return_lse=True)
        return AttentionResult(out, lse.float())
