"""Independent float64 re-implementations used as ground truth by the tests.

Nothing here imports sparsekit's attention code: K/V are expanded with repeat_interleave,
scores are materialised, and the Δ paper's algorithm is written out row by row.
"""

from __future__ import annotations

import math

import torch


def attention64(q, k, v, mask, scale):
    """Masked attention in float64 with K/V repeated to the query heads.

    mask broadcastable to [B, Hq, Nq, Nk]. Returns out [B,Hq,Nq,D] float64, lse [B,Hq,Nq] float64.
    """
    G = q.shape[1] // k.shape[1]
    kr = k.double().repeat_interleave(G, dim=1)
    vr = v.double().repeat_interleave(G, dim=1)
    s = torch.einsum("bhqd,bhkd->bhqk", q.double(), kr) * scale
    mask = torch.broadcast_to(mask, s.shape)
    s = s.masked_fill(~mask, float("-inf"))
    m = s.amax(dim=-1, keepdim=True).nan_to_num(neginf=0.0)
    w = torch.exp(s - m)
    z = w.sum(dim=-1, keepdim=True)
    lse = (m + torch.log(z)).squeeze(-1)
    return (w / z.clamp_min(1e-300)) @ vr, lse


def causal_mask(nq, nk, q_offset, device="cpu"):
    pq = q_offset + torch.arange(nq, device=device)
    return torch.arange(nk, device=device)[None, :] <= pq[:, None]


def paper_rows(nq, gamma, tail):
    """(n_body, anchors list, tail rows list) written from the paper / official code."""
    n_tail = nq % gamma + max(128, gamma) if tail is None else tail
    n_tail = min(n_tail, nq)
    n_body = nq - n_tail
    anchors = list(range(0, n_body, gamma))
    return n_body, anchors, list(range(n_body, nq))


