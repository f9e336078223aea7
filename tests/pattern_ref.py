"""Independent checks of a Pattern's derived data (written from the module docstring's rule, not its code)."""

from __future__ import annotations

import torch


def _band(p, pos, j):
    """bool [nq, nk]: j < sink or j > pos - window (no window part when window == 0)."""
    band = (j[None, :] < p.sink).expand(pos.numel(), j.numel())
    if p.window:
        band = band | (j[None, :] > pos[:, None] - p.window)
    return band


def rule_mask(p) -> torch.Tensor:
    """bool [groups, nq, nk] straight from the rule: causal and (band or listed block or column)."""
    G, NQB, NKB = p.groups, p.n_qblocks, p.n_kblocks
    pos = p.row_positions().cpu()
    j = torch.arange(p.nk)
    band = _band(p, pos, j)
    vis = band.expand(G, p.nq, p.nk).clone()
    if p.block_indptr is not None:
        table = torch.zeros(G * NQB, NKB + 1, dtype=torch.bool)
        ip, ix = p.block_indptr.cpu(), p.block_indices.cpu().long()
        for s in range(G * NQB):
            sel = ix[ip[s]:ip[s + 1]]
            table[s, sel.clamp(0, NKB)] = True
        rows = torch.arange(p.nq)
        qb = (rows + p.block_shift) // p.block_q
        t = table.view(G, NQB, NKB + 1)[:, qb][:, :, j // p.block_k]
        vis |= t
    if p.columns is not None:
        c = p.columns.reshape(G, -1).cpu()
        for g in range(G):
            cc = c[g][c[g] >= 0]
            vis[g][:, cc] = True
    return vis & (j[None, :] <= pos[:, None])[None]


def lowered_mask(p) -> torch.Tensor:
    """int [groups, nq, nk]: how many times the lowered lists count each pair (must be 0 or 1)."""
    L = p.lower()
    G, NQB = L.groups, L.n_qblocks
    pos = p.row_positions().cpu()
    rb = p.row_bounds().cpu()
    j = torch.arange(p.nk)
    band = _band(p, pos, j)
    causal = j[None, :] <= pos[:, None]
    cnt = torch.zeros(G, p.nq, p.nk, dtype=torch.int64)
    ip, kb, full = L.indptr.cpu(), L.kblock.cpu().long(), L.full.cpu()
    cip, cix = L.col_indptr.cpu(), L.col_index.cpu()
    for s in range(G * NQB):
        g, qb = divmod(s, NQB)
        r0, r1 = int(rb[qb]), int(rb[qb + 1])
        for e in range(int(ip[s]), int(ip[s + 1])):
            k0, k1 = int(kb[e]) * p.block_k, min(p.nk, (int(kb[e]) + 1) * p.block_k)
            m = causal[r0:r1, k0:k1] & (band[r0:r1, k0:k1] | bool(full[e]))
            cnt[g, r0:r1, k0:k1] += m.long()
        cols = cix[int(cip[s]):int(cip[s + 1])]
        if cols.numel():
            m = causal[r0:r1][:, cols] & ~band[r0:r1][:, cols]
            cnt[g, r0:r1][:, cols] += m.long()
    return cnt
