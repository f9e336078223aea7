"""FlashInfer (https://github.com/flashinfer-ai/flashinfer) adapters: dense, streaming and
key-dense rows on Hopper through the FA3 kernels, lse converted to natural log.

* dense: ``single_prefill`` fa3, causal (bottom-right aligned);
* streaming (sink + window): rows whose window reaches the sinks are dense causal; the other
  rows run fa3 with ``window_left = window - 1`` over a key slice, and their sink part
  (non-causal over ``[0, sink)``, in row chunks) is merged in place with ``merge_state_in_place``;
* rows (Δ anchors + tail): consecutive rows are grouped into requests of up to 128 rows
  (FA3's query tile); each request attends keys ``[0, p0]`` of its first row non-causally
  through ``BatchPrefillWithPagedKVCacheWrapper`` whose page tables all point into the one
  K/V tensor (no copy, no head expansion); the small remainder ``(p0, pos[r]]`` runs in the
  Triton kernel and is merged through the lse. Plans are cached per row set.

Layouts: the public tensors are (B, H, N, D); FlashInfer reads them as strided NHD/HND views,
and outputs are written in NHD buffers returned as (B, H, N, D) views (no transpose copy).
"""

from __future__ import annotations

import math
from collections import OrderedDict
from typing import Optional

import torch

from ..contract import AttentionResult, merge

__all__ = ["available", "ready", "dense", "streaming", "rows", "ROWS_PER_REQUEST"]

LN2 = math.log(2.0)
ROWS_PER_REQUEST = 128
_SINK_CHUNK = 1 << 16  # rows per sink-merge chunk (bounds the temporary)


def _fi():
    try:
        import flashinfer
    except ImportError as exc:
        raise ImportError("the FlashInfer path needs flashinfer: pip install sparsekit[flashinfer]") from exc
    return flashinfer


def available() -> bool:
    try:
        _fi()
        return True
    except Exception:
        return False


_READY: dict = {}


def ready(kind: str, dtype: torch.dtype, head_dim: int, swa: bool = False) -> bool:
    """Whether FlashInfer's fa3 module for ``kind`` ("single" or "batch") is built for this
    dtype and head_dim (ahead of time or in the JIT cache), so that using it compiles nothing."""
    key = (kind, dtype, head_dim, swa)
    if key in _READY:
        return _READY[key]
    ok = False
    try:
        from flashinfer.jit.attention.modules import gen_batch_prefill_module, gen_single_prefill_module

        if kind == "single":
            spec = gen_single_prefill_module("fa3", dtype, dtype, dtype, head_dim, head_dim, 0, swa, False, False)
        else:
            spec = gen_batch_prefill_module("fa3", dtype, dtype, dtype, torch.int32, head_dim, head_dim, 0, False, False, False)
        ok = bool(spec.is_aot or spec.is_compiled)
    except Exception:
        ok = False
    _READY[key] = ok
    return ok


# ---------------------------------------------------------------- single prefill (fa3)
_TMP: dict = {}


def _single(q, k, v, o, lse, *, scale, causal, window_left=-1):
    """fa3 single prefill writing into ``o`` [n, H, D] and ``lse`` [n, H] (base 2).

    q [n, Hq, D], k/v [m, Hkv, D]: strided NHD views of the (B, H, N, D) tensors. (fa3's
    single prefill with ``kv_layout="HND"`` died with SIGFPE on the H200 in FlashInfer 0.7.4,
    so K/V are passed as NHD views with the head stride N*D.)
    """
    fi = _fi()
    from flashinfer.prefill import get_single_prefill_module

    dt = q.dtype
    D = q.shape[-1]
    try:
        module = get_single_prefill_module("fa3", dt, dt, dt, D, D, 0, window_left >= 0, False, False, False)
        tmp = _TMP.get(q.device)
        if tmp is None:
            tmp = _TMP[q.device] = torch.empty(32 * 1024 * 1024, dtype=torch.uint8, device=q.device)
        module.run(q, k, v, tmp, o, lse, 1 if causal else 0, 0, window_left, None, None, 0.0, float(scale),
                   None, None, None, 1.0, 1e4)
    except TypeError:  # a different internal signature: the public call plus a copy
        o2, l2 = fi.single_prefill_with_kv_cache(
            q, k, v, causal=causal, kv_layout="NHD", sm_scale=float(scale), window_left=window_left,
            backend="fa3", return_lse=True,
        )
        o.copy_(o2)
        lse.copy_(l2)


