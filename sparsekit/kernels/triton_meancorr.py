"""The mean correction of ``meancorr`` in one Triton kernel, merged in place into the backend's rows.

The rule (:mod:`sparsekit.correctors.meancorr`): mean block ``j`` holds keys ``[j*M, min((j+1)*M, nk))``;
for a row at position ``p`` it is corrected iff it is fully visible (``min((j+1)*M, nk) - 1 <= p``) and
the pattern attends none of its keys. The correction is attention over "summary keys" ``kbar_j`` (the
mean key of block ``j``, float32) with values ``vbar_j`` and per-key bias ``log(len_j)``, merged into
the sparse ``(out, lse)`` through lse.

One program owns a tile of rows of one pattern query block for ``HPT`` query heads that share a KV
head and a group (GQA packing, as :mod:`.triton_blocks`), and walks the summary keys
``j in [ceil(sink/M), U_max)`` in tiles of ``BLOCK_J``. The rule is evaluated in the kernel:

* **band** (analytic per row): the sink touches ``j < ceil(sink/M)`` (never walked); the window
  touches ``j >= max(p - window + 1, 0) // M``; full visibility is ``j < (p+1) // M`` (plus the short
  last block for the row at ``nk - 1``). Their minimum is the row's bound ``U(p)``: ``j < U(p)``;
* **block lists**: the CSR list of key blocks of the tile's (group, query block), ascending, is
  walked with one pointer across the key tiles (``BLOCK_L`` entries at a time); key block ``kb``
  touches mean block ``kb // (M // block_k)``;
* **columns**: per-group flags over mean blocks (a ``[groups, n_mean_blocks]`` int8 table built on
  the host).

Scores use float32 operands (``q`` converted, exact fp32 products for fp32 inputs, TF32 tensor cores
otherwise) and base-2 online softmax (:mod:`._triton_softmax`). The epilogue merges each row that has
a corrected block: ``lse = logaddexp(lse_s, lse_c)``, ``out = (e^{lse_s} out_s + e^{lse_c} out_c) /
(e^{lse_s} + e^{lse_c})``; rows without one are not written. Each row is read and written by one
program only, so the merge is safe in place.

Shapes: q (B, Hq, R, D) (R = the pattern's rows, contiguous positions ``q_offset + r``), k/v
(B, Hkv, Nk, D); out (B, Hq, >= R, D) in q's dtype and lse (B, Hq, >= R) float32, any strides with
unit stride on D.
"""

from __future__ import annotations

from typing import Optional

import torch

from .triton_band import _triton, triton_reason

__all__ = ["mean_complement", "refuse"]

_LOG2E = 1.4426950408889634
_KERNEL = None


def refuse(pattern, sparse, q, k) -> Optional[str]:
    """Why the Triton path cannot run this complement (then the torch path runs), or None."""
    from ..executor import forced

    allow = forced()
    if allow is not None and "triton" not in allow:
        return "a sparsekit.kernels.use(...) restriction without the triton family"
    why = triton_reason(q, k)
    if why:
        return why
    if pattern.positions is not None:
        return "gathered rows (positions)"
    out, lse = sparse.out, sparse.lse
    if out.device != q.device or lse.device != q.device:
        return "the sparse result lives on another device"
    if out.dtype != q.dtype or lse.dtype != torch.float32:
        return "the sparse result's dtypes differ from q / float32"
    if out.stride(-1) != 1:
        return "head_dim is not the unit-stride axis of the sparse result"
    return None


