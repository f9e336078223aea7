"""Triton attention over any lowered pattern (``triton_blocks``): block lists, band edges, columns.

The executor's general GPU implementation. It walks :meth:`Pattern.lower`'s lists, so a third-party
backend that only describes its pattern gets it too. One program owns a tile of query rows of one
query block for ``HPT`` query heads that share a KV head and a group (their rows are stacked, so
one K/V tile load serves all of them: GQA packing), and

1. walks the block list of its (group, query block): each entry loads one ``block_k`` key block
   (in ``BLOCK_N``-key tiles); the element mask is applied only where it can matter: the causal
   diagonal, blocks that hold only their band part (``full == 0``), ragged edges;
2. walks the columns of its (group, query block), ``BLOCK_N`` gathered keys at a time, keeping
   ``j <= pos`` and ``j`` outside the band (the band part was counted by the block list).

Softmax runs online in base 2 with float32 accumulation (the steps shared with the band kernel,
:mod:`._triton_softmax`); lse is written in natural log.
Shapes: q (B, Hq, R, D) (R = the pattern's rows), k/v (B, Hkv, Nk, D), unit stride on D;
out (B, Hq, R, D) in q's dtype, lse (B, Hq, R) float32 (``-inf`` for a row that sees no key).
"""

from __future__ import annotations

from typing import ClassVar

import torch

from ..contract import AttentionResult
from ..executor import Implementation
from .triton_band import _triton, triton_available, triton_reason

__all__ = ["BlocksTriton", "pattern_attention"]

_KERNEL = None


