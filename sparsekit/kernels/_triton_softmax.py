"""The online-softmax steps (and the block-pattern tile) the Triton attention kernels here share.

Imported only from the kernels' lazy builders (triton is an optional dependency), which bind these
names as globals of their own module so that both Triton's compiler and its interpreter find them:

* ``scores(q, kt, IEEE)``: ``q @ kt.T`` (exact fp32 products for fp32 inputs, tensor cores otherwise);
* ``update(acc, m_i, l_i, qk, vt, IEEE)``: one key tile of base-2 online softmax (rows whose scores are
  all ``-inf`` so far keep ``m_i = -inf`` and weigh nothing);
* ``finish(acc, m_i, l_i)``: ``(out, lse)`` with lse in natural log, ``-inf`` and out 0 for a row that saw
  no key;
* ``pattern_tile(...)``: which rows and heads a program of a block-pattern kernel (``triton_blocks``,
  ``triton_meancorr``) owns: ``HPT`` heads x ``ROWS`` rows of one query block (``SUB`` programs per block).
"""

from __future__ import annotations

import triton
import triton.language as tl

__all__ = ["scores", "update", "finish", "pattern_tile"]


@triton.jit
def scores(q, kt, IEEE: tl.constexpr):
    if IEEE:
        qk = tl.dot(q, tl.trans(kt), input_precision="ieee")
    else:
        qk = tl.dot(q, tl.trans(kt))
    return qk


@triton.jit
def update(acc, m_i, l_i, qk, vt, IEEE: tl.constexpr):
    m_new = tl.maximum(m_i, tl.max(qk, axis=1))
    m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)
    p = tl.exp2(qk - m_safe[:, None])
    alpha = tl.exp2(m_i - m_safe)
    l_i = l_i * alpha + tl.sum(p, axis=1)
    acc = acc * alpha[:, None]
    if IEEE:
        acc = tl.dot(p.to(vt.dtype), vt, acc, input_precision="ieee")
    else:
        acc = tl.dot(p.to(vt.dtype), vt, acc)
    return acc, m_new, l_i


@triton.jit
def finish(acc, m_i, l_i):
    nonempty = l_i > 0.0
    l_safe = tl.where(nonempty, l_i, 1.0)
    out = acc / l_safe[:, None]
    lse = tl.where(nonempty, (m_i + tl.log2(l_safe)) * 0.6931471805599453, float("-inf"))
    return out, lse


@triton.jit
def pattern_tile(RB, HQ, GQ, NQB, GROUP_BATCH, GROUP_HEADS, HPT: tl.constexpr, ROWS: tl.constexpr,
                 BLOCK_M: tl.constexpr, SUB: tl.constexpr):
    """Program (query block x sub-tile, batch x head tile) -> ``(b, kvh, g, qb, seg, r_lo, r_hi, head, rows,
    rmask)``: the tile's ``BLOCK_M = HPT * ROWS`` lanes are head ``head[m]`` and row ``rows[m]``; ``g`` is the
    pattern's group and ``seg = g * NQB + qb`` its segment of the block lists; ``RB`` the query-block row bounds."""
    pid_t = tl.program_id(0)
    pid_h = tl.program_id(1)
    qb = pid_t // SUB
    sub = pid_t % SUB
    n_ht = HQ // HPT
    b = (pid_h // n_ht).to(tl.int64)
    h0 = ((pid_h % n_ht) * HPT).to(tl.int64)
    kvh = h0 // GQ
    gb = tl.where(GROUP_BATCH > 1, b, 0)
    g = gb * GROUP_HEADS + (h0 * GROUP_HEADS) // HQ
    seg = g * NQB + qb
    r_lo = tl.load(RB + qb) + sub * ROWS
    r_hi = tl.minimum(tl.load(RB + qb + 1), r_lo + ROWS)
    m = tl.arange(0, BLOCK_M)
    head = h0 + m // ROWS
    rows = r_lo + m % ROWS
    rmask = rows < r_hi
    return b, kvh, g, qb, seg, r_lo, r_hi, head, rows, rmask
