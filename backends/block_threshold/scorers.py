"""Block scorers of ``block_threshold`` (see :mod:`.pieces` for the contract).

* :class:`Pooled` -- mean-pooled ``q . k`` per (query block, key block), softmax over the visible key
  blocks of each query head, averaged over the heads of a group (MoBA / SpargeAttn / FlexPrefill's
  estimate). Triton on CUDA (:mod:`.triton_pooled`), torch elsewhere (the reference).
* :class:`Antidiagonal` -- XAttention's strided antidiagonal sums: every ``stride x stride`` tile of
  the score matrix is summarised by its antidiagonal, a softmax over those summaries per strided
  row, and block shares are their sums inside each block, averaged over the block's rows and the
  group's heads. Cost ``~ nq * nk * D / stride`` (torch matmuls; on the GPU through cuBLAS).
* :class:`VSlash` -- FlashPrefill's vertical + slash + block scores on top of :class:`Pooled`: the
  score of block ``(i, j)`` is the largest of its own share, the mean share of key block ``j`` over
  every query block (a vertical line) and the mean share of the diagonal ``i``-``j`` (a slash),
  renormalised per row.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch

from .pieces import BlockScorer, Geometry

__all__ = ["Pooled", "Antidiagonal", "VSlash", "block_means"]


def block_means(x: torch.Tensor, block: int) -> torch.Tensor:
    """Mean over each block of ``block`` rows (the last may be shorter): (B, H, N, D) -> (B, H, ceil(N/block), D) float32."""
    B, H, N, D = x.shape
    nb = -(-N // block)
    out = torch.empty(B, H, nb, D, dtype=torch.float32, device=x.device)
    full = N // block
    if full:
        out[:, :, :full] = x[:, :, : full * block].reshape(B, H, full, block, D).sum(3, dtype=torch.float32) / block
    if nb > full:
        rest = x[:, :, full * block :]
        out[:, :, full] = rest.sum(2, dtype=torch.float32) / rest.shape[2]
    return out


def _group_q(geo: Geometry, t: torch.Tensor) -> torch.Tensor:
    """(B, Hq, ...) -> (B, G, HPG, ...)."""
    return t.reshape(geo.batch, geo.groups, geo.heads_per_group, *t.shape[2:])


def _group_k(geo: Geometry, t: torch.Tensor) -> torch.Tensor:
    """(B, Hkv, ...) -> (B, G, 1, ...): the KV head of each group (per-query-head groups repeat it)."""
    if geo.groups != geo.kv_heads:
        t = t.repeat_interleave(geo.groups // geo.kv_heads, dim=1)
    return t[:, :, None]


def _softmax_visible(logits: torch.Tensor, visible: torch.Tensor) -> torch.Tensor:
    """Softmax over the last dim where ``visible`` (broadcast), 0 elsewhere."""
    logits = logits.masked_fill(~visible, float("-inf"))
    return torch.softmax(logits, dim=-1).nan_to_num_(0.0)


@dataclass
class _PooledState:
    geo: Geometry
    qbar: torch.Tensor  # (B, Hq, nqb, D) float32
    kbar: torch.Tensor  # (B, Hkv, nkb, D) float32
    use_triton: bool
    ieee: bool  # float32 inputs: exact float32 products on the GPU too (else tf32)


@dataclass
class Pooled(BlockScorer):
    """Mean-pooled block scores (module docstring)."""

    name: ClassVar[str] = "pooled"

    def prepare(self, geo, q, k, *, use_triton):
        return _PooledState(geo, block_means(q, geo.block_q), block_means(k, geo.block_k), use_triton,
                            q.dtype in (torch.float32, torch.float64))

    def scores(self, st, qb0, qb1):
        geo = st.geo
        if st.use_triton:
            from .triton_pooled import pooled_shares

            return pooled_shares(st.qbar, st.kbar, geo.last_pos(), qb0, qb1, geo.groups, geo.block_k, geo.scale,
                                 ieee=st.ieee)
        qg = _group_q(geo, st.qbar[:, :, qb0:qb1])  # (B, G, HPG, R, D)
        kg = _group_k(geo, st.kbar)  # (B, G, 1, nkb, D)
        logits = (qg @ kg.transpose(-1, -2)) * geo.scale
        return _softmax_visible(logits, geo.visible(qb0, qb1)).mean(dim=2)


@dataclass
class VSlash(BlockScorer):
    """Vertical + slash + block scores over pooled shares (module docstring)."""

    name: ClassVar[str] = "vslash"

    def prepare(self, geo, q, k, *, use_triton):
        base = Pooled()
        st = base.prepare(geo, q, k, use_triton=use_triton)
        B, G, nkb = geo.batch, geo.groups, geo.n_kblocks
        vsum = torch.zeros(B, G, nkb, dtype=torch.float32, device=geo.device)
        ssum = torch.zeros(B, G, nkb, dtype=torch.float32, device=geo.device)
        vcnt = torch.zeros(nkb, dtype=torch.float32, device=geo.device)
        scnt = torch.zeros(nkb, dtype=torch.float32, device=geo.device)
        step = _rows_per_chunk(self, geo, geo.n_kblocks)
        for qb0 in range(0, geo.n_qblocks, step):
            qb1 = min(geo.n_qblocks, qb0 + step)
            P = base.scores(st, qb0, qb1)  # (B, G, R, nkb)
            vis = geo.visible(qb0, qb1)
            vsum += P.sum(dim=2)
            vcnt += vis.sum(dim=0)
            d = self._diag(geo, qb0, qb1)  # (R, nkb), -1 where not visible
            idx = d.clamp(min=0).expand(B, G, *d.shape).reshape(B, G, -1)
            ssum.scatter_add_(2, idx, (P * vis).reshape(B, G, -1))
            scnt.scatter_add_(0, d.clamp(min=0).reshape(-1), vis.reshape(-1).float())
        return (st, vsum / vcnt.clamp(min=1), ssum / scnt.clamp(min=1))

    @staticmethod
    def _diag(geo, qb0, qb1):
        """Diagonal index of each (query block, key block): key blocks back from the query block's last visible one."""
        last = geo.last_pos(qb0, qb1) // geo.block_k
        kb = torch.arange(geo.n_kblocks, device=geo.device)
        d = last[:, None] - kb[None, :]
        return torch.where(d >= 0, d, torch.full_like(d, -1))

    def scores(self, state, qb0, qb1):
        st, vert, slash = state
        geo = st.geo
        P = Pooled().scores(st, qb0, qb1)
        d = self._diag(geo, qb0, qb1)
        vis = d >= 0
        S = slash[:, :, d.clamp(min=0)]  # (B, G, R, nkb)
        C = torch.maximum(torch.maximum(P, vert[:, :, None, :]), S) * vis
        return C / C.sum(dim=-1, keepdim=True).clamp(min=1e-30)


