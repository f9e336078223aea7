"""Vertical-slash execution through FlashInfer's FA3 paged prefill (Hopper).

A :class:`~sparsekit.backends.vertical_slash.VSPlan` becomes two batched paged-prefill calls over
the *unmodified* (B, H, N, D) tensors, then one lse merge:

1. **slash pages**: one request per (batch, query head, row block); its pages are the key pages
   (``block_k`` keys each) crossed by the kept diagonals, ascending, so the page holding the
   block's last row comes last. ``causal=True`` aligns bottom-right inside each request, and
   ``last_page_len = p_last % block_k + 1`` trims the diagonal page, which makes the causal
   limit exact for any ``q_offset`` (a partial first block just has fewer rows).
2. **vertical columns**: the same requests over pages of ONE key each: the kept columns not
   inside the block's slash pages. They all precede the block's first row, so ``causal=False``.
   A request with no column gets one dummy key and its lse is set to ``-inf`` (weight 0).
3. ``flashinfer.merge_state`` (base-2 lse, as FlashInfer returns it), then lse x ln 2.

Per-head patterns without a loop over heads: FlashInfer is called with one query head and one
KV head; the (batch, head) axis is folded into the rows (q is viewed as ``[B*Hq*Nq, 1, D]``) and
into the page index (K as ``[B*Hkv*Nk/block_k, block_k, 1, D]``), so each request points at its
own head's keys. GQA needs no copy: a query head's requests use page indices of its KV head.

The FlashInfer host plan (3 arrays copied to the host and scheduled there) is built once per
:class:`VSPlan` and kept on it; run() may be called on several layers that share the plan.
"""

from __future__ import annotations

import time

import torch

from ..contract import AttentionResult, lse_from_base2

__all__ = ["available", "build_indices", "prepare", "run"]

_FLOAT_WS: dict = {}
_FLOAT_WS_BYTES = 256 * 1024 * 1024


def _fi():
    try:
        import flashinfer
    except ImportError as exc:
        raise ImportError(
            "vertical_slash on GPU runs through FlashInfer, which is not installed: "
            "pip install sparsekit[flashinfer] (or use impl='flex' / impl='torch')"
        ) from exc
    return flashinfer


def available() -> bool:
    try:
        _fi()
        return True
    except ImportError:
        return False


def _wrapper(fi, device, n_requests: int):
    ws = _FLOAT_WS.get(device)
    if ws is None:
        ws = _FLOAT_WS[device] = torch.empty(_FLOAT_WS_BYTES, dtype=torch.uint8, device=device)
    w = fi.BatchPrefillWithPagedKVCacheWrapper(ws, kv_layout="NHD", backend="fa3")
    # the host scheduler writes a few int32 per work tile: size the int workspace to the batch
    int_bytes = max(16 << 20, n_requests * 256 + (8 << 20))
    w.reset_workspace_buffer(ws, torch.empty(int_bytes, dtype=torch.uint8, device=device))
    return w