def _build():
    global _KERNEL
    if _KERNEL is not None:
        return _KERNEL
    triton = _triton()
    import triton.language as tl

    global scores, update, finish, pattern_tile  # the kernel's globals, where Triton (compiler and interpreter) looks
    from ._triton_softmax import finish, pattern_tile, scores, update

    @triton.jit
    def _pattern_attn_fwd(
        Q, K, V, O, LSE, POS, RB, INDPTR, KBLK, FULLF, CPTR, CIDX,
        s_qb, s_qh, s_qm, s_kb, s_kh, s_kn, s_vb, s_vh, s_vn, s_ob, s_oh, s_om, s_lb, s_lh,
        HQ, GQ, NK, NQB, GROUP_BATCH, GROUP_HEADS, BK, window, sink, qk_scale,
        HPT: tl.constexpr, ROWS: tl.constexpr, BLOCK_M: tl.constexpr, SUB: tl.constexpr, BLOCK_N: tl.constexpr,
        HEAD_DIM: tl.constexpr, IEEE: tl.constexpr,
    ):
        b, kvh, g, qb, seg, r_lo, r_hi, head, rows, rmask = pattern_tile(
            RB, HQ, GQ, NQB, GROUP_BATCH, GROUP_HEADS, HPT, ROWS, BLOCK_M, SUB)
        pos = tl.load(POS + rows, mask=rmask, other=-1).to(tl.int64)
        big = 1 << 62
        pos_min = tl.min(tl.where(rmask, pos, big), axis=0)

        d = tl.arange(0, HEAD_DIM)
        r64 = rows.to(tl.int64)
        q = tl.load(Q + b * s_qb + head[:, None] * s_qh + r64[:, None] * s_qm + d[None, :],
                    mask=rmask[:, None], other=0.0)
        k_base = K + b * s_kb + kvh * s_kh
        v_base = V + b * s_vb + kvh * s_vh

        m_i = tl.full([BLOCK_M], float("-inf"), dtype=tl.float32)
        l_i = tl.zeros([BLOCK_M], dtype=tl.float32)
        acc = tl.zeros([BLOCK_M, HEAD_DIM], dtype=tl.float32)

        e0 = tl.load(INDPTR + seg)
        e1 = tl.where(r_lo >= r_hi, e0, tl.load(INDPTR + seg + 1))
        n_sub = tl.cdiv(BK, BLOCK_N)
        for it in range(0, (e1 - e0) * n_sub):
            e = e0 + it // n_sub
            kb = tl.load(KBLK + e).to(tl.int64)
            full = tl.load(FULLF + e)
            k_end = tl.minimum(kb * BK + BK, NK)
            start_n = kb * BK + (it % n_sub) * BLOCK_N
            cols = start_n + tl.arange(0, BLOCK_N)
            cmask = cols < k_end
            kt = tl.load(k_base + cols[:, None] * s_kn + d[None, :], mask=cmask[:, None], other=0.0)
            vt = tl.load(v_base + cols[:, None] * s_vn + d[None, :], mask=cmask[:, None], other=0.0)
            qk = scores(q, kt, IEEE) * qk_scale
            need = (full == 0) | (start_n + BLOCK_N - 1 > pos_min) | (start_n + BLOCK_N > k_end)
            if need:
                band = (cols[None, :] < sink) | (cols[None, :] > pos[:, None] - window)
                keep = cmask[None, :] & (cols[None, :] <= pos[:, None]) & ((full != 0) | band)
                qk = tl.where(keep, qk, float("-inf"))
            acc, m_i, l_i = update(acc, m_i, l_i, qk, vt, IEEE)

        c0 = tl.load(CPTR + seg)
        c1 = tl.where(r_lo >= r_hi, c0, tl.load(CPTR + seg + 1))
        for c in range(c0, c1, BLOCK_N):
            idx = c + tl.arange(0, BLOCK_N)
            cm = idx < c1
            j = tl.load(CIDX + idx, mask=cm, other=0).to(tl.int64)
            kt = tl.load(k_base + j[:, None] * s_kn + d[None, :], mask=cm[:, None], other=0.0)
            vt = tl.load(v_base + j[:, None] * s_vn + d[None, :], mask=cm[:, None], other=0.0)
            qk = scores(q, kt, IEEE) * qk_scale
            band = (j[None, :] < sink) | (j[None, :] > pos[:, None] - window)
            keep = cm[None, :] & (j[None, :] <= pos[:, None]) & (band == 0)
            qk = tl.where(keep, qk, float("-inf"))
            acc, m_i, l_i = update(acc, m_i, l_i, qk, vt, IEEE)

        out, lse = finish(acc, m_i, l_i)
        tl.store(O + b * s_ob + head[:, None] * s_oh + r64[:, None] * s_om + d[None, :],
                 out.to(O.dtype.element_ty), mask=rmask[:, None])
        tl.store(LSE + b * s_lb + head * s_lh + r64, lse, mask=rmask)

    _KERNEL = _pattern_attn_fwd
    return _KERNEL


_TUNED = None
# work (rows x keys) from which the first call of a tile shape picks its warps / stages by timing
TUNE_FROM = 1 << 28


def _build_tuned():
    """The same kernel behind Triton's autotuner (warps x stages), keyed on the tile shape: used for
    large calls on a GPU, where the one-time tuning is small next to the work."""
    global _TUNED
    if _TUNED is not None:
        return _TUNED
    triton = _triton()
    configs = [triton.Config({}, num_warps=w, num_stages=s) for w in (4, 8) for s in (2, 3)]
    _TUNED = triton.autotune(configs=configs, key=["HPT", "ROWS", "BLOCK_N", "HEAD_DIM", "IEEE"])(_build())
    return _TUNED


def _pow2(x: int) -> int:
    return 1 << max(0, int(x) - 1).bit_length()


