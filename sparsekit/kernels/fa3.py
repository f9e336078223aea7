"""FlashInfer (https://github.com/flashinfer-ai/flashinfer) fa3 on Hopper: three executor implementations.

Every lse FlashInfer returns is base 2; it is converted to natural log here and only here.

* ``fa3_band`` (:class:`BandFA3`), band patterns over contiguous rows: dense causal through
  ``single_prefill`` fa3; sink + window as rows whose window reaches the sinks (dense causal) plus
  fa3 with ``window_left = window - 1`` over a key slice, whose sink part (non-causal over
  ``[0, sink)``, in row chunks) is merged in place with ``merge_state_in_place``
  (``streaming(..., fused=True)`` gives each chunk of rows its sinks and window in one call over
  gathered keys instead, :func:`sink_window_keys`: exact, and slower on the H200);
* ``fa3_rows`` (:class:`RowsFA3`), gathered rows each over its whole causal prefix (a corrector's
  anchors and tail): the query heads of each KV head are packed into the rows (a 128-row FA3 tile
  holds ``128 / group`` gathered rows with all their heads), consecutive rows form one request,
  and each request attends keys ``[0, p0]`` (its smallest position) non-causally in one
  ``BatchPrefillWithRaggedKVCacheWrapper`` launch planned with a key range per request, reading
  K/V in place through TMA (no copy, no head expansion); the small remainder ``(p0, pos[r]]`` runs
  in the Triton band kernel on a second stream meanwhile and is merged through the lse. Plans are
  cached per row set;
* ``fa3_paged`` (:class:`PagedFA3`), block patterns (any backend's block lists and columns, no band
  rule inside blocks): one paged-prefill request per (unit, query block) whose pages are the listed
  key blocks, ascending, the diagonal page last: ``causal=True`` aligns bottom-right inside the
  request and ``last_page_len`` trims the diagonal page, which makes causality exact. Columns run as
  a second request set over pages of one key (all before the block's first row, non-causal), merged
  through the lse. A unit is one query head (patterns per query head; heads folded into the rows,
  no copy) or one KV head with its query heads packed (patterns shared by a KV group or by all
  heads: FlashInfer packs the group into its query tile).

Layouts: the public tensors are (B, H, N, D); FlashInfer reads them as strided NHD/HND views.
"""

from __future__ import annotations

import math
from collections import OrderedDict
from typing import Optional

import torch

from typing import ClassVar

from ..contract import AttentionResult
from ..executor import Implementation, Refused, has_module
from ..pattern import _ranges

__all__ = ["available", "ready", "dense", "streaming", "sink_window_keys", "sink_window_chunks", "rows", "rows_per_request", "ragged_requests", "BandFA3", "RowsFA3", "PagedFA3",
           "paged_requests"]

LN2 = math.log(2.0)
# rows per sink-merge chunk: Nq / 16 within these bounds, so the temporary stays near 2.5% of dense
# attention's own memory (q, k, v, out): 64K rows made streaming + delta 10.3% heavier than fa3 at 512K
_SINK_CHUNK = (1 << 13, 1 << 16)


def _fi():
    try:
        import flashinfer
    except ImportError as exc:
        raise ImportError('the FlashInfer path needs flashinfer: pip install "sparsekit-prefill[flashinfer]"') from exc
    return flashinfer


def available() -> bool:
    """flashinfer is installed (found without importing it)."""
    return has_module("flashinfer")


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


def _buffers(q, out=None):
    """NHD output buffer (the caller's when it is an NHD view) and a base-2 lse buffer."""
    B, Hq, Nq, D = q.shape
    o = None
    if out is not None and out[0].transpose(1, 2).is_contiguous():
        o = out[0].transpose(1, 2)
    if o is None:
        o = torch.empty(B, Nq, Hq, D, dtype=q.dtype, device=q.device)
    l2 = torch.empty(B, Nq, Hq, dtype=torch.float32, device=q.device)
    return o, l2


def _result(o, l2, out=None) -> AttentionResult:
    # o [B, N, H, D] -> (B, H, N, D) view; lse base 2 [B, N, H] -> natural log (B, H, N)
    if out is not None:
        torch.mul(l2.transpose(1, 2), LN2, out=out[1])
        return AttentionResult(o.transpose(1, 2), out[1])
    return AttentionResult(o.transpose(1, 2), (l2 * LN2).transpose(1, 2).contiguous())


