"""Triton kernels of the ``hip`` backend: selection scoring and block-sparse attention.

Imported lazily by ``backends/hip.py`` (``pip install sparsekit[triton]``). Every function
takes the public layout ``[B, H, N, D]`` with any strides and implements exactly the
semantics of the torch reference in ``backends/hip.py`` (see ``docs/hip.md``):

* :func:`chunk_means` -- representative key of each chunk (mean of its keys), float32.
* :func:`mean_scores` -- ``max_r q_r . mean_c`` over a query block's sampled rows.
* :func:`block_scores` -- ``max_{r, j in block} q_r . k_j`` (exact best key of a block).
* :func:`hip_attention` -- attention of each query block over sink + selected blocks + window,
  returning ``(out, lse)`` with lse in natural log.

The kernels read K/V through their KV head (GQA native: nothing is repeated).
"""

from __future__ import annotations

import math

import torch

from sparsekit.contract import AttentionResult

try:
    import triton
    import triton.language as tl
except ImportError as e:  # pragma: no cover - exercised only without triton
    raise ImportError("the hip Triton kernels need triton: pip install sparsekit[triton]") from e

__all__ = ["chunk_means", "mean_scores", "block_scores", "hip_attention"]

_NEG_INF = float("-inf")


def _pow2(x: int, lo: int = 16) -> int:
    return max(lo, 1 << (max(1, x) - 1).bit_length())


def _prec(dtype: torch.dtype) -> str:
    return "ieee" if dtype == torch.float32 else "tf32"