def _build():
    global _KERNEL
    if _KERNEL is not None:
        return _KERNEL
    triton = _triton()
    import triton.language as tl

    global scores, update, finish, pattern_tile  # the kernel's globals, where Triton (compiler and interpreter) looks
    from ._triton_softmax import finish, pattern_tile, scores, update

    @triton.jit
    def _meancorr_fwd(
        Q, KB, VB, LL, O, LSE, RB, INDPTR, KBLK, CF,
        s_qb, s_qh, s_qm, s_kb, s_kh, s_kn, s_ob, s_oh, s_om, s_lb, s_lh, s_lm,
        HQ, GQ, NK, NMB, NQB, GROUP_BATCH, GROUP_HEADS, q_offset, M, FACTOR, window, SB, qk_scale,
        HAS_LIST: tl.constexpr, HAS_COLS: tl.constexpr,
        HPT: tl.constexpr, ROWS: tl.constexpr, BLOCK_M: tl.constexpr, SUB: tl.constexpr, BLOCK_J: tl.constexpr,
        BLOCK_L: tl.constexpr, HEAD_DIM: tl.constexpr, IEEE: tl.constexpr,
    ):
        b, kvh, g, qb, seg, r_lo, r_hi, head, rows, rmask = pattern_tile(
            RB, HQ, GQ, NQB, GROUP_BATCH, GROUP_HEADS, HPT, ROWS, BLOCK_M, SUB)
        r64 = rows.to(tl.int64)
        pos = tl.where(rmask, q_offset + r64, -1)
        # U(p): mean blocks j < U are fully visible and outside the window part of the band
        p1 = pos + 1
        full = p1 // M + tl.where((p1 == NK) & (NK % M != 0), 1, 0)
        wlo = tl.maximum(pos - window + 1, 0) // M
        ub = tl.where(rmask, tl.where(window > 0, tl.minimum(full, wlo), full), 0)
        u_max = tl.max(ub, axis=0)

        if u_max > SB:
            d = tl.arange(0, HEAD_DIM)
            q = tl.load(Q + b * s_qb + head[:, None] * s_qh + r64[:, None] * s_qm + d[None, :],
                        mask=rmask[:, None], other=0.0).to(tl.float32)
            kb_base = KB + b * s_kb + kvh * s_kh
            vb_base = VB + b * s_kb + kvh * s_kh
            m_i = tl.full([BLOCK_M], float("-inf"), dtype=tl.float32)
            l_i = tl.zeros([BLOCK_M], dtype=tl.float32)
            acc = tl.zeros([BLOCK_M, HEAD_DIM], dtype=tl.float32)
            lp = tl.load(INDPTR + seg)
            e1 = tl.load(INDPTR + seg + 1)
            for j0 in range(SB, u_max, BLOCK_J):
                jv = j0 + tl.arange(0, BLOCK_J)
                jm = jv < u_max
                j64 = jv.to(tl.int64)
                kt = tl.load(kb_base + j64[:, None] * s_kn + d[None, :], mask=jm[:, None], other=0.0)
                vt = tl.load(vb_base + j64[:, None] * s_kn + d[None, :], mask=jm[:, None], other=0.0)
                ll = tl.load(LL + j64, mask=jm, other=0.0)
                qk = scores(q, kt, IEEE) * qk_scale + ll[None, :]
                keep = jv[None, :] < ub[:, None]
                if HAS_COLS:
                    cf = tl.load(CF + g * NMB + j64, mask=jm, other=1)
                    keep = keep & (cf == 0)[None, :]
                if HAS_LIST:
                    # walk the (ascending) listed key blocks of this segment up to the tile's end
                    hit = tl.zeros([BLOCK_J], dtype=tl.int32)
                    go = lp < e1
                    while go:
                        idx = lp + tl.arange(0, BLOCK_L)
                        lm = idx < e1
                        mb = tl.load(KBLK + idx, mask=lm, other=0).to(tl.int64) // FACTOR
                        inr = lm & (mb < j0 + BLOCK_J)
                        match = (mb[None, :] == j64[:, None]) & inr[None, :]
                        hit += tl.sum(match.to(tl.int32), axis=1)
                        n = tl.sum(inr.to(tl.int32), axis=0)
                        lp += n
                        go = (n == BLOCK_L) & (lp < e1)
                    keep = keep & (hit == 0)[None, :]
                qk = tl.where(keep, qk, float("-inf"))
                acc, m_i, l_i = update(acc, m_i, l_i, qk, vt, IEEE)
            out_c, lse_c = finish(acc, m_i, l_i)

            # epilogue: merge into the sparse rows through lse, only where a block was corrected
            fix = rmask & (lse_c > float("-inf"))
            o_ptr = O + b * s_ob + head[:, None] * s_oh + r64[:, None] * s_om + d[None, :]
            l_ptr = LSE + b * s_lb + head * s_lh + r64 * s_lm
            o_s = tl.load(o_ptr, mask=fix[:, None], other=0.0).to(tl.float32)
            l_s = tl.load(l_ptr, mask=fix, other=float("-inf"))
            mx = tl.maximum(l_s, lse_c)
            mx = tl.where(mx == float("-inf"), 0.0, mx)
            ws = tl.exp(l_s - mx)
            wc = tl.exp(lse_c - mx)
            tot = ws + wc
            nz = tot > 0.0
            tsafe = tl.where(nz, tot, 1.0)
            new_o = (ws[:, None] * o_s + wc[:, None] * out_c) / tsafe[:, None]
            new_l = tl.where(nz, mx + tl.log(tsafe), l_s)
            tl.store(o_ptr, new_o.to(O.dtype.element_ty), mask=fix[:, None])
            tl.store(l_ptr, new_l, mask=fix)

    _KERNEL = _meancorr_fwd
    return _KERNEL


def _pow2(x: int) -> int:
    return 1 << max(0, int(x) - 1).bit_length()


