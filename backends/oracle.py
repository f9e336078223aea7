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
* ``allocate="block"`` (default): budget per query block: ``k // block_k`` blocks (``k`` keys) or
  ``ceil(density * n_visible)`` blocks (``density`` of the block's visible key blocks), given to the
  other visible blocks by descending mass (ties: lower id). The best pattern with that budget in every
  query block;
* ``allocate="global"`` (``density`` only): one budget per group, ``density`` times the group's dense
  causal pairs minus the diagonal blocks' pairs, spent on the (query block, key block) cells with the
  most mass per attended pair (each row's mass weighted by its causal length, as density weighs rows),
  best first (ties: lower query block, then lower key block), skipping a
  cell that no longer fits. The greedy solution of "most attention mass for this many pairs" (exact up
  to the last partly fitting cells): the yardstick for backends that spend their blocks unevenly;
* row ``p`` attends key ``j`` iff ``j <= p`` and ``j``'s block is kept for ``(group, b)``.
"""

from __future__ import annotations

import weakref
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
    allocate : str
        ``"block"`` (the same budget in every query block) or ``"global"`` (one budget per group,
        spent where the mass per pair is largest; needs ``density``).

    The mass map of the last call is kept (keyed by the identity and version of q and k, the scale,
    q_offset and the block shape), so several oracles over the same inputs compute it once.
    """

    name: ClassVar[str] = "oracle"
    data_dependent: ClassVar[bool] = True
    reference_only: ClassVar[bool] = True
    k: Optional[int] = None
    density: Optional[float] = 0.1
    block_q: int = 128
    block_k: int = 128
    share_kv: bool = True
    allocate: str = "block"
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
        if self.allocate not in ("block", "global"):
            raise ValueError(f"oracle: allocate must be 'block' or 'global', got {self.allocate!r}")
        if self.allocate == "global" and self.density is None:
            raise ValueError("oracle: allocate='global' spends a density budget: give density, not k")

    @classmethod
    def sweep(cls, n: int) -> list:
        """``sparsekit sweep``'s settings: densities 1..50% with blocks of 64 up to 32K, 128 above (the
        block_threshold settings' blocks), two curves: ``"oracle"`` (``allocate="global"``, the sweep's
        reference) and ``"oracle per block"`` (``allocate="block"``). Cheap once the mass map is computed
        (kept for the same inputs, one per allocation), so a fine grid, close to interpolate."""
        bs = 64 if n <= 32768 else 128
        dens = (0.01, 0.015, 0.02, 0.03, 0.04, 0.05, 0.07, 0.1, 0.14, 0.2, 0.28, 0.35, 0.5)
        out = [dict(series=cls.name, label=f"density={d}",
                    options=dict(density=d, block_q=bs, block_k=bs, allocate="global")) for d in dens]
        return out + [dict(series=f"{cls.name} per block", label=f"density={d}",
                           options=dict(density=d, block_q=bs, block_k=bs)) for d in dens]

    def series(self) -> str:
        """``"oracle"`` for ``allocate="global"`` (the sweep's reference), ``"oracle per block"`` otherwise."""
        return self.name if self.allocate == "global" else f"{self.name} per block"

    def mass(self, q, k, *, scale: float, q_offset: int, weighted: bool = False) -> torch.Tensor:
        """float32 ``[B, G, n_qblocks, n_kblocks]``: attention mass per (group, query block, key block),
        summed over the block's rows (each weighted by its causal length ``pos + 1`` when ``weighted``) and
        the group's heads; the last result is reused for the same inputs."""
        key = (self.block_q, self.block_k, self.share_kv, float(scale), int(q_offset), q._version, k._version,
               weighted)
        hit = _LAST.get("mass")
        if hit is not None and hit[0] == key and hit[1]() is q and hit[2]() is k:
            return hit[3]
        M = self._mass(q, k, scale=scale, q_offset=q_offset, weighted=weighted)
        _LAST["mass"] = (key, weakref.ref(q), weakref.ref(k), M)
        return M

    def _mass(self, q, k, *, scale: float, q_offset: int, weighted: bool) -> torch.Tensor:
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
            if weighted:
                p = p * (pos + 1).to(p.dtype)[:, None]
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
        M = self.mass(q, k, scale=scale, q_offset=q_offset, weighted=self.allocate == "global")
        nqb, nkb = M.shape[2], M.shape[3]
        dev = q.device
        b = torch.arange(nqb, device=dev)
        first = q_offset + b * bq
        last = q_offset + torch.clamp((b + 1) * bq, max=nq) - 1
        kb = torch.arange(nkb, device=dev)
        visible = (kb[None, :] * bk) <= last[:, None]
        diag = (kb[None, :] >= (first // bk)[:, None]) & (kb[None, :] <= (last // bk)[:, None])
        if self.allocate == "global":
            keep = _global(M, diag, visible, _block_pairs(first, last, nk, bk), self.density)
            return _from_keep(keep, q, k, q_offset, bq, bk)
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
        return _from_keep(keep, q, k, q_offset, bq, bk)


_LAST: dict = {}


def _from_keep(keep, q, k, q_offset, bq, bk) -> Pattern:
    """bool ``[B, G, nqb, nkb]`` -> the pattern (ascending CSR lists)."""
    nkb = keep.shape[-1]
    counts = keep.sum(-1).reshape(-1)
    indptr = torch.zeros(counts.numel() + 1, dtype=torch.int64, device=keep.device)
    indptr[1:] = counts.cumsum(0)
    indices = keep.reshape(-1, nkb).nonzero()[:, 1].to(torch.int32)
    return Pattern.from_blocks(q, k, q_offset=q_offset, block_q=bq, block_k=bk, blocks=(indptr, indices),
                               groups=(keep.shape[0], keep.shape[1]), sorted_unique=True)


def _block_pairs(first, last, nk: int, bk: int) -> torch.Tensor:
    """int64 ``[nqb, nkb]``: causal (row, key) pairs of each query block's rows ``first..last`` (absolute,
    contiguous) in each key block."""
    nkb = -(-nk // bk)
    s = torch.arange(nkb, device=first.device, dtype=torch.int64) * bk
    L = torch.clamp(nk - s, max=bk)  # keys in the block

    def H(t):  # sum over u <= t of clamp(u + 1, 0, L)
        tri = (t + 1) * (t + 2) // 2
        full = L * (L + 1) // 2 + (t - L + 1) * L
        return torch.where(t < 0, torch.zeros_like(t), torch.where(t <= L - 1, tri, full))

    a = first[:, None] - s[None, :]
    b = last[:, None] - s[None, :]
    return H(b) - H(a - 1)


def _global(M, diag, visible, pairs, density: float):
    """Greedy top mass-per-pair cells within ``density`` of each group's dense pairs (see the module docstring)."""
    B, G, nqb, nkb = M.shape
    dense = pairs.sum()
    keep = diag.expand(B, G, nqb, nkb).clone()
    cand = (visible & ~diag).reshape(-1)
    pf = pairs.reshape(-1).double()
    for b in range(B):
        for g in range(G):
            left = density * float(dense) - float(pairs[diag].sum())
            ratio = (M[b, g].reshape(-1).double() / pf.clamp(min=1)).masked_fill(~cand, -1.0)
            order = torch.sort(ratio, descending=True, stable=True).indices
            order = order[ratio[order] >= 0]
            cost = pf[order]
            # cells taken best first while they fit; a cell that does not fit is skipped (the cumulative
            # cost of the taken cells is what is compared, so later, cheaper cells can still fit)
            take = torch.zeros_like(cost, dtype=torch.bool)
            csum = torch.cumsum(cost, 0)
            fits = csum <= left
            take[fits] = True
            n = int(fits.sum())
            if n < cost.numel():  # the rest: one pass over the remaining cells, in order
                used = float(csum[n - 1]) if n else 0.0
                rest = cost[n:].tolist()
                for i, c in enumerate(rest):
                    if used + c <= left:
                        used += c
                        take[n + i] = True
            flat = keep[b, g].reshape(-1)
            flat[order[take]] = True
    return keep