# --------------------------------------------------------------------------- representative keys
def chunk_means(k: torch.Tensor, S: int, c: int) -> torch.Tensor:
    """Mean key of every chunk ``[S + i*c, S + (i+1)*c)`` (clipped to the keys that exist).

    k (B, Hkv, Nk, D) -> (B, Hkv, ceil((Nk - S) / c), D) float32.
    """
    B, H, Nk, D = k.shape
    n = max(0, Nk - S)
    nc = -(-n // c)
    out = torch.empty(B, H, nc, D, dtype=torch.float32, device=k.device)
    full = n // c
    if full:
        out[:, :, :full] = k[:, :, S : S + full * c].reshape(B, H, full, c, D).sum(3, dtype=torch.float32) / c
    if nc > full:
        rest = k[:, :, S + full * c :]
        out[:, :, full] = rest.sum(2, dtype=torch.float32) / rest.shape[2]
    return out


# --------------------------------------------------------------------------- scoring kernels
@triton.jit
def _load_sampled_q(Q, b, s, qb, sqb, sqh, sqn, sqd, Nq,
                    GS: tl.constexpr, T: tl.constexpr, R: tl.constexpr, QS: tl.constexpr,
                    BQ: tl.constexpr, D: tl.constexpr):
    r = tl.arange(0, R)
    g = r // T
    t = r % T
    head = s * GS + g
    row = qb * BQ + t * QS
    rvalid = (r < GS * T) & (row < Nq)
    d = tl.arange(0, D)
    ptr = Q + b * sqb + head[:, None] * sqh + row[:, None] * sqn + d[None, :] * sqd
    qt = tl.load(ptr, mask=rvalid[:, None], other=0.0)
    return qt, rvalid


@triton.jit
def _mean_scores_kernel(
    Q, KM, IDS, NCAND, OUT,
    sqb, sqh, sqn, sqd,
    skb, skh, skc, skd,
    sib, sih, siq, sim,
    sob, soh, soq, som,
    Nq, Hs, G_KV, M,
    GS: tl.constexpr, T: tl.constexpr, R: tl.constexpr, QS: tl.constexpr, BQ: tl.constexpr,
    D: tl.constexpr, BC: tl.constexpr, DENSE: tl.constexpr, PREC: tl.constexpr,
):
    bs = tl.program_id(0).to(tl.int64)  # int64 offsets: B*H*N*D passes 2**31 at long N
    qb = tl.program_id(1).to(tl.int64)
    b = bs // Hs
    s = bs % Hs
    qt, rvalid = _load_sampled_q(Q, b, s, qb, sqb, sqh, sqn, sqd, Nq, GS, T, R, QS, BQ, D)
    qt = qt.to(tl.float32)
    kvh = (s * GS) // G_KV
    d = tl.arange(0, D)
    if DENSE:
        n = tl.load(NCAND + qb).to(tl.int32)
    else:
        n = M
    for c0 in range(0, n, BC):
        cidx = c0 + tl.arange(0, BC)
        inb = cidx < n
        if DENSE:
            ids = cidx
            valid = inb
        else:
            ids = tl.load(IDS + b * sib + s * sih + qb * siq + cidx * sim, mask=inb, other=-1)
            valid = ids >= 0
        km = tl.load(KM + b * skb + kvh * skh + ids[:, None] * skc + d[None, :] * skd,
                     mask=valid[:, None], other=0.0)
        sc = tl.dot(qt, tl.trans(km), input_precision=PREC)
        sc = tl.where(rvalid[:, None], sc, float("-inf"))
        best = tl.max(sc, axis=0)
        best = tl.where(valid, best, float("-inf"))
        tl.store(OUT + b * sob + s * soh + qb * soq + cidx * som, best, mask=inb)


@triton.jit
def _block_scores_kernel(
    Q, K, IDS, NCAND, OUT,
    sqb, sqh, sqn, sqd,
    skb, skh, skn, skd,
    sib, sih, siq, sim,
    sob, soh, soq, som,
    Nq, Nk, S, Hs, G_KV, M,
    GS: tl.constexpr, T: tl.constexpr, R: tl.constexpr, QS: tl.constexpr, BQ: tl.constexpr,
    D: tl.constexpr, BK: tl.constexpr, DENSE: tl.constexpr, PREC: tl.constexpr,
):
    bs = tl.program_id(0).to(tl.int64)  # int64 offsets: B*H*N*D passes 2**31 at long N
    qb = tl.program_id(1).to(tl.int64)
    b = bs // Hs
    s = bs % Hs
    qt, rvalid = _load_sampled_q(Q, b, s, qb, sqb, sqh, sqn, sqd, Nq, GS, T, R, QS, BQ, D)
    kvh = (s * GS) // G_KV
    d = tl.arange(0, D)
    j = tl.arange(0, BK)
    if DENSE:
        n = tl.load(NCAND + qb).to(tl.int32)
    else:
        n = M
    kbase = K + b * skb + kvh * skh
    for i in range(0, n):
        if DENSE:
            blk = i
        else:
            blk = tl.load(IDS + b * sib + s * sih + qb * siq + i * sim)
        if blk >= 0:
            key = S + blk * BK + j
            kt = tl.load(kbase + key[:, None] * skn + d[None, :] * skd, mask=(key < Nk)[:, None], other=0.0)
            sc = tl.dot(qt, tl.trans(kt), input_precision=PREC)
            sc = tl.where(rvalid[:, None], sc, float("-inf"))
            best = tl.max(tl.max(sc, axis=1), axis=0)
            tl.store(OUT + b * sob + s * soh + qb * soq + i * som, best)


def _score_launch_args(q, gs, block_q, q_stride):
    B, Hq, Nq, D = q.shape
    T = -(-block_q // q_stride)
    R = _pow2(gs * T)
    NBq = -(-Nq // block_q)
    Hs = Hq // gs
    return B, Hq, Nq, D, T, R, NBq, Hs


def mean_scores(q, km, ids, ncand, *, block_q: int, q_stride: int, gs: int) -> torch.Tensor:
    """Chunk scores ``max_r q_r . km[chunk]`` per (batch, selection head, query block).

    q (B, Hq, Nq, D); km (B, Hkv, Nc, D) float32 chunk means; ``ids`` (B, Hs, NBq, M) int64
    chunk ids (-1 = none) or None for every chunk ``0..ncand[qb]-1`` (``ncand`` (NBq,)).
    Returns (B, Hs, NBq, M or Nc) float32, -inf where there is no candidate.
    """
    B, Hq, Nq, D, T, R, NBq, Hs = _score_launch_args(q, gs, block_q, q_stride)
    G_KV = Hq // km.shape[1]
    dense = ids is None
    M = km.shape[2] if dense else ids.shape[-1]
    out = torch.full((B, Hs, NBq, M), _NEG_INF, dtype=torch.float32, device=q.device)
    if M == 0 or NBq == 0:
        return out
    if dense:
        ids_t = out  # unused
        nc = ncand.to(torch.int32).contiguous()
        si = (0, 0, 0, 0)
    else:
        ids_t = ids
        nc = out  # unused
        si = ids.stride()
    _mean_scores_kernel[(B * Hs, NBq)](
        q, km, ids_t, nc, out,
        *q.stride(), *km.stride(), *si, *out.stride(),
        Nq, Hs, G_KV, M,
        GS=gs, T=T, R=R, QS=q_stride, BQ=block_q, D=D, BC=64 if R <= 64 else 32,
        DENSE=dense, PREC=_prec(q.dtype), num_warps=4,
    )
    return out


def block_scores(q, k, ids, ncand, *, S: int, block_k: int, block_q: int, q_stride: int, gs: int) -> torch.Tensor:
    """Key-block scores ``max_{r, j in block} q_r . k_j``; block ``i`` covers keys ``S + i*block_k ...``.

    q (B, Hq, Nq, D); k (B, Hkv, Nk, D); ``ids`` (B, Hs, NBq, M) int64 (-1 = none) or None for
    every block ``0..ncand[qb]-1``. Returns (B, Hs, NBq, M or max candidates) float32.
    """
    B, Hq, Nq, D, T, R, NBq, Hs = _score_launch_args(q, gs, block_q, q_stride)
    Nk = k.shape[2]
    G_KV = Hq // k.shape[1]
    dense = ids is None
    M = max(0, (Nk - S) // block_k) if dense else ids.shape[-1]
    out = torch.full((B, Hs, NBq, M), _NEG_INF, dtype=torch.float32, device=q.device)
    if M == 0 or NBq == 0:
        return out
    if dense:
        ids_t, nc, si = out, ncand.to(torch.int32).contiguous(), (0, 0, 0, 0)
    else:
        ids_t, nc, si = ids, out, ids.stride()
    _block_scores_kernel[(B * Hs, NBq)](
        q, k, ids_t, nc, out,
        *q.stride(), *k.stride(), *si, *out.stride(),
        Nq, Nk, S, Hs, G_KV, M,
        GS=gs, T=T, R=R, QS=q_stride, BQ=block_q, D=D, BK=block_k,
        DENSE=dense, PREC=_prec(q.dtype), num_warps=4,
    )
    return out


# --------------------------------------------------------------------------- attention
@triton.jit
def _attn_tile(acc, m_i, l_i, qt, kbase, vbase, kstart, pos, Nk, skn, skd, svn, svd, qk_scale,
               BN: tl.constexpr, D: tl.constexpr, MASK: tl.constexpr, PREC: tl.constexpr):
    j = kstart + tl.arange(0, BN)
    d = tl.arange(0, D)
    kin = j < Nk
    kt = tl.load(kbase + j[:, None] * skn + d[None, :] * skd, mask=kin[:, None], other=0.0)
    vt = tl.load(vbase + j[:, None] * svn + d[None, :] * svd, mask=kin[:, None], other=0.0)
    s = tl.dot(qt, tl.trans(kt), input_precision=PREC) * qk_scale
    if MASK:
        s = tl.where(j[None, :] <= pos[:, None], s, float("-inf"))
    m_new = tl.maximum(m_i, tl.max(s, axis=1))
    m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)
    alpha = tl.exp2(m_i - m_safe)
    p = tl.exp2(s - m_safe[:, None])
    l_i = l_i * alpha + tl.sum(p, axis=1)
    acc = acc * alpha[:, None] + tl.dot(p.to(vt.dtype), vt, input_precision=PREC)
    return acc, m_new, l_i


@triton.jit
def _hip_attn_kernel(
    Q, K, V, O, LSE, SEL, CNT, WIN,
    sqb, sqh, sqn, sqd,
    skb, skh, skn, skd,
    svb, svh, svn, svd,
    sob, soh, son, sod,
    slb, slh, sln,
    ssb, ssh, ssq, ssi,
    scb, sch, scq,
    Nq, Nk, q_offset, Hq, G_KV, G_SEL, S, NBq, qk_scale,
    BM: tl.constexpr, BN: tl.constexpr, D: tl.constexpr, PREC: tl.constexpr,
):
    bh = tl.program_id(0).to(tl.int64)  # int64 offsets: B*H*N*D passes 2**31 at long N
    qb = NBq - 1 - tl.program_id(1).to(tl.int64)  # longest query blocks first
    b = bh // Hq
    h = bh % Hq
    kvh = h // G_KV
    sh = h // G_SEL
    rows = qb * BM + tl.arange(0, BM)
    rvalid = rows < Nq
    pos = q_offset + rows
    d = tl.arange(0, D)
    qt = tl.load(Q + b * sqb + h * sqh + rows[:, None] * sqn + d[None, :] * sqd, mask=rvalid[:, None], other=0.0)
    kbase = K + b * skb + kvh * skh
    vbase = V + b * svb + kvh * svh
    m_i = tl.full([BM], float("-inf"), tl.float32)
    l_i = tl.zeros([BM], tl.float32)
    acc = tl.zeros([BM, D], tl.float32)
    p_last = tl.minimum(q_offset + qb * BM + BM - 1, q_offset + Nq - 1)
    last_blk = p_last // BN
    # sink blocks [0, S) (causal)
    n_sink = tl.minimum(S // BN, last_blk + 1)
    for kb in range(0, n_sink):
        acc, m_i, l_i = _attn_tile(acc, m_i, l_i, qt, kbase, vbase, kb * BN, pos, Nk, skn, skd, svn, svd,
                                   qk_scale, BN, D, True, PREC)
    # selected blocks: all in [S, W_b), wholly before every row of the block
    cnt = tl.load(CNT + b * scb + sh * sch + qb * scq)
    for i in range(0, cnt):
        blk = tl.load(SEL + b * ssb + sh * ssh + qb * ssq + i * ssi)
        acc, m_i, l_i = _attn_tile(acc, m_i, l_i, qt, kbase, vbase, blk * BN, pos, Nk, skn, skd, svn, svd,
                                   qk_scale, BN, D, False, PREC)
    # window blocks [max(W_b, S), p] (causal)
    w = tl.maximum(tl.load(WIN + qb), S)
    for kb in range(w // BN, last_blk + 1):
        acc, m_i, l_i = _attn_tile(acc, m_i, l_i, qt, kbase, vbase, kb * BN, pos, Nk, skn, skd, svn, svd,
                                   qk_scale, BN, D, True, PREC)
    has = l_i > 0.0
    l_safe = tl.where(has, l_i, 1.0)
    out = acc / l_safe[:, None]
    lse = tl.where(has, (m_i + tl.log2(l_safe)) * 0.6931471805599453, float("-inf"))
    tl.store(O + b * sob + h * soh + rows[:, None] * son + d[None, :] * sod, out.to(O.dtype.element_ty),
             mask=rvalid[:, None])
    tl.store(LSE + b * slb + h * slh + rows * sln, lse, mask=rvalid)


def hip_attention(q, k, v, plan, *, scale: float) -> AttentionResult:
    """Block-sparse attention over ``plan`` (a :class:`~sparsekit.backends.hip.HiPPlan`).

    q (B, Hq, Nq, D); k, v (B, Hkv, Nk, D). Row ``p`` of query block ``b`` attends keys
    ``j <= p`` in ``[0, S)``, in the selected blocks, and in ``[max(W_b, S), p]``.
    Returns out (B, Hq, Nq, D) in q's dtype and lse (B, Hq, Nq) float32 natural log.
    """
    B, Hq, Nq, D = q.shape
    Hkv, Nk = k.shape[1], k.shape[2]
    out = torch.empty_like(q)
    lse = torch.empty(B, Hq, Nq, dtype=torch.float32, device=q.device)
    NBq = plan.n_qblocks
    win = plan.win_start.to(device=q.device, dtype=torch.int64).contiguous()
    sel, cnt = plan.blocks, plan.counts
    _hip_attn_kernel[(B * Hq, NBq)](
        q, k, v, out, lse, sel, cnt, win,
        *q.stride(), *k.stride(), *v.stride(), *out.stride(), *lse.stride(),
        *sel.stride(), *cnt.stride(),
        Nq, Nk, plan.q_offset, Hq, Hq // Hkv, plan.heads_per_sel, plan.sink_end, NBq,
        scale * 1.4426950408889634,
        BM=plan.block_q, BN=plan.block_k, D=D, PREC=_prec(q.dtype),
        num_warps=4, num_stages=2,
    )
    return AttentionResult(out, lse)