def spread64(kind, params, deltas, gamma, n_body):
    """Per-row correction for body rows from anchor deltas, one row at a time.

    deltas: list over blocks of tensors [..., C]. Returns list over rows.
    """
    nb = len(deltas)
    rows = []
    if kind == "repeat":
        for i in range(n_body):
            rows.append(deltas[i // gamma])
    elif kind == "linear":
        for i in range(n_body):
            kb, j = divmod(i, gamma)
            nxt = deltas[kb + 1] if kb + 1 < nb else deltas[kb]
            rows.append((1 - j / gamma) * deltas[kb] + (j / gamma) * nxt)
    elif kind == "ema":
        beta = params.get("beta", 0.75)
        prev = deltas[0]
        for i in range(n_body):
            cur = (1 - beta) * prev + beta * deltas[i // gamma]
            rows.append(cur)
            prev = cur
    elif kind == "abg":
        a_, b_, g_ = params.get("alpha", 0.2), params.get("beta", 5e-2), params.get("gamma", 3.5e-3)
        x = deltas[0]
        vel = torch.zeros_like(x)
        acc = torch.zeros_like(x)
        for i in range(n_body):
            xp = x + vel + 0.5 * acc
            vp = vel + acc
            r = deltas[i // gamma] - xp
            x = xp + a_ * r
            vel = vp + b_ * r
            acc = acc + 2 * g_ * r
            rows.append(x)
    else:
        raise ValueError(kind)
    return rows


def corrected64(kind, params, sparse_out, sparse_lse, dense_out, dense_lse, gamma, tail):
    """The paper's Δ (or recompute when kind == 'recompute'), row by row, float64."""
    nq = sparse_out.shape[2]
    n_body, anchors, tail_rows = paper_rows(nq, gamma, tail)
    out = sparse_out.clone()
    lse = sparse_lse.clone()
    if kind != "recompute" and n_body > 0:
        deltas = [
            torch.cat([dense_out[:, :, a] - sparse_out[:, :, a], (dense_lse[:, :, a] - sparse_lse[:, :, a])[..., None]], -1)
            for a in anchors
        ]
        rows = spread64(kind, params, deltas, gamma, n_body)
        for i in range(n_body):
            out[:, :, i] = sparse_out[:, :, i] + rows[i][..., :-1]
            lse[:, :, i] = sparse_lse[:, :, i] + rows[i][..., -1]
    for r in anchors + tail_rows:
        out[:, :, r] = dense_out[:, :, r]
        lse[:, :, r] = dense_lse[:, :, r]
    return out, lse


def mean_block64(block, block_k, has_lists):
    """meancorr's mean-block size: ``block`` (None: the pattern's block_k), rounded up to a multiple of
    block_k when the pattern has block lists."""
    m = block_k if block is None else block
    if has_lists and m % block_k:
        m = (m // block_k + 1) * block_k
    return m


def corrected_blocks64(keep, M, q_offset):
    """bool [B, Hq, Nq, ceil(Nk/M)]: mean block j = keys [j*M, min((j+1)*M, Nk)) is corrected for row i iff
    its last key is <= the row's position q_offset + i and keep holds for none of its keys."""
    Nq, Nk = keep.shape[-2], keep.shape[-1]
    nb = -(-Nk // M)
    pos = q_offset + torch.arange(Nq)
    last_key = torch.clamp((torch.arange(nb) + 1) * M, max=Nk) - 1
    visible = last_key[None, :] <= pos[:, None]  # [Nq, nb]
    padded = torch.nn.functional.pad(keep, (0, nb * M - Nk))  # padding keys are never kept
    touched = padded.unflatten(-1, (nb, M)).any(dim=-1)
    return visible & ~touched


def meancorr64(q, k, v, keep, scale, M, q_offset, sparse_out, sparse_lse):
    """The mean correction written out from the dense keep-mask, float64.

    keep: bool [B, Hq, Nq, Nk] (the backend's keep-mask, expanded to every head). For row i at
    position p = q_offset + i, mean block j = keys [j*M, min((j+1)*M, Nk)) is corrected iff its last key
    is <= p and keep holds for none of its keys; it adds len_j * exp(scale q.mean(k_j)) (times mean(v_j))
    to the row's softmax sums. Returns (out, lse, corrected_rows bool [B, Hq, Nq]) with the correction
    merged into (sparse_out, sparse_lse); rows with no corrected block are the sparse rows.
    """
    Nk = k.shape[2]
    G = q.shape[1] // k.shape[1]
    nb = -(-Nk // M)
    kr = k.double().repeat_interleave(G, dim=1)
    vr = v.double().repeat_interleave(G, dim=1)
    lens = (torch.clamp((torch.arange(nb) + 1) * M, max=Nk) - torch.arange(nb) * M).double()  # len_j
    pad = (0, 0, 0, nb * M - Nk)  # zero keys / values past Nk: they add nothing to the sums below
    kbar = torch.nn.functional.pad(kr, pad).unflatten(2, (nb, M)).sum(dim=3) / lens[:, None]  # [B, Hq, nb, D]
    vbar = torch.nn.functional.pad(vr, pad).unflatten(2, (nb, M)).sum(dim=3) / lens[:, None]
    corrected = corrected_blocks64(keep, M, q_offset)  # [B, Hq, Nq, nb]
    logw = torch.einsum("bhqd,bhjd->bhqj", q.double(), kbar) * scale + torch.log(lens)
    logw = logw.masked_fill(~corrected, float("-inf"))
    lse_c = torch.logsumexp(logw, dim=-1)
    has = corrected.any(dim=-1)
    w = torch.exp(logw - torch.where(has, lse_c, torch.zeros_like(lse_c))[..., None])
    out_c = w @ vbar
    lse_s = sparse_lse.double()
    lse = torch.where(has, torch.logaddexp(lse_s, lse_c), lse_s)
    safe = torch.where(torch.isfinite(lse), lse, torch.zeros_like(lse))
    out = torch.exp(lse_s - safe)[..., None] * sparse_out.double() + torch.exp(lse_c - safe)[..., None] * out_c
    out = torch.where(has[..., None], out, sparse_out.double())
    return out, lse, has


def tailonly_rows(nq, gamma, tail):
    """Rows tailonly(gamma, tail) (and meancorr) computes densely: row 0 when the body is non-empty, then the
    tail (the last nq % gamma + max(128, gamma) rows, or ``tail``)."""
    n_body, _, tail_rows = paper_rows(nq, gamma, tail)
    return n_body, ([0] if n_body > 0 else []) + tail_rows
