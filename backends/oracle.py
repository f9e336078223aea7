"""Oracle block selection: the key blocks that truly hold the most attention (an upper bound, not a fast path).

For the evaluation harness: at a given density, how far is a real backend from the best block
pattern there is? The oracle computes every query block's exact attention (dense, in float32,
chunked over query blocks, so it costs *more* than dense attention) and keeps, per
(group, query block), the key blocks with the largest attention mass.

Exact rule:

* query block ``b`` = call rows ``[b*block_q, (b+1)*block_q)``; key block ``j`` = keys
  ``[j*block_k, (j+1)*block_k)``; mass ``M[b, j] = sum over the block's rows r and the group's heads h
  of sum_{key in j, key <= pos(r)} softmax_h(r)[key]`` (softmax over the row's whole causal prefix);
* the *diagonal* blocks (those holding a position of the block's rows) are always kept, so every
  row sees itself; they come on top of the budget (a budget spent on the diagonal would leave the
  first rows of a block with nothing but their own key);
* budget per query block: ``k // block_k`` blocks (``k`` keys) or ``ceil(density * n_visible)``
  blocks (``density`` of the block's visible key blocks), given to the other visible blocks by
  descending mass (ties: lower id);
* row ``p`` attends key ``j`` iff ``j <= p`` and ``j``'s block is kept for ``(group, b)``.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar, Optional

import torch

from sparsekit.base import Backend
from sparsekit.pattern import Pattern
from sparsekit.validate import MAX_TOKENS, check_int_option

__all__ = ["Oracle"]


@dataclass
class Oracle(Backend):
    """Exact top-mass key blocks per query block (module docstring). Give ``k`` or ``density``.

    Parameters
    ----------
    k : int or None
        Keys per query block (``k // block_k`` blocks besides the diagonal blocks).
    density : float or None
        Fraction in (0, 1] of each query block's visible key blocks.
    block_q, block_k : int
    share_kv : bool
        One selection per KV head (masses summed over its query heads) or per query head.
    """

    name: ClassVar[str] = "oracle"
    data_dependent: ClassVar[bool] = True
    reference_only: ClassVar[bool] = True
    k: Optional[int] = None
    density: Optional[float] = 0.1
    block_q: int = 128
    block_k: int = 128
    share_kv: bool = True
    #: score cells (rows x keys x heads) per chunk
    chunk_cells: ClassVar[int] = 1 << 27

    def __post_init__(self):
        self.k = check_int_option("oracle", "k", self.k, 1, maximum=MAX_TOKENS, allow_none=True)
        if self.density is not None:
            if isinstance(self.density, bool) or not isinstance(self.density, (int, float)):
                raise TypeError(f"oracle: density must be a number in (0, 1] or None, got {self.density!r}")
            self.density = float(self.density)
            if not 0.0 < self.density <= 1.0:
                raise ValueError(f"oracle: density must be in (0, 1], got {self.density}")
        if (self.k is None) == (self.density is None):
            raise ValueError("oracle: give exactly one of k (keys per query block) and density (e.g. density=0.1, k=None)")
        self.block_q = check_int_option("oracle", "block_q", self.block_q, 1, maximum=MAX_TOKENS)
        self.block_k = check_int_option("oracle", "block_k", self.block_k, 1, maximum=MAX_TOKENS)
        if not isinstance(self.share_kv, bool):
            raise TypeError(f"oracle: share_kv must be a bool, got {self.share_kv!r}")

    def mass(self, q, k, *, scale: float, q_offset: int) -> torch.Tensor:
        """float32 ``[B, G, n_qblocks, n_kblocks]``: attention mass per (group, query block, key block)."""
        B, Hq, nq, D = q.shape
        Hkv, nk = k.shape[1], k.shape[2]
        G = Hkv if self.share_kv else Hq
        bq, bk = self.block_q, self.block_k
        nqb, nkb = -(-nq // bq), -(-nk // bk)
        out = torch.zeros(B, G, nqb, nkb, dtype=torch.float32, device=q.device)
        rep = Hq // Hkv
        kf = k.float()
        keys = torch.arange(nk, device=q.device)
        step = max(1, self.chunk_cells // max(1, B * Hq * nk * bq))
        pad = nkb * bk - nk
        for qb0 in range(0, nqb, step):
            r0, r1 = qb0 * bq, min(nq, (qb0 + step) * bq)
            qc = q[:, :, r0:r1].float().reshape(B, Hkv, rep, r1 - r0, D)
            s = (qc @ kf[:, :, None].transpose(-1, -2)) * scale  # (B, Hkv, rep, R, nk)
            pos = q_offset + torch.arange(r0, r1, device=q.device)
            s = s.masked_fill(keys[None, :] > pos[:, None], float("-inf"))
            p = torch.softmax(s, dim=-1)
            if pad:
                p = torch.nn.functional.pad(p, (0, pad))
            p = p.reshape(*p.shape[:-1], nkb, bk).sum(-1)  # (B, Hkv, rep, R, nkb)
            R = r1 - r0
            nb = -(-R // bq)
            if nb * bq != R:
                p = torch.nn.functional.pad(p, (0, 0, 0, nb * bq - R))
            p = p.reshape(B, Hkv, rep, nb, bq, nkb).sum(4)
            p = p.sum(2)[:, :, None] if self.share_kv else p.reshape(B, Hq, 1, nb, nkb)
            out[:, :, qb0:qb0 + nb] = p[:, :, 0]
        return out

    def pattern(self, q, k, *, scale: float, q_offset: int) -> Pattern:
        B, Hq, nq, _ = q.shape
        nk = k.shape[2]
        bq, bk = self.block_q, self.block_k
        M = self.mass(q, k, scale=scale, q_offset=q_offset)
        nqb, nkb = M.shape[2], M.shape[3]
        dev = q.device
        b = torch.arange(nqb, device=dev)
        first = q_offset + b * bq
        last = q_offset + torch.clamp((b + 1) * bq, max=nq) - 1
        kb = torch.arange(nkb, device=dev)
        visible = (kb[None, :] * bk) <= last[:, None]
        diag = (kb[None, :] >= (first // bk)[:, None]) & (kb[None, :] <= (last // bk)[:, None])
        n_vis = visible.sum(-1)
        if self.k is not None:
            budget = torch.full_like(n_vis, self.k // bk)
        else:
            budget = torch.ceil(self.density * n_vis.double()).long()
        budget = budget + diag.sum(-1)  # (nqb,): the diagonal blocks rank first
        # rank: diagonal first, then mass descending, ties to the lower id (stable sort)
        key = torch.where(diag, torch.full_like(M, 2.0), M / M.sum(-1, keepdim=True).clamp(min=1e-30))
        key = torch.where(visible, key, torch.full_like(M, -1.0))
        _, order = torch.sort(key, dim=-1, descending=True, stable=True)
        rank = torch.empty_like(order)
        rank.scatter_(-1, order, torch.arange(nkb, device=dev).expand_as(order).contiguous())
        keep = (rank < budget[:, None]) & visible
        counts = keep.sum(-1).reshape(-1)
        indptr = torch.zeros(counts.numel() + 1, dtype=torch.int64, device=dev)
        indptr[1:] = counts.cumsum(0)
        indices = keep.reshape(-1, nkb).nonzero()[:, 1].to(torch.int32)
        return Pattern.from_blocks(q, k, q_offset=q_offset, block_q=bq, block_k=bk, blocks=(indptr, indices),
                                   groups=(B, M.shape[1]), sorted_unique=True)