@dataclass
class _AntiState:
    geo: Geometry
    qs: torch.Tensor  # (B, Hq, M, S*D) strided queries (input dtype)
    ks: torch.Tensor  # (B, Hkv, Nks, S*D) strided keys, reversed inside each group of S
    stride: int


@dataclass
class Antidiagonal(BlockScorer):
    """XAttention's strided antidiagonal scores (module docstring); ``stride`` divides both block sizes."""

    name: ClassVar[str] = "antidiagonal"
    stride: int = 8

    def __post_init__(self):
        from sparsekit.validate import check_int_option

        self.stride = check_int_option("antidiagonal", "stride", self.stride, 1)

    def check(self, block_q, block_k):
        if block_q % self.stride or block_k % self.stride:
            raise ValueError(
                f"block_threshold: antidiagonal stride ({self.stride}) must divide block_q ({block_q}) and "
                f"block_k ({block_k})"
            )

    def prepare(self, geo, q, k, *, use_triton):
        S = self.stride
        B, Hq, nq, D = q.shape
        Hkv, nk = k.shape[1], k.shape[2]
        M, Nks = -(-nq // S), -(-nk // S)
        dt = torch.float32 if q.device.type == "cpu" else q.dtype
        qp = q.new_zeros(B, Hq, M * S, D, dtype=dt)
        qp[:, :, :nq] = q
        kp = k.new_zeros(B, Hkv, Nks * S, D, dtype=dt)
        kp[:, :, :nk] = k
        qs = qp.reshape(B, Hq, M, S * D)
        ks = kp.reshape(B, Hkv, Nks, S, D).flip(3).reshape(B, Hkv, Nks, S * D)
        return _AntiState(geo, qs, ks, S)

    def scores(self, st, qb0, qb1):
        geo, S = st.geo, st.stride
        per_q, per_k = geo.block_q // S, geo.block_k // S
        m0, m1 = qb0 * per_q, min(qb1 * per_q, st.qs.shape[2])
        qg = _group_q(geo, st.qs[:, :, m0:m1])  # (B, G, HPG, M, S*D)
        kg = _group_k(geo, st.ks)  # (B, G, 1, Nks, S*D)
        logits = (qg @ kg.transpose(-1, -2)).float() * (geo.scale / S)
        m = torch.arange(m0, m1, device=geo.device)
        n = torch.arange(st.ks.shape[2], device=geo.device)
        last_row = torch.clamp(m * S + S - 1, max=geo.nq - 1) + geo.q_offset
        vis = (n[None, :] * S) <= last_row[:, None]
        p = _softmax_visible(logits, vis)  # (B, G, HPG, M, Nks)
        nkb = geo.n_kblocks
        pad = nkb * per_k - p.shape[-1]
        if pad:
            p = torch.nn.functional.pad(p, (0, pad))
        p = p.reshape(*p.shape[:-1], nkb, per_k).sum(-1)  # (B, G, HPG, M, nkb)
        R = qb1 - qb0
        padm = R * per_q - p.shape[3]
        real = torch.ones(p.shape[3], device=geo.device)
        if padm:
            p = torch.nn.functional.pad(p, (0, 0, 0, padm))
            real = torch.nn.functional.pad(real, (0, padm))
        p = p.reshape(*p.shape[:3], R, per_q, nkb).sum(4)
        rows = real.reshape(R, per_q).sum(1)  # strided rows of each query block
        return (p.mean(dim=2) / rows[:, None]) * geo.visible(qb0, qb1)


def _rows_per_chunk(scorer: BlockScorer, geo: Geometry, width: int) -> int:
    """Query blocks per scores() call so one map stays under ``chunk_cells`` cells (per head)."""
    cells = geo.batch * geo.q_heads * max(1, width)
    return max(1, scorer.chunk_cells // cells)