def _buffers(q):
    B, Hq, Nq, D = q.shape
    o = torch.empty(B, Nq, Hq, D, dtype=q.dtype, device=q.device)
    l2 = torch.empty(B, Nq, Hq, dtype=torch.float32, device=q.device)
    return o, l2


def _result(o, l2) -> AttentionResult:
    # o [B, N, H, D] -> (B, H, N, D) view; lse base 2 [B, N, H] -> natural log (B, H, N) contiguous
    return AttentionResult(o.transpose(1, 2), (l2 * LN2).transpose(1, 2).contiguous())


def dense(q, k, v, *, scale: float, q_offset: int) -> AttentionResult:
    """Dense causal attention, q (B, Hq, Nq, D), k/v (B, Hkv, Nk, D)."""
    B, Hq, Nq, D = q.shape
    hi = q_offset + Nq
    o, l2 = _buffers(q)
    for b in range(B):
        _single(q[b].transpose(0, 1), k[b, :, :hi].transpose(0, 1), v[b, :, :hi].transpose(0, 1), o[b], l2[b], scale=scale, causal=True)
    return _result(o, l2)


def streaming(q, k, v, *, scale: float, q_offset: int, window: int, sink: int) -> AttentionResult:
    """Sink + window attention (``backends/streaming.py`` semantics) through fa3."""
    fi = _fi()
    B, Hq, Nq, D = q.shape
    hi = q_offset + Nq
    n_a = max(0, min(Nq, sink + window - q_offset))  # rows whose window reaches the sinks: dense
    o, l2 = _buffers(q)
    for b in range(B):
        qb = q[b].transpose(0, 1)  # [Nq, Hq, D]
        kb, vb = k[b].transpose(0, 1), v[b].transpose(0, 1)  # [Nk, Hkv, D]
        if n_a:
            _single(qb[:n_a], kb[: q_offset + n_a], vb[: q_offset + n_a], o[b, :n_a], l2[b, :n_a],
                    scale=scale, causal=True)
        if n_a == Nq:
            continue
        k0 = q_offset + n_a - window + 1
        _single(qb[n_a:], kb[k0:hi], vb[k0:hi], o[b, n_a:], l2[b, n_a:],
                scale=scale, causal=True, window_left=window - 1)
        if sink == 0:
            continue
        ks, vs = kb[:sink], vb[:sink]
        for c0 in range(n_a, Nq, _SINK_CHUNK):
            c1 = min(Nq, c0 + _SINK_CHUNK)
            os_ = torch.empty(c1 - c0, Hq, D, dtype=q.dtype, device=q.device)
            ls_ = torch.empty(c1 - c0, Hq, dtype=torch.float32, device=q.device)
            _single(qb[c0:c1], ks, vs, os_, ls_, scale=scale, causal=False)
            fi.merge_state_in_place(o[b, c0:c1], l2[b, c0:c1], os_, ls_)
    return _result(o, l2)


# ---------------------------------------------------------------- rows (paged batch prefill)
_PLANS: "OrderedDict[tuple, tuple]" = OrderedDict()
_WORKSPACE: dict = {}


def _page_size(nk: int) -> int:
    for p in (64, 32, 16, 8, 4, 2, 1):
        if nk % p == 0:
            return p
    return 1