def tiles(pattern, q, target=None) -> dict:
    """Tile shape for this pattern: heads per tile, rows per head, sub-tiles per query block, key tile.

    ``target``: rows per tile (all heads together); default 128 on a GPU (64 for float32 or D > 128),
    16 under the interpreter.
    """
    interpret = q.device.type == "cpu"
    D = q.shape[-1]
    if target is None:
        target = 16 if interpret else (64 if q.dtype == torch.float32 or D > 128 else 128)
    rows_blk = _pow2(min(pattern.block_q, pattern.nq + pattern.block_shift))
    rows = max(16, min(rows_blk, target))
    hpt = 1
    if pattern.group_heads != pattern.q_heads:  # heads of one group that share a KV head
        G = pattern.q_heads // pattern.kv_heads
        while hpt * 2 <= G and G % (hpt * 2) == 0 and rows * hpt * 2 <= target:
            hpt *= 2
    sub = -(-pattern.block_q // rows)
    bn = 16 if interpret else (32 if q.dtype == torch.float32 else 64)
    bn = max(16, min(bn, _pow2(pattern.block_k)))
    warps = 4 if interpret or rows * hpt <= 64 else 8
    stages = 1 if interpret else (2 if q.dtype == torch.float32 else 3)
    return dict(HPT=hpt, ROWS=rows, SUB=sub, BLOCK_N=bn, num_warps=warps, num_stages=stages)


def pattern_attention(pattern, q, k, v, *, scale: float, lowered=None, target_rows=None, out=None, lse=None):
    """Attention under ``pattern`` (see the module docstring). Returns ``(out, lse)``."""
    triton = _triton()
    kernel = _build()
    B, Hq, R, D = q.shape
    L = lowered if lowered is not None else pattern.lower()
    if out is None:
        out = torch.empty(B, Hq, R, D, dtype=q.dtype, device=q.device)
    if lse is None or lse.stride(-1) != 1:
        lse = torch.empty(B, Hq, R, dtype=torch.float32, device=q.device)
    if R == 0:
        return out, lse
    t = tiles(pattern, q, target_rows)
    pos = pattern.row_positions().contiguous()
    rb = pattern.row_bounds().contiguous()
    dev = q.device
    full = L.full if L.full.numel() else torch.zeros(1, dtype=torch.int8, device=dev)
    kblk = L.kblock if L.kblock.numel() else torch.zeros(1, dtype=torch.int32, device=dev)
    cidx = L.col_index if L.col_index.numel() else torch.zeros(1, dtype=torch.int64, device=dev)
    grid = (pattern.n_qblocks * t["SUB"], B * Hq // t["HPT"])
    launch = dict(num_warps=t["num_warps"], num_stages=t["num_stages"])
    if q.device.type == "cuda" and pattern.nq * pattern.nk >= TUNE_FROM:
        kernel, launch = _build_tuned(), {}
    kernel[grid](
        q, k, v, out, lse, pos, rb, L.indptr, kblk, full, L.col_indptr, cidx,
        q.stride(0), q.stride(1), q.stride(2), k.stride(0), k.stride(1), k.stride(2),
        v.stride(0), v.stride(1), v.stride(2), out.stride(0), out.stride(1), out.stride(2),
        lse.stride(0), lse.stride(1),
        Hq, Hq // k.shape[1], k.shape[2], pattern.n_qblocks, pattern.group_batch, pattern.group_heads,
        pattern.block_k, pattern.window, pattern.sink, float(scale) * 1.4426950408889634,
        HPT=t["HPT"], ROWS=t["ROWS"], BLOCK_M=t["HPT"] * t["ROWS"], SUB=t["SUB"], BLOCK_N=t["BLOCK_N"], HEAD_DIM=D,
        IEEE=q.dtype == torch.float32, **launch,
    )
    return out, lse


class BlocksTriton(Implementation):
    """Any pattern (block lists, band edges, columns; contiguous or gathered rows) in one Triton kernel."""

    name: ClassVar[str] = "triton_blocks"
    available_reason = staticmethod(triton_available)
    family: ClassVar[str] = "triton"
    rank: ClassVar[int] = 50

    def refuse(self, pattern, q, k):
        return triton_reason(q, k)

    def prepare(self, pattern, q, k, *, scale: float):
        pattern.row_positions()
        return pattern.lower()

    def run(self, pattern, state, q, k, v, *, scale: float, out=None):
        o, l = out if out is not None else (None, None)
        return AttentionResult(*pattern_attention(pattern, q, k, v, scale=scale, lowered=state, out=o, lse=l))
