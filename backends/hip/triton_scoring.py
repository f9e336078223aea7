"""Triton kernels of the ``hip`` backend's selection (scoring); the attention runs in sparsekit's executor.

Imported lazily by ``backends/hip/selection.py`` (``pip install "sparsekit-prefill[triton]"``).
Every function takes the public layout ``[B, H, N, D]`` with any strides and implements exactly the
semantics of the torch reference in ``backends/hip/selection.py`` (see ``docs/hip.md``):

* :func:`chunk_means` -- representative key of each chunk (mean of its keys), float32.
* :func:`mean_scores` -- ``max_r q_r . mean_c`` over a query block's sampled rows.
* :func:`block_scores` -- ``max_{r, j in block} q_r . k_j`` (exact best key of a block).

The kernels read K/V through their KV head (GQA native: nothing is repeated).
"""

from __future__ import annotations

import math

import torch

try:
    import triton
    import triton.language as tl
except ImportError as e:  # pragma: no cover - exercised only without triton
    raise ImportError('the hip Triton kernels need triton: pip install "sparsekit-prefill[triton]"') from e

__all__ = ["chunk_means", "mean_scores", "block_scores"]

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