def _head_kv(plan) -> torch.Tensor:
    """(BH,) index of the (batch, kv head) each (batch, query head) reads."""
    bh = torch.arange(plan.B * plan.Hq, device=plan.device)
    G = plan.Hq // plan.Hkv
    return (bh // plan.Hq) * plan.Hkv + (bh % plan.Hq) // G


def build_indices(plan) -> dict:
    """The FlashInfer request arrays for ``plan`` (pure torch, any device; tested on CPU).

    Requests are (batch, query head, row block) in that order; q rows of request r are
    ``qo_indptr[r]:qo_indptr[r+1]`` of q viewed as ``[B*Hq*Nq, 1, D]``.

    Returns a dict of int32 tensors: ``qo_indptr``; slash ``s_indptr``, ``s_indices`` (pages of
    ``block_k`` keys in K viewed as ``[B*Hkv*pages_per_head, block_k, 1, D]``), ``s_last``
    (last page length); vertical ``v_indptr``, ``v_indices`` (single keys in K viewed as
    ``[B*Hkv*Nk, 1, 1, D]``, None when no request has a column) and ``empty_rows`` (bool over
    q rows whose request has no column, or None), plus ``pages_per_head``.
    """
    dev = plan.device
    BH, NB, Nq, bk = plan.B * plan.Hq, plan.n_blocks, plan.Nq, plan.block_k
    p_first, p_last, _ = plan.block_rows()
    rows = (p_last - p_first + 1).to(torch.int64)
    row0 = p_first - plan.q_offset
    qo_start = (torch.arange(BH, device=dev)[:, None] * Nq + row0[None, :]).reshape(-1)
    qo_indptr = torch.cat([qo_start, torch.tensor([BH * Nq], device=dev)])
    kvh = _head_kv(plan)
    n_req = BH * NB
    zero = torch.zeros(1, dtype=torch.int64, device=dev)

    # 1. slash pages
    n_pages_head = -(-plan.Nk // bk)
    cnt, pages = plan.slash_pages()
    flat_cnt = cnt.reshape(-1)
    req = torch.repeat_interleave(torch.arange(n_req, device=dev), flat_cnt, output_size=pages.numel())
    s_indices = kvh[req // NB] * n_pages_head + pages
    s_indptr = torch.cat([zero, flat_cnt.cumsum(0)])
    s_last = (p_last % bk + 1).repeat(BH)

    # 2. vertical columns, a dummy key (key 0 of the head) where a request has none
    vcnt, vcols = plan.vertical_columns()
    vflat = vcnt.reshape(-1)
    v_indptr = v_indices = empty_rows = None
    if vcols.numel() > 0:
        empty = vflat == 0
        e64 = empty.to(torch.int64)
        vreq = torch.repeat_interleave(torch.arange(n_req, device=dev), vflat, output_size=vcols.numel())
        v_indptr = torch.cat([zero, (vflat + e64).cumsum(0)])
        v_indices = torch.empty(int(v_indptr[-1]), dtype=torch.int64, device=dev)
        shift = torch.cumsum(e64, 0) - e64  # dummy slots of earlier requests
        v_indices[torch.arange(vcols.numel(), device=dev) + shift[vreq]] = kvh[vreq // NB] * plan.Nk + vcols
        er = empty.nonzero().squeeze(1)
        v_indices[v_indptr[er]] = kvh[er // NB] * plan.Nk
        if bool(empty.any()):
            empty_rows = torch.repeat_interleave(empty, rows.repeat(BH), output_size=BH * Nq)
    i32 = lambda t: None if t is None else t.to(torch.int32)
    return {
        "qo_indptr": i32(qo_indptr), "s_indptr": i32(s_indptr), "s_indices": i32(s_indices),
        "s_last": i32(s_last), "v_indptr": i32(v_indptr), "v_indices": i32(v_indices),
        "empty_rows": empty_rows, "pages_per_head": n_pages_head, "n_requests": n_req,
    }


def prepare(plan, *, dtype: torch.dtype, timings: bool = False) -> None:
    """Build the index arrays and the two FlashInfer plans; stores them in ``plan.cache``.

    With ``timings=True`` the device is synchronised and ``plan.timings`` gets ``index_ms``
    (building the request arrays on the GPU) and ``fi_plan_ms`` (FlashInfer's host-side plans).
    """
    if "flashinfer" in plan.cache:
        return
    fi = _fi()
    dev = plan.device
    t0 = time.perf_counter()
    ix = build_indices(plan)
    if timings:
        torch.cuda.synchronize(dev)
        plan.timings["index_ms"] = (time.perf_counter() - t0) * 1e3
    t1 = time.perf_counter()
    n_req = ix["n_requests"]
    ws = _wrapper(fi, dev, n_req)
    ws.plan(
        ix["qo_indptr"], ix["s_indptr"], ix["s_indices"], ix["s_last"], 1, 1, plan.D, plan.block_k,
        causal=True, sm_scale=plan.scale, q_data_type=dtype, kv_data_type=dtype,
    )
    wv = None
    if ix["v_indices"] is not None:
        wv = _wrapper(fi, dev, n_req)
        wv.plan(
            ix["qo_indptr"], ix["v_indptr"], ix["v_indices"], torch.ones(n_req, dtype=torch.int32, device=dev),
            1, 1, plan.D, 1, causal=False, sm_scale=plan.scale, q_data_type=dtype, kv_data_type=dtype,
        )
    if timings:
        torch.cuda.synchronize(dev)
        plan.timings["fi_plan_ms"] = (time.perf_counter() - t1) * 1e3
    plan.cache["flashinfer"] = {
        "slash": ws, "vertical": wv, "empty_rows": ix["empty_rows"], "pages_per_head": ix["pages_per_head"],
    }


def _paged(t: torch.Tensor, page: int, n_pages_head: int) -> torch.Tensor:
    """(B, Hkv, Nk, D) -> (B*Hkv*n_pages_head, page, 1, D), padding Nk to whole pages (a copy)."""
    B, H, N, D = t.shape
    t = t.contiguous()
    if N != n_pages_head * page:
        pad = t.new_zeros(B, H, n_pages_head * page, D)
        pad[:, :, :N] = t
        t = pad
    return t.view(B * H * n_pages_head, page, 1, D)


def run(plan, q, k, v) -> AttentionResult:
    """q (B, Hq, Nq, D), k/v (B, Hkv, Nk, D) on CUDA, fp16/bf16 -> AttentionResult (B, Hq, Nq, ·)."""
    fi = _fi()
    if "flashinfer" not in plan.cache:
        prepare(plan, dtype=q.dtype)
    c = plan.cache["flashinfer"]
    B, Hq, Nq, D = q.shape
    qf = q.contiguous().view(B * Hq * Nq, 1, D)
    npg = c["pages_per_head"]
    o, l2 = c["slash"].run(qf, (_paged(k, plan.block_k, npg), _paged(v, plan.block_k, npg)), return_lse=True)
    if c["vertical"] is not None:
        kt = k.contiguous().view(-1, 1, 1, D)
        vt = v.contiguous().view(-1, 1, 1, D)
        ov, lv = c["vertical"].run(qf, (kt, vt), return_lse=True)
        if c["empty_rows"] is not None:
            lv = lv.masked_fill(c["empty_rows"][:, None], float("-inf"))
        o, l2 = fi.merge_state(o, l2, ov, lv)
    return AttentionResult(o.view(B, Hq, Nq, D), lse_from_base2(l2.view(B, Hq, Nq)))