def rows_plan(positions: torch.Tensor, *, B: int, Hq: int, Hkv: int, D: int, Nk: int, dtype, device, scale: float):
    """Build (or fetch from the cache) the paged fa3 plan for these row positions."""
    fi = _fi()
    pos_cpu = positions.detach().to("cpu", torch.int64)
    P = _page_size(Nk)
    key = (pos_cpu.numpy().tobytes(), B, Hq, Hkv, D, Nk, dtype, str(device), float(scale), P)
    hit = _PLANS.get(key)
    if hit is not None:
        _PLANS.move_to_end(key)
        return hit
    starts, q_len, p0 = request_split(pos_cpu, ROWS_PER_REQUEST)
    n_req = starts.numel()
    kv_len = p0 + 1
    npages = (kv_len + P - 1) // P
    last = kv_len - (npages - 1) * P
    pages_per_batch = Hkv * Nk // P
    qo_indptr = torch.zeros(B * n_req + 1, dtype=torch.int64)
    qo_indptr[1:] = torch.cumsum(q_len.repeat(B), 0)
    np_all = npages.repeat(B)
    kv_indptr = torch.zeros(B * n_req + 1, dtype=torch.int64)
    kv_indptr[1:] = torch.cumsum(np_all, 0)
    total = int(kv_indptr[-1])
    dev = torch.device(device)
    np_dev = np_all.to(dev)
    base = (torch.arange(B).repeat_interleave(n_req) * pages_per_batch).to(dev)
    req_of_page = torch.repeat_interleave(torch.arange(B * n_req, device=dev), np_dev, output_size=total)
    first_slot = kv_indptr[:-1].to(dev)
    indices = (torch.arange(total, device=dev) - first_slot[req_of_page] + base[req_of_page]).to(torch.int32)
    ws = _WORKSPACE.get(dev)
    if ws is None:
        ws = _WORKSPACE[dev] = torch.empty(256 * 1024 * 1024, dtype=torch.uint8, device=dev)
    wrapper = fi.BatchPrefillWithPagedKVCacheWrapper(ws, kv_layout="HND", backend="fa3")
    wrapper.plan(
        qo_indptr.to(torch.int32).to(dev), kv_indptr.to(torch.int32).to(dev), indices,
        last.repeat(B).to(torch.int32).to(dev), Hq, Hkv, D, P,
        causal=False, sm_scale=float(scale), q_data_type=dtype, kv_data_type=dtype,
    )
    lo = torch.repeat_interleave(p0 + 1, q_len).to(dev)  # triangle: keys (p0, pos]
    plan = (wrapper, P, indices, lo)
    _PLANS[key] = plan
    while len(_PLANS) > 4:
        _PLANS.popitem(last=False)
    return plan


def request_split(pos: torch.Tensor, G: int):
    """Cut R rows into requests of up to G consecutive rows: (starts, lengths, p0) int64 [n_req],
    ``p0`` = the smallest position in each request (every row of it sees keys ``[0, p0]``,
    whatever the row order)."""
    R = pos.numel()
    starts = torch.arange(0, R, G)
    q_len = torch.clamp(R - starts, max=G)
    pad = torch.full((starts.numel() * G,), torch.iinfo(torch.int64).max, dtype=torch.int64)
    pad[:R] = pos
    p0 = pad.view(-1, G).min(dim=1).values
    return starts, q_len, p0


def _pages(t: torch.Tensor, P: int) -> torch.Tensor:
    """(B, Hkv, Nk, D) contiguous -> pages (n_pages, Hkv, P, D) over the same storage."""
    B, Hkv, Nk, D = t.shape
    n_pages = ((B - 1) * Hkv * Nk + Nk) // P
    return torch.as_strided(t, (n_pages, Hkv, P, D), (P * D, Nk * D, D, 1), t.storage_offset())


def rows(q_rows, k, v, *, positions: torch.Tensor, scale: float, plan=None) -> AttentionResult:
    """Key-dense rows: q_rows (B, Hq, R, D), row r over keys ``0..positions[r]``; k/v contiguous."""
    from .triton_attention import interval_attention

    B, Hq, R, D = q_rows.shape
    Hkv, Nk = k.shape[1], k.shape[2]
    if plan is None:
        plan = rows_plan(positions, B=B, Hq=Hq, Hkv=Hkv, D=D, Nk=Nk, dtype=q_rows.dtype,
                         device=q_rows.device, scale=scale)
    wrapper, P, _, lo = plan
    q_nhd = q_rows.transpose(1, 2).reshape(B * R, Hq, D)
    o_main, l_main = wrapper.run(q_nhd, (_pages(k, P), _pages(v, P)), return_lse=True)
    main = AttentionResult(
        o_main.view(B, R, Hq, D).transpose(1, 2),
        (l_main.view(B, R, Hq) * LN2).transpose(1, 2),
    )
    o_t, l_t = interval_attention(q_rows, k, v, scale=scale, positions=positions, lo=lo)
    return merge(main, AttentionResult(o_t, l_t))
