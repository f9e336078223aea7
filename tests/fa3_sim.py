"""A float64 torch model of FlashInfer's paged batch prefill, to check ``fa3_paged``'s request
arrays on the CPU: each request's KV sequence is its pages concatenated (the last one trimmed to
``last_page_len``); ``causal=True`` aligns bottom-right (row i of an L-row request over K keys sees
KV index <= K - L + i); a KV head serves the ``heads`` query heads packed in each row."""

from __future__ import annotations

import torch


def paged_prefill(q, k_pages, v_pages, qo_indptr, kv_indptr, kv_indices, last_page_len, *, causal, scale):
    """q [rows, heads, D]; k/v_pages [n_pages, page, 1, D] -> (out [rows, heads, D], lse base 2 [rows, heads])."""
    rows, heads, D = q.shape
    out = torch.zeros(rows, heads, D, dtype=torch.float64)
    lse = torch.full((rows, heads), float("-inf"), dtype=torch.float64)
    for r in range(qo_indptr.numel() - 1):
        q0, q1 = int(qo_indptr[r]), int(qo_indptr[r + 1])
        pages = kv_indices[int(kv_indptr[r]):int(kv_indptr[r + 1])].long()
        if q1 == q0 or pages.numel() == 0:
            continue
        ks = k_pages[pages].double().reshape(-1, D)
        vs = v_pages[pages].double().reshape(-1, D)
        page = k_pages.shape[1]
        K = (pages.numel() - 1) * page + int(last_page_len[r])
        ks, vs = ks[:K], vs[:K]
        s = torch.einsum("lhd,kd->lhk", q[q0:q1].double(), ks) * scale
        if causal:
            L = q1 - q0
            allowed = torch.arange(K)[None, :] <= (K - L + torch.arange(L))[:, None]
            s = s.masked_fill(~allowed[:, None, :], float("-inf"))
        m = s.amax(-1, keepdim=True).nan_to_num(neginf=0.0)
        w = torch.exp(s - m)
        z = w.sum(-1, keepdim=True)
        out[q0:q1] = (w / z.clamp_min(1e-300)) @ vs
        lse[q0:q1] = ((m + torch.log(z)).squeeze(-1)) / torch.log(torch.tensor(2.0, dtype=torch.float64))
    return out, lse


def run_paged(pattern, q, k, v, scale):
    """What ``PagedFA3.run`` computes, with FlashInfer replaced by :func:`paged_prefill` (float64)."""
    from sparsekit.kernels.fa3 import _paged_kv, paged_requests

    ix = paged_requests(pattern)
    B, Hq, nq, D = q.shape
    Hkv = k.shape[1]
    h = 1 if ix["mode"] == "head" else Hq // Hkv
    if ix["mode"] == "head":
        qf = q.double().reshape(B * Hq * nq, 1, D)
    else:
        qf = q.double().reshape(B, Hkv, h, nq, D).transpose(2, 3).reshape(B * Hkv * nq, h, D)
    npg = ix["pages_per_head"]
    o, l2 = paged_prefill(qf, _paged_kv(k.double(), pattern.block_k, npg), _paged_kv(v.double(), pattern.block_k, npg),
                          ix["qo_indptr"], ix["kv_indptr"], ix["kv_indices"], ix["last_page_len"], causal=True, scale=scale)
    if ix["c_indices"] is not None:
        kt = k.double().reshape(-1, 1, 1, D)
        vt = v.double().reshape(-1, 1, 1, D)
        ones = torch.ones(ix["n_requests"], dtype=torch.int32)
        oc, lc = paged_prefill(qf, kt, vt, ix["qo_indptr"], ix["c_indptr"], ix["c_indices"], ones, causal=False, scale=scale)
        if ix["empty_rows"] is not None:
            lc = lc.masked_fill(ix["empty_rows"][:, None], float("-inf"))
        lse = torch.logaddexp2(l2, lc)
        fin = torch.isfinite(lse)
        safe = torch.where(fin, lse, torch.zeros_like(lse))
        wa = torch.where(fin, torch.exp2(l2 - safe), torch.zeros_like(lse))[..., None]
        wb = torch.where(fin, torch.exp2(lc - safe), torch.zeros_like(lse))[..., None]
        o, l2 = wa * o + wb * oc, lse
    ln2 = torch.log(torch.tensor(2.0, dtype=torch.float64))
    if ix["mode"] == "head":
        return o.view(B, Hq, nq, D), l2.view(B, Hq, nq) * ln2
    return (o.view(B, Hkv, nq, h, D).transpose(2, 3).reshape(B, Hq, nq, D),
            l2.view(B, Hkv, nq, h).transpose(2, 3).reshape(B, Hq, nq) * ln2)
