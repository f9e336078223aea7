"""Vertical-slash on CUDA without FlashInfer: FlexAttention with a block mask built from the plan.

The pattern enters twice: a ``mask_mod`` that evaluates the exact token-level rule of
:class:`~sparsekit.backends.vertical_slash.VSPlan` (causal and (kept column or page crossed by a
kept diagonal)), and a 128 x 128 block mask (Flex's default tile) that lists every key block
where that rule may hold, so Flex skips the rest. Rows are padded in front to the plan's row-block
grid (the padded rows are fully masked and dropped). The block mask is a dense
``(B, Hq, Nq/128, Nk/128)`` table: fine to a few hundred thousand tokens; past that use FlashInfer.
"""

from __future__ import annotations

import torch

from ..contract import AttentionResult

__all__ = ["available", "prepare", "run"]

_FB = 128
_COMPILED = {}


def available() -> bool:
    try:
        from torch.nn.attention.flex_attention import flex_attention  # noqa: F401
    except ImportError:
        return False
    return True


def _flex():
    from torch.nn.attention.flex_attention import flex_attention

    if "fn" not in _COMPILED:
        _COMPILED["fn"] = torch.compile(flex_attention, dynamic=False)
    return _COMPILED["fn"]


def _window_any(x: torch.Tensor, dim: int, lo: torch.Tensor, hi: torch.Tensor) -> torch.Tensor:
    """any(x[..., lo[f]:hi[f]+1, ...]) along ``dim`` for each f, by a cumulative sum."""
    cs = x.to(torch.int32).cumsum(dim)
    zero = torch.zeros_like(cs.narrow(dim, 0, 1))
    cs = torch.cat([zero, cs], dim)
    return (cs.index_select(dim, hi + 1) - cs.index_select(dim, lo)) > 0


def prepare(plan) -> None:
    """Build the Flex BlockMask for ``plan``; stored in ``plan.cache['flex']``."""
    if "flex" in plan.cache:
        return
    from torch.nn.attention.flex_attention import BlockMask

    dev = plan.device
    B, Hq, NB, bq, bk = plan.B, plan.Hq, plan.n_blocks, plan.block_q, plan.block_k
    W, S, m = plan.W, plan.S, plan.m
    n_pages = -(-W // bk)
    BH = B * Hq
    # page-level mask per plan row block
    pm = torch.zeros(BH * NB, n_pages, dtype=torch.bool, device=dev)
    cnt, pages = plan.slash_pages()
    req = torch.repeat_interleave(torch.arange(BH * NB, device=dev), cnt.reshape(-1), output_size=pages.numel())
    pm[req, pages] = True
    vcnt, vcols = plan.vertical_columns()
    vreq = torch.repeat_interleave(torch.arange(BH * NB, device=dev), vcnt.reshape(-1), output_size=vcols.numel())
    pm[vreq, vcols // bk] = True
    pm = pm.view(BH, NB, n_pages)
    # coarsen rows: flex block f holds padded rows [128 f, 128 f + 127] = plan blocks lo..hi
    pad_front = plan.q_offset - plan.b_first * bq
    nq_pad = pad_front + plan.Nq
    nf = -(-nq_pad // _FB)
    f = torch.arange(nf, device=dev)
    lo = (f * _FB) // bq
    hi = torch.clamp((f * _FB + _FB - 1) // bq, max=NB - 1)
    rows = _window_any(pm, 1, lo, hi)  # (BH, nf, n_pages)
    ng = -(-plan.Nk // _FB)
    g = torch.arange(ng, device=dev)
    plo = torch.clamp((g * _FB) // bk, max=n_pages - 1)
    phi = torch.clamp((g * _FB + _FB - 1) // bk, max=n_pages - 1)
    blocks = _window_any(rows, 2, plo, phi) & ((g * _FB) < W)[None, None, :]  # (BH, nf, ng)
    num = blocks.sum(-1).to(torch.int32).view(B, Hq, nf)
    idx = torch.sort((~blocks).to(torch.int8), dim=-1, stable=True).indices.to(torch.int32).view(B, Hq, nf, ng)

    covered = plan.covered.reshape(B, Hq, 3 * S)
    colmask = plan.colmask
    _, _, kinds = plan.block_rows()
    base, q_offset, b_first = plan.b_first * bq, plan.q_offset, plan.b_first

    def mask_mod(b, h, q_idx, kv_idx):
        p = base + q_idx
        blk = p // bq
        kind = kinds[(blk - b_first).clamp(0, NB - 1)]
        ci = (kind * S + blk * m - kv_idx // bk + m - 1).clamp(0, 3 * S - 1)
        cov = covered[b, h, ci]
        col = colmask[b, h, kv_idx.clamp(0, W - 1)]
        return (p >= q_offset) & (kv_idx <= p) & (cov | col)

    bm = BlockMask.from_kv_blocks(num, idx, BLOCK_SIZE=_FB, mask_mod=mask_mod, seq_lengths=(nq_pad, plan.Nk))
    plan.cache["flex"] = {"block_mask": bm, "pad_front": pad_front}


def run(plan, q, k, v) -> AttentionResult:
    """q (B, Hq, Nq, D), k/v (B, Hkv, Nk, D) on CUDA -> AttentionResult."""
    if "flex" not in plan.cache:
        prepare(plan)
    c = plan.cache["flex"]
    pad = c["pad_front"]
    qp = torch.cat([q.new_zeros(q.shape[0], q.shape[1], pad, q.shape[3]), q], dim=2) if pad else q
    out, lse = _flex()(qp, k, v, block_mask=c["block_mask"], scale=plan.scale, enable_gqa=True, return_lse=True)
    return AttentionResult(out[:, :, pad:], lse[:, :, pad:].float())
