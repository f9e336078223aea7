"""Triton kernel of the ``pooled`` scorer: per (batch, group, query block) the softmax of pooled
block scores over the visible key blocks of each head of the group, averaged over those heads.

Imported lazily (``pip install "sparsekit-prefill[triton]"``); it computes exactly what
``Pooled.scores``'s torch path computes (float32, IEEE products), without materialising per-head
logits: two passes over the key blocks (online max / sum, then the shares).
"""

from __future__ import annotations

import torch

try:
    import triton
    import triton.language as tl
except ImportError as e:  # pragma: no cover - exercised only without triton
    raise ImportError('the block_threshold Triton scorer needs triton: pip install "sparsekit-prefill[triton]"') from e

from sparsekit.kernels._triton_softmax import scores  # noqa: E402  (a global of the kernel below)

__all__ = ["pooled_shares"]


@triton.jit
def _pooled_shares(
    QB, KB, P, LAST,
    s_qb, s_qh, s_qn, s_kb, s_kh, s_kn, s_pb, s_pg, s_pr,
    qb0, qb1, G, HKV, NKB, BK, scale,
    HPG: tl.constexpr, HPGP: tl.constexpr, QBP: tl.constexpr, BLOCK_N: tl.constexpr, D: tl.constexpr,
    IEEE: tl.constexpr,
):
    # one program: QBP query blocks x the HPG heads of one group, stacked as QBP * HPGP rows
    BLOCK_M: tl.constexpr = QBP * HPGP
    pid = tl.program_id(0)
    bg = tl.program_id(1)
    b = (bg // G).to(tl.int64)
    g = bg % G
    kvh = ((g * HKV) // G).to(tl.int64)
    m = tl.arange(0, BLOCK_M)
    qbl = m // HPGP
    hh = m % HPGP
    qrow = qb0 + pid * QBP + qbl
    rmask = (hh < HPG) & (qrow < qb1)
    heads = (g * HPG + hh).to(tl.int64)
    d = tl.arange(0, D)
    q = tl.load(QB + b * s_qb + heads[:, None] * s_qh + qrow.to(tl.int64)[:, None] * s_qn + d[None, :],
                mask=rmask[:, None], other=0.0)
    last = tl.load(LAST + qrow, mask=rmask, other=0)
    n_vis = tl.where(rmask, tl.minimum(last // BK + 1, NKB), 0)
    n_max = tl.max(n_vis, axis=0)
    kbase = KB + b * s_kb + kvh * s_kh
    m_i = tl.full([BLOCK_M], float("-inf"), tl.float32)
    l_i = tl.zeros([BLOCK_M], tl.float32)
    for j0 in range(0, n_max, BLOCK_N):
        j = j0 + tl.arange(0, BLOCK_N)
        kk = tl.load(kbase + j.to(tl.int64)[:, None] * s_kn + d[None, :], mask=(j < n_max)[:, None], other=0.0)
        s = scores(q, kk, IEEE) * scale
        s = tl.where(j[None, :] < n_vis[:, None], s, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(s, axis=1))
        m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)
        l_i = l_i * tl.exp(m_i - m_safe) + tl.sum(tl.exp(s - m_safe[:, None]), axis=1)
        m_i = m_new
    m_i = tl.where(m_i == float("-inf"), 0.0, m_i)
    l_i = tl.where(l_i > 0, l_i, 1.0)
    qo = tl.arange(0, QBP)
    orow = qb0 + pid * QBP + qo
    pbase = P + b * s_pb + g.to(tl.int64) * s_pg + (orow - qb0).to(tl.int64) * s_pr
    n_out = tl.max(tl.reshape(n_vis, [QBP, HPGP]), axis=1)
    for j0 in range(0, n_max, BLOCK_N):
        j = j0 + tl.arange(0, BLOCK_N)
        kk = tl.load(kbase + j.to(tl.int64)[:, None] * s_kn + d[None, :], mask=(j < n_max)[:, None], other=0.0)
        s = scores(q, kk, IEEE) * scale
        p = tl.exp(s - m_i[:, None]) / l_i[:, None]
        p = tl.where(j[None, :] < n_vis[:, None], p, 0.0)
        pg = tl.sum(tl.reshape(p, [QBP, HPGP, BLOCK_N]), axis=1) / HPG
        tl.store(pbase[:, None] + j[None, :], pg, mask=(orow < qb1)[:, None] & (j[None, :] < n_out[:, None]))


def _pow2(x: int, lo: int = 16) -> int:
    return max(lo, 1 << (max(1, x) - 1).bit_length())


def pooled_shares(qbar, kbar, last_pos, qb0: int, qb1: int, groups: int, block_k: int, scale: float,
                  *, ieee: bool = True) -> torch.Tensor:
    """qbar (B, Hq, nqb, D) float32, kbar (B, Hkv, nkb, D) float32, last_pos (nqb,) int64 ->
    float32 (B, G, qb1 - qb0, nkb): shares of query blocks ``qb0..qb1-1`` (0 on invisible blocks).

    ``ieee``: exact float32 products (the torch reference's); False: tf32 tensor-core products
    (for bf16 / fp16 inputs, whose own mantissa is shorter than tf32's)."""
    B, Hq, nqb, D = qbar.shape
    Hkv, nkb = kbar.shape[1], kbar.shape[2]
    R = qb1 - qb0
    out = torch.zeros(B, groups, R, nkb, dtype=torch.float32, device=qbar.device)
    if R == 0:
        return out
    Dp = _pow2(D)
    if Dp != D:  # zero-pad the head dim (exact: zeros add nothing to the products)
        qbar = torch.nn.functional.pad(qbar, (0, Dp - D))
        kbar = torch.nn.functional.pad(kbar, (0, Dp - D))
    qbar, kbar = qbar.contiguous(), kbar.contiguous()
    hpg = Hq // groups
    hpgp = _pow2(hpg, lo=1)
    qbp = max(1, 16 // hpgp)  # stack query blocks so a tile has >= 16 rows (tl.dot's minimum)
    grid = (triton.cdiv(R, qbp), B * groups)
    _pooled_shares[grid](
        qbar, kbar, out, last_pos.contiguous(),
        qbar.stride(0), qbar.stride(1), qbar.stride(2), kbar.stride(0), kbar.stride(1), kbar.stride(2),
        out.stride(0), out.stride(1), out.stride(2),
        qb0, qb1, groups, Hkv, nkb, block_k, float(scale),
        HPG=hpg, HPGP=hpgp, QBP=qbp, BLOCK_N=64, D=Dp, IEEE=ieee,
    )
    return out