def tiles(pattern, q) -> dict:
    """Tile shape: heads per tile, rows per head, sub-tiles per query block, summary-key tile."""
    interpret = q.device.type == "cpu"
    D = q.shape[-1]
    target = 16 if interpret else (64 if D <= 128 else 32)  # rows per tile; float32 operands throughout
    rows = max(16, min(_pow2(min(pattern.block_q, pattern.nq + pattern.block_shift)), target))
    hpt = 1
    if pattern.group_heads != pattern.q_heads:  # heads of one group that share a KV head
        G = pattern.q_heads // pattern.kv_heads
        while hpt * 2 <= G and G % (hpt * 2) == 0 and rows * hpt * 2 <= target:
            hpt *= 2
    sub = -(-pattern.block_q // rows)
    bj = 16 if interpret else (64 if D <= 64 else 32)
    warps = 4 if interpret or D <= 64 else 8
    stages = 1 if interpret else 2
    return dict(HPT=hpt, ROWS=rows, SUB=sub, BLOCK_J=bj, BLOCK_L=16, num_warps=warps, num_stages=stages)


def column_flags(pattern, M: int) -> torch.Tensor:
    """int8 ``[groups, ceil(nk/M)]``: 1 where a column of the group lies in the mean block."""
    nmb = -(-pattern.nk // M)
    G = pattern.groups
    flags = torch.zeros(G, nmb + 1, dtype=torch.int8, device=pattern.device)
    if pattern.columns is not None:
        c = pattern.columns.reshape(G, -1)
        flags.scatter_(1, torch.where(c >= 0, c // M, torch.full_like(c, nmb)), 1)
    return flags[:, :nmb].contiguous()


def mean_complement(pattern, out, lse, q, k, v, *, scale: float, block: int):
    """Merge the mean correction of mean blocks of ``block`` keys into ``out`` / ``lse`` in place.

    ``pattern``: contiguous rows (no ``positions``); when it has block lists, ``block`` is a multiple of
    its ``block_k``. out (B, Hq, >= R, D), lse (B, Hq, >= R) float32; rows ``0..R-1`` are updated.
    """
    from sparsekit.correctors.meancorr import block_log_len, block_means

    _triton()
    kernel = _build()
    B, Hq, R, D = q.shape
    nk = k.shape[2]
    M = int(block)
    if pattern.positions is not None:
        raise ValueError("mean_complement: gathered rows are not supported (use the torch path)")
    has_list = pattern.block_indptr is not None and pattern.block_indices.numel() > 0
    if has_list and M % pattern.block_k:
        raise ValueError(f"mean_complement: block {M} is not a multiple of the pattern's block_k {pattern.block_k}")
    if R == 0:
        return out, lse
    dev = q.device
    nmb = -(-nk // M)
    kbar = block_means(k, M, torch.float32).contiguous()  # [B, Hkv, nmb, D]
    vbar = block_means(v, M, torch.float32).contiguous()
    ll = (block_log_len(nk, M, torch.float32, dev) * _LOG2E).contiguous()  # log2(len_j): base-2 scores
    rb = pattern.row_bounds().contiguous()
    if has_list:
        indptr, kblk = pattern.block_indptr, pattern.block_indices
    else:
        indptr = torch.zeros(pattern.groups * pattern.n_qblocks + 1, dtype=torch.int64, device=dev)
        kblk = torch.zeros(1, dtype=torch.int32, device=dev)
    has_cols = pattern.columns is not None
    cf = column_flags(pattern, M) if has_cols else torch.zeros(1, dtype=torch.int8, device=dev)
    t = tiles(pattern, q)
    grid = (pattern.n_qblocks * t["SUB"], B * Hq // t["HPT"])
    kernel[grid](
        q, kbar, vbar, ll, out, lse, rb, indptr, kblk, cf,
        q.stride(0), q.stride(1), q.stride(2), kbar.stride(0), kbar.stride(1), kbar.stride(2),
        out.stride(0), out.stride(1), out.stride(2), lse.stride(0), lse.stride(1), lse.stride(2),
        Hq, Hq // k.shape[1], nk, nmb, pattern.n_qblocks, pattern.group_batch, pattern.group_heads,
        pattern.q_offset, M, max(1, M // pattern.block_k), pattern.window, -(-pattern.sink // M),
        float(scale) * _LOG2E,
        HAS_LIST=has_list, HAS_COLS=has_cols,
        HPT=t["HPT"], ROWS=t["ROWS"], BLOCK_M=t["HPT"] * t["ROWS"], SUB=t["SUB"], BLOCK_J=t["BLOCK_J"],
        BLOCK_L=t["BLOCK_L"], HEAD_DIM=D, IEEE=q.dtype == torch.float32,
        num_warps=t["num_warps"], num_stages=t["num_stages"],
    )
    return out, lse