def dense(q, k, v, *, scale: float, q_offset: int, out=None) -> AttentionResult:
    """Dense causal attention, q (B, Hq, Nq, D), k/v (B, Hkv, Nk, D)."""
    B, Hq, Nq, D = q.shape
    hi = q_offset + Nq
    o, l2 = _buffers(q, out)
    for b in range(B):
        _single(q[b].transpose(0, 1), k[b, :, :hi].transpose(0, 1), v[b, :, :hi].transpose(0, 1), o[b], l2[b], scale=scale, causal=True)
    return _result(o, l2, out)


def sink_window_keys(s: int, rows: int, *, window: int, sink: int) -> torch.Tensor:
    """The keys (int64 indices into K) of one fa3 call that gives rows at positions ``s .. s+rows-1``
    their sinks and their windows, with ``causal=True`` and ``window_left = window + sink - 1``.

    The keys are ``K[s-window+1 : s-window+rows]`` (the ``rows - 1`` keys that leave the window row
    by row), then the ``sink`` sink keys, then ``K[s-window+rows : s+rows]``. fa3 aligns row i
    bottom-right, so it sees the ``window + sink`` consecutive entries ``[i, i + window + sink - 1]``:
    the sinks sit inside every row's span, and the rest is exactly ``K[s+i-window+1 .. s+i]``.
    Needs ``1 <= rows <= window + 1`` and ``s - window + 1 >= sink`` (no window reaches a sink).
    """
    if not 1 <= rows <= window + 1 or s - window + 1 < sink:
        raise ValueError(f"sink_window_keys: rows={rows}, s={s}, window={window}, sink={sink} out of range")
    return torch.cat([torch.arange(s - window + 1, s - window + rows), torch.arange(sink),
                      torch.arange(s - window + rows, s + rows)])


def sink_window_chunks(q_offset: int, r0: int, r1: int, *, window: int, sink: int, device=None):
    """Yield ``(c0, c1, keys)`` for rows ``r0 .. r1-1`` (positions ``q_offset + r``) in chunks of ``window``
    rows, ``keys`` = :func:`sink_window_keys` of the chunk on ``device`` (full chunks move one pattern)."""
    base = moves = None
    for c0 in range(r0, r1, window):
        c1 = min(r1, c0 + window)
        if c1 - c0 < window:
            yield c0, c1, sink_window_keys(q_offset + c0, c1 - c0, window=window, sink=sink).to(device)
            continue
        if base is None:
            base = sink_window_keys(q_offset + c0, window, window=window, sink=sink).to(device)
            moves = torch.ones_like(base)
            moves[window - 1: window - 1 + sink] = 0  # the sinks stay, the window entries move
            first = c0
        yield c0, c1, torch.add(base, moves, alpha=c0 - first)


def streaming(q, k, v, *, scale: float, q_offset: int, window: int, sink: int, out=None,
              fused: bool = False) -> AttentionResult:
    """Sink + window attention (``backends/streaming.py`` semantics) through fa3.

    Rows whose window reaches the sinks run dense causal. The others run fa3 with ``window_left``
    over a key slice (one launch), then their sink keys as a non-causal pass merged in place through
    the lse, in chunks of ``Nq / 16`` rows (8K to 64K).

    ``fused=True`` runs sinks and window together instead: chunks of ``window`` rows, each one fa3
    call over the gathered keys of :func:`sink_window_keys` (no sink temporary, no merge; the gather
    copies ``window + sink + rows`` keys per chunk). It is exact but slower on the H200 (window 2048,
    sink 1024: 15.0 vs 12.9 ms at 128K, 119.7 vs 112.5 ms at 1M; ``bench/probe_streaming.py``), so it
    is not the default.
    """
    fi = _fi()
    B, Hq, Nq, D = q.shape
    hi = q_offset + Nq
    n_a = max(0, min(Nq, sink + window - q_offset))  # rows whose window reaches the sinks: dense
    o, l2 = _buffers(q, out)
    fused = fused and sink > 0
    chunk = window if fused else min(max(Nq // 16, _SINK_CHUNK[0]), _SINK_CHUNK[1])
    for b in range(B):
        qb = q[b].transpose(0, 1)  # [Nq, Hq, D]
        kb, vb = k[b].transpose(0, 1), v[b].transpose(0, 1)  # [Nk, Hkv, D]
        if n_a:
            _single(qb[:n_a], kb[: q_offset + n_a], vb[: q_offset + n_a], o[b, :n_a], l2[b, :n_a],
                    scale=scale, causal=True)
        if n_a == Nq:
            continue
        if fused:
            for c0, c1, idx in sink_window_chunks(q_offset, n_a, Nq, window=window, sink=sink, device=q.device):
                _single(qb[c0:c1], kb.index_select(0, idx), vb.index_select(0, idx), o[b, c0:c1], l2[b, c0:c1],
                        scale=scale, causal=True, window_left=window + sink - 1)
            continue
        k0 = q_offset + n_a - window + 1
        _single(qb[n_a:], kb[k0:hi], vb[k0:hi], o[b, n_a:], l2[b, n_a:],
                scale=scale, causal=True, window_left=window - 1)
        if sink == 0:
            continue
        ks, vs = kb[:sink], vb[:sink]
        for c0 in range(n_a, Nq, chunk):
            c1 = min(Nq, c0 + chunk)
            os_ = torch.empty(c1 - c0, Hq, D, dtype=q.dtype, device=q.device)
            ls_ = torch.empty(c1 - c0, Hq, dtype=torch.float32, device=q.device)
            _single(qb[c0:c1], ks, vs, os_, ls_, scale=scale, causal=False)
            fi.merge_state_in_place(o[b, c0:c1], l2[b, c0:c1], os_, ls_)
    return _result(o, l2, out)


# ---------------------------------------------------------------- rows (ragged batch prefill)
_PLANS: "OrderedDict[tuple, dict]" = OrderedDict()
_WORKSPACE: dict = {}
_WORKSPACE_BYTES = 16 * 1024 * 1024  # fa3 batch prefill splits no kv: its float workspace stays unused
_SIDE: dict = {}
TILE_Q = 128  # FA3's query tile (head_dim 128)


def rows_per_request(group: int) -> int:
    """Gathered rows per request: with the ``group`` query heads of a KV head packed into the rows,
    one request fills one 128-row FA3 tile."""
    return max(1, TILE_Q // group)


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


def ragged_requests(positions: torch.Tensor, *, group: int) -> dict:
    """The request arrays of ``fa3_rows`` for gathered rows at ``positions`` (pure torch, CPU; tested there).

    Rows are packed with their KV group: packed row ``r * group + g`` is query head ``kv * group + g``
    of gathered row r, so the kernel runs ``B * Hkv`` heads with a group of one. Requests hold
    :func:`rows_per_request` consecutive gathered rows; request i attends keys ``[0, p0_i]``
    non-causally (``p0_i`` its smallest position). Returns int32 ``qo_indptr`` (packed rows),
    ``kv_start``, ``kv_len``; int64 ``p0`` per request and ``lo`` per gathered row (``p0 + 1``: the
    first key of the row's remainder ``(p0, pos]``, which the Triton kernel computes).
    """
    pos = positions.detach().to("cpu", torch.int64)
    G = rows_per_request(group)
    starts, q_len, p0 = request_split(pos, G)
    qo = torch.zeros(starts.numel() + 1, dtype=torch.int64)
    qo[1:] = torch.cumsum(q_len * group, 0)
    return dict(qo_indptr=qo.to(torch.int32), kv_start=torch.zeros(starts.numel(), dtype=torch.int32),
                kv_len=(p0 + 1).to(torch.int32), p0=p0, lo=torch.repeat_interleave(p0 + 1, q_len))


def _ragged_wrapper(fi, dev, ix, heads: int, D: int, dtype, scale: float):
    """A fa3 ragged batch-prefill wrapper planned for requests with their own key ranges.

    The public ``plan()`` reads each request's keys as consecutive slices of one tensor (``kv_indptr``);
    here every request starts at key 0, so the plan is made again through the module's ``plan`` with
    explicit starts and lengths (the SM90 scheduler takes them apart; the kernel reads only the plan).
    Raises :class:`Refused` when this FlashInfer build does not expose that call.
    """
    ws = _WORKSPACE.get(dev)
    if ws is None:
        ws = _WORKSPACE[dev] = torch.empty(_WORKSPACE_BYTES, dtype=torch.uint8, device=dev)
    w = fi.BatchPrefillWithRaggedKVCacheWrapper(ws, kv_layout="NHD", backend="fa3")
    qo = ix["qo_indptr"]
    fake = torch.zeros_like(qo)
    fake[1:] = torch.cumsum(ix["kv_len"], 0)
    try:
        w.plan(qo, fake, heads, heads, D, causal=False, sm_scale=float(scale), q_data_type=dtype, kv_data_type=dtype)
        w._plan_info = w._cached_module.plan(
            w._float_workspace_buffer, w._int_workspace_buffer, w._pin_memory_int_workspace_buffer,
            qo, ix["kv_start"], ix["kv_len"], int(qo[-1]), int(qo.numel() - 1), heads, heads, 1, False, D, D,
            False, -1,
        )
    except (AttributeError, TypeError, RuntimeError) as exc:
        raise Refused(f"this FlashInfer's ragged fa3 plan cannot take per-request key ranges ({exc})") from exc
    return w


def rows_plan(positions: torch.Tensor, *, B: int, Hq: int, Hkv: int, D: int, Nk: int, dtype, device, scale: float):
    """Build (or fetch from the cache) the ragged fa3 plan for gathered rows at these positions."""
    fi = _fi()
    pos_cpu = positions.detach().to("cpu", torch.int64)
    key = (pos_cpu.numpy().tobytes(), B, Hq, Hkv, D, Nk, dtype, str(device), float(scale))
    hit = _PLANS.get(key)
    if hit is not None:
        _PLANS.move_to_end(key)
        return hit
    group = Hq // Hkv
    ix = ragged_requests(pos_cpu, group=group)
    dev = torch.device(device)
    wrapper = _ragged_wrapper(fi, dev, ix, B * Hkv, D, dtype, scale)
    plan = dict(wrapper=wrapper, group=group,
                pos=pos_cpu.repeat_interleave(group).to(dev), lo=ix["lo"].repeat_interleave(group).to(dev),
                tri=bool((ix["lo"] <= pos_cpu).any()))
    _PLANS[key] = plan
    while len(_PLANS) > 4:
        _PLANS.popitem(last=False)
    return plan


def _side_stream(dev):
    s = _SIDE.get(dev)
    if s is None:
        s = _SIDE[dev] = torch.cuda.Stream(device=dev)
    return s


def rows(q_rows, k, v, *, positions: torch.Tensor, scale: float, plan=None) -> AttentionResult:
    """Key-dense rows: q_rows (B, Hq, R, D), row r over keys ``0..positions[r]``; k/v contiguous.

    One fa3 ragged launch computes each request's keys ``[0, p0]`` (non-causal, K/V read in place as
    ``[Nk, B*Hkv, D]``); the remainder ``(p0, pos]`` of each row (fewer than ``rows_per_request`` x
    the rows' spacing keys) runs in the Triton band kernel on a second stream at the same time; the
    two are merged in place through the lse.
    """
    from .triton_band import interval_attention

    fi = _fi()
    B, Hq, R, D = q_rows.shape
    Hkv, Nk = k.shape[1], k.shape[2]
    if plan is None:
        plan = rows_plan(positions, B=B, Hq=Hq, Hkv=Hkv, D=D, Nk=Nk, dtype=q_rows.dtype,
                         device=q_rows.device, scale=scale)
    G, H = plan["group"], B * Hkv
    # packed rows: [R * G, B * Hkv, D], row r*G + g = query head kv*G + g of gathered row r
    qp = q_rows.reshape(B, Hkv, G, R, D).permute(3, 2, 0, 1, 4).reshape(R * G, H, D)
    k_nhd = k.reshape(H, Nk, D).transpose(0, 1)
    v_nhd = v.reshape(H, Nk, D).transpose(0, 1)
    o = torch.empty(R * G, H, D, dtype=q_rows.dtype, device=q_rows.device)
    l2 = torch.empty(R * G, H, dtype=torch.float32, device=q_rows.device)
    main_stream = torch.cuda.current_stream(q_rows.device)
    side = None
    if plan["tri"]:
        o_t = torch.empty_like(o)
        l_t = torch.empty(H, R * G, dtype=torch.float32, device=q_rows.device)
        side = _side_stream(q_rows.device)
        side.wait_stream(main_stream)
    # the persistent fa3 launch first: the remainders then fill its tail on the second stream
    plan["wrapper"].run(qp, k_nhd, v_nhd, out=o, lse=l2, return_lse=True)
    if side is not None:
        with torch.cuda.stream(side):
            interval_attention(qp.permute(1, 0, 2).unsqueeze(0), k_nhd.permute(1, 0, 2).unsqueeze(0),
                               v_nhd.permute(1, 0, 2).unsqueeze(0), scale=scale, positions=plan["pos"],
                               lo=plan["lo"], out=o_t.permute(1, 0, 2).unsqueeze(0), lse=l_t.unsqueeze(0))
        main_stream.wait_stream(side)
        fi.merge_state_in_place(o, l2, o_t, (l_t.t() * (1.0 / LN2)).contiguous())
        del o_t, l_t  # before the unpacking copy: the step's peak memory is a few row-sized buffers
    del qp
    out = o.view(R, G, B, Hkv, D).permute(2, 3, 1, 0, 4).reshape(B, Hq, R, D)
    lse = (l2.view(R, G, B, Hkv).permute(2, 3, 1, 0) * LN2).reshape(B, Hq, R)
    return AttentionResult(out, lse)


# ---------------------------------------------------------------- paged block patterns
_FLOAT_WS: dict = {}
_FLOAT_WS_BYTES = 256 * 1024 * 1024


def _paged_wrapper(fi, device, n_requests: int):
    ws = _FLOAT_WS.get(device)
    if ws is None:
        ws = _FLOAT_WS[device] = torch.empty(_FLOAT_WS_BYTES, dtype=torch.uint8, device=device)
    w = fi.BatchPrefillWithPagedKVCacheWrapper(ws, kv_layout="NHD", backend="fa3")
    # the host scheduler writes a few int32 per work tile: size the int workspace to the batch
    int_bytes = max(16 << 20, n_requests * 256 + (8 << 20))
    w.reset_workspace_buffer(ws, torch.empty(int_bytes, dtype=torch.uint8, device=device))
    return w


def paged_requests(pattern) -> dict:
    """The request arrays of ``fa3_paged`` for ``pattern`` (pure torch, any device; tested on CPU).

    Units: one per (batch, query head) when the pattern is per query head (``mode="head"``, q viewed
    as ``[B*Hq*nq, 1, D]``), else one per (batch, KV head) with its query heads packed
    (``mode="kv"``, q as ``[B*Hkv*nq, Hq/Hkv, D]``). Requests are (unit, query block), unit-major.
    K is viewed as ``[B*Hkv*pages, block_k, 1, D]`` (``pages = ceil(nk / block_k)`` per head) and,
    for columns, as ``[B*Hkv*nk, 1, 1, D]``.

    Returns int32 ``qo_indptr``, ``kv_indptr``, ``kv_indices``, ``last_page_len``; for columns
    ``c_indptr``, ``c_indices`` (None when there is none; a request without a column gets key 0 of
    its head as a dummy) and ``empty_rows`` (bool over q rows whose request has no column, or None);
    plus ``mode``, ``units``, ``pages_per_head``, ``n_requests``.
    Raises :class:`~sparsekit.executor.Refused` when fa3's causal alignment cannot express it.
    """
    p = pattern
    if p.window or p.sink:
        raise Refused("a band rule inside blocks (sink / window): fa3 paged runs whole blocks")
    if p.positions is not None:
        raise Refused("gathered rows")
    dev = p.device
    B, Hq, Hkv, nq, bk = p.batch, p.q_heads, p.kv_heads, p.nq, p.block_k
    GQ = Hq // Hkv
    L = p.lower()
    NQB = p.n_qblocks
    rb = p.row_bounds()
    pf, pl = p.block_positions()
    # causal alignment: every key block from the block of the first row to that of the last row is listed
    cnt = L.indptr[1:] - L.indptr[:-1]
    seg_of = torch.repeat_interleave(torch.arange(L.groups * NQB, device=dev), cnt, output_size=L.kblock.numel())
    qb_of = seg_of % NQB
    diag = (L.kblock.to(torch.int64) >= pf[qb_of] // bk).to(torch.int64)
    have = torch.zeros(L.groups * NQB, dtype=torch.int64, device=dev).scatter_add_(0, seg_of, diag)
    need = (pl // bk - pf // bk + 1).repeat(L.groups)
    if not bool((have == need).all()):
        raise Refused("some query block does not list every key block its own rows fall in (fa3's causal "
                      "alignment needs the diagonal blocks)")
    if L.has_columns:
        ccnt = L.col_indptr[1:] - L.col_indptr[:-1]
        cseg = torch.repeat_interleave(torch.arange(L.groups * NQB, device=dev), ccnt, output_size=L.col_index.numel())
        if not bool((L.col_index < pf[cseg % NQB]).all()):
            raise Refused("a column lies inside its query block's own rows (the column pass is non-causal)")
    if (p.group_heads == Hq and GQ > 1) or GQ == 1:
        mode, units = "head", B * Hq
        u = torch.arange(units, device=dev)
        ub, uh = u // Hq, u % Hq
        kvbase = ub * Hkv + uh // GQ
    else:
        mode, units = "kv", B * Hkv
        u = torch.arange(units, device=dev)
        ub, uh = u // Hkv, (u % Hkv) * GQ
        kvbase = u
    group = (ub if p.group_batch > 1 else torch.zeros_like(ub)) * p.group_heads + uh * p.group_heads // Hq
    n_req = units * NQB
    seg = (group[:, None] * NQB + torch.arange(NQB, device=dev)[None, :]).reshape(-1)  # [n_req]
    unit = torch.arange(units, device=dev).repeat_interleave(NQB)
    zero = torch.zeros(1, dtype=torch.int64, device=dev)
    qo_indptr = torch.cat([(unit * nq + rb[:-1].repeat(units)), torch.tensor([units * nq], device=dev)])
    lengths = L.indptr[seg + 1] - L.indptr[seg]
    idx, owner = _ranges(L.indptr[seg], lengths)
    npages = -(-p.nk // bk)
    kv_indices = kvbase[unit[owner]] * npages + L.kblock[idx].to(torch.int64)
    kv_indptr = torch.cat([zero, lengths.cumsum(0)])
    last = (pl % bk + 1).repeat(units)
    out = dict(mode=mode, units=units, pages_per_head=npages, n_requests=n_req, qo_indptr=qo_indptr,
               kv_indptr=kv_indptr, kv_indices=kv_indices, last_page_len=last, c_indptr=None, c_indices=None,
               empty_rows=None)
    if L.has_columns:
        clen = L.col_indptr[seg + 1] - L.col_indptr[seg]
        empty = clen == 0
        e64 = empty.to(torch.int64)
        cidx, cown = _ranges(L.col_indptr[seg], clen)
        c_indptr = torch.cat([zero, (clen + e64).cumsum(0)])
        c_indices = torch.empty(int(c_indptr[-1]), dtype=torch.int64, device=dev)
        shift = torch.cumsum(e64, 0) - e64  # dummy slots of earlier requests
        c_indices[torch.arange(cidx.numel(), device=dev) + shift[cown]] = kvbase[unit[cown]] * p.nk + L.col_index[cidx]
        er = empty.nonzero().squeeze(1)
        c_indices[c_indptr[er]] = kvbase[unit[er]] * p.nk
        if bool(empty.any()):
            rows_per_req = (rb[1:] - rb[:-1]).repeat(units)
            out["empty_rows"] = torch.repeat_interleave(empty, rows_per_req, output_size=units * nq)
        out["c_indptr"], out["c_indices"] = c_indptr, c_indices
    for key in ("qo_indptr", "kv_indptr", "kv_indices", "last_page_len", "c_indptr", "c_indices"):
        if out[key] is not None:
            out[key] = out[key].to(torch.int32)
    return out


def _paged_kv(t: torch.Tensor, page: int, n_pages_head: int) -> torch.Tensor:
    """(B, Hkv, Nk, D) -> (B*Hkv*n_pages_head, page, 1, D), padding Nk to whole pages (a copy then)."""
    B, H, N, D = t.shape
    t = t.contiguous()
    if N != n_pages_head * page:
        pad = t.new_zeros(B, H, n_pages_head * page, D)
        pad[:, :, :N] = t
        t = pad
    return t.view(B * H * n_pages_head, page, 1, D)


# ---------------------------------------------------------------- the implementations
def _fa3_available():
    if not available():
        return 'flashinfer is not installed (pip install "sparsekit-prefill[flashinfer]")'
    if not torch.cuda.is_available():
        return "no CUDA device"
    return None


def _fa3_reason(q, k, kind: str, swa: bool = False):
    if q.device.type != "cuda":
        return "needs CUDA tensors"
    if not available():
        return 'flashinfer is not installed (pip install "sparsekit-prefill[flashinfer]")'
    if q.dtype not in (torch.float16, torch.bfloat16):
        return f"dtype {q.dtype} (fa3 runs float16 / bfloat16)"
    if torch.cuda.get_device_capability(q.device)[0] != 9:
        return "fa3 needs a Hopper GPU (sm90)"
    if q.stride(-1) != 1 or k.stride(-1) != 1:
        return "head_dim is not the unit-stride axis"
    if not ready(kind, q.dtype, q.shape[-1], swa):
        return (f"FlashInfer's fa3 {kind}-prefill module for {q.dtype}, head_dim {q.shape[-1]} is not built "
                "(nothing is compiled behind the caller's back; build it once with FlashInfer's JIT)")
    return None


class BandFA3(Implementation):
    """Dense causal and sink + window over contiguous rows, through fa3 single prefill."""

    name: ClassVar[str] = "fa3_band"
    available_reason = staticmethod(_fa3_available)
    family: ClassVar[str] = "flashinfer"
    rank: ClassVar[int] = 10

    def refuse(self, pattern, q, k):
        if not pattern.is_band:
            return "the pattern has block lists or columns"
        if pattern.positions is not None:
            return "gathered rows"
        if pattern.window == 0:
            return "no window (sink-only band)"
        return _fa3_reason(q, k, "single", swa=pattern.window < pattern.nk) or (
            _fa3_reason(q, k, "single") if pattern.sink or pattern.window < pattern.nk else None
        )

    out_layout: ClassVar[str] = "BNHD"

    def run(self, pattern, state, q, k, v, *, scale: float, out=None):
        if pattern.window >= pattern.nk:
            return dense(q, k, v, scale=scale, q_offset=pattern.q_offset, out=out)
        return streaming(q, k, v, scale=scale, q_offset=pattern.q_offset, window=pattern.window, sink=pattern.sink,
                         out=out)


class RowsFA3(Implementation):
    """Gathered rows over their whole causal prefix: one ragged fa3 launch + a Triton remainder."""

    name: ClassVar[str] = "fa3_rows"
    available_reason = staticmethod(_fa3_available)
    family: ClassVar[str] = "flashinfer"
    rank: ClassVar[int] = 11

    def refuse(self, pattern, q, k):
        if pattern.positions is None:
            return "contiguous rows (this implementation runs gathered rows)"
        if not pattern.is_dense:
            return "the rows do not see their whole causal prefix"
        why = _fa3_reason(q, k, "batch")
        if why:
            return why
        if not k.is_contiguous():
            return "k / v are not contiguous (read in place as [Nk, B*Hkv, D])"
        from .triton_band import triton_reason

        return triton_reason(q, k)

    def prepare(self, pattern, q, k, *, scale: float):
        if pattern.nq == 0:
            return None
        return rows_plan(pattern.positions_cpu(), B=pattern.batch, Hq=pattern.q_heads, Hkv=pattern.kv_heads,
                         D=q.shape[-1], Nk=pattern.nk, dtype=q.dtype, device=q.device, scale=scale)

    def run(self, pattern, state, q, k, v, *, scale: float, out=None):
        if pattern.nq == 0:
            return AttentionResult(q.new_empty(q.shape), torch.full(q.shape[:3], float("-inf"), device=q.device))
        if not v.is_contiguous():
            v = v.contiguous()
        return rows(q, k, v, positions=pattern.positions, scale=scale, plan=state)


class PagedFA3(Implementation):
    """Block patterns (+ columns) through fa3 paged prefill (see the module docstring)."""

    name: ClassVar[str] = "fa3_paged"
    available_reason = staticmethod(_fa3_available)
    family: ClassVar[str] = "flashinfer"
    rank: ClassVar[int] = 20

    def refuse(self, pattern, q, k):
        if pattern.is_band:
            return "a band pattern (fa3_band runs it)"
        if pattern.window or pattern.sink:
            return "a band rule inside blocks (sink / window)"
        if pattern.positions is not None:
            return "gathered rows"
        if pattern.block_q < 128:
            return (f"query blocks of {pattern.block_q} rows: fa3's tile is 128 rows, and on an H200 the Triton "
                    "pattern kernel ran HiP's 64-row blocks faster (27 vs 35 ms at 128K)")
        return _fa3_reason(q, k, "batch")

    def prepare(self, pattern, q, k, *, scale: float):
        fi = _fi()
        ix = paged_requests(pattern)
        dev, dt = q.device, q.dtype
        heads = 1 if ix["mode"] == "head" else pattern.q_heads // pattern.kv_heads
        w = _paged_wrapper(fi, dev, ix["n_requests"])
        w.plan(ix["qo_indptr"], ix["kv_indptr"], ix["kv_indices"], ix["last_page_len"], heads, 1, q.shape[-1],
               pattern.block_k, causal=True, sm_scale=float(scale), q_data_type=dt, kv_data_type=dt)
        wc = None
        if ix["c_indices"] is not None:
            wc = _paged_wrapper(fi, dev, ix["n_requests"])
            ones = torch.ones(ix["n_requests"], dtype=torch.int32, device=dev)
            wc.plan(ix["qo_indptr"], ix["c_indptr"], ix["c_indices"], ones, heads, 1, q.shape[-1], 1,
                    causal=False, sm_scale=float(scale), q_data_type=dt, kv_data_type=dt)
        return dict(blocks=w, columns=wc, mode=ix["mode"], heads=heads, pages=ix["pages_per_head"],
                    empty_rows=ix["empty_rows"])

    def run(self, pattern, state, q, k, v, *, scale: float, out=None):
        fi = _fi()
        B, Hq, nq, D = q.shape
        Hkv = k.shape[1]
        h = state["heads"]
        if state["mode"] == "head":
            qf = q.contiguous().view(B * Hq * nq, 1, D)
        else:
            qf = q.reshape(B, Hkv, h, nq, D).transpose(2, 3).reshape(B * Hkv * nq, h, D)
        npg = state["pages"]
        o, l2 = state["blocks"].run(qf, (_paged_kv(k, pattern.block_k, npg), _paged_kv(v, pattern.block_k, npg)),
                                    return_lse=True)
        if state["columns"] is not None:
            kt = k.contiguous().view(-1, 1, 1, D)
            vt = v.contiguous().view(-1, 1, 1, D)
            oc, lc = state["columns"].run(qf, (kt, vt), return_lse=True)
            if state["empty_rows"] is not None:
                lc = lc.masked_fill(state["empty_rows"][:, None], float("-inf"))
            o, l2 = fi.merge_state(o, l2, oc, lc)
        if state["mode"] == "head":
            return AttentionResult(o.view(B, Hq, nq, D), (l2.view(B, Hq, nq).float() * LN2))
        o5 = o.view(B, Hkv, nq, h, D).transpose(2, 3)
        l4 = l2.view(B, Hkv, nq, h).transpose(2, 3).float() * LN2
        if out is not None:  # one transposing copy, straight into the caller's buffer
            out[0].unflatten(1, (Hkv, h)).copy_(o5)
            out[1].unflatten(1, (Hkv, h)).copy_(l4)
            return AttentionResult(out[0], out[1])
        return AttentionResult(o5.reshape(B, Hq, nq, D), l4.reshape(B, Hq, nq))
