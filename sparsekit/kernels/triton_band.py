"""Triton forward attention over per-row key intervals, with natural-log lse (``triton_band``).

The executor's implementation for band patterns (:class:`BandTriton`: dense causal, sink + window,
over contiguous or gathered rows). One kernel serves three patterns. Query row r sits at absolute position ``pos[r]`` and sees
key j iff ``j <= pos[r]`` and (``j < sink`` or ``j >= lo[r]``):

* streaming (sink + window): ``pos[r] = q_offset + r``, ``lo[r] = pos[r] - window + 1``;
* key-dense gathered rows (Δ anchors + tail): ``pos`` given, ``sink = 0``, ``lo = 0``;
* the remainder ``(p0, pos]`` of each row of the FlashInfer rows path (``fa3_rows``): ``pos`` given, ``lo`` given.

A program owns ``BLOCK_M`` consecutive rows of one (batch, query head) and walks only the key
blocks some row of the tile can see: ``[0, sink)`` first, then the band
``[min lo, max pos]``; the element mask is applied only on blocks that are not fully visible
to every row of the tile. GQA is native: query head h reads K/V head ``h // (Hq // Hkv)``;
K/V are never expanded. No [N, N] mask is built.

Shapes: q (B, Hq, R, D), k/v (B, Hkv, Nk, D) with unit stride on D; out (B, Hq, R, D) in q's
dtype, lse (B, Hq, R) float32 natural log (``-inf`` for a row that sees no key).
"""

from __future__ import annotations

import math
from typing import ClassVar, Optional

import torch

from ..contract import AttentionResult
from ..executor import Implementation

__all__ = ["interval_attention", "supported", "BandTriton", "triton_reason", "triton_available"]

_LOG2E = 1.4426950408889634
_LN2 = math.log(2.0)


def _triton():
    try:
        import triton  # noqa: F401
        import triton.language as tl  # noqa: F401
    except ImportError as exc:  # pragma: no cover - exercised only without triton
        raise ImportError('the Triton kernels need triton: pip install "sparsekit-prefill[triton]"') from exc
    return triton


_KERNEL = None


def _build():
    global _KERNEL
    if _KERNEL is not None:
        return _KERNEL
    triton = _triton()
    import triton.language as tl

    global scores, update, finish  # the kernel's globals, where Triton (compiler and interpreter) looks
    from ._triton_softmax import finish, scores, update

    @triton.jit
    def _interval_attn_fwd(
        Q, K, V, O, LSE, POS, LO,
        s_qb, s_qh, s_qm,
        s_kb, s_kh, s_kn,
        s_vb, s_vh, s_vn,
        s_ob, s_oh, s_om,
        s_lb, s_lh,
        H, R, NK, GROUP,
        q_offset, window, sink,
        qk_scale,
        HAS_POS: tl.constexpr, HAS_LO: tl.constexpr, IEEE: tl.constexpr,
        BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, HEAD_DIM: tl.constexpr,
    ):
        pid_m = tl.program_id(0)
        bh = tl.program_id(1)
        b = (bh // H).to(tl.int64)
        h = (bh % H).to(tl.int64)
        kvh = h // GROUP
        rows = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
        rmask = rows < R
        if HAS_POS:
            pos = tl.load(POS + rows, mask=rmask, other=-1).to(tl.int64)
        else:
            pos = tl.where(rmask, q_offset + rows, -1).to(tl.int64)
        if HAS_LO:
            lo = tl.load(LO + rows, mask=rmask, other=0).to(tl.int64)
        else:
            lo = pos - window + 1
        big = 1 << 62
        pos_max = tl.max(pos, axis=0)
        pos_min = tl.min(tl.where(rmask, pos, big), axis=0)
        lo_min = tl.min(tl.where(rmask, lo, big), axis=0)
        lo_max = tl.max(tl.where(rmask, lo, -big), axis=0)
        partial_tile = pid_m * BLOCK_M + BLOCK_M > R

        dcols = tl.arange(0, HEAD_DIM)
        q_ptrs = Q + b * s_qb + h * s_qh + rows.to(tl.int64)[:, None] * s_qm + dcols[None, :]
        q = tl.load(q_ptrs, mask=rmask[:, None], other=0.0)
        k_base = K + b * s_kb + kvh * s_kh
        v_base = V + b * s_vb + kvh * s_vh

        m_i = tl.full([BLOCK_M], float("-inf"), dtype=tl.float32)
        l_i = tl.zeros([BLOCK_M], dtype=tl.float32)
        acc = tl.zeros([BLOCK_M, HEAD_DIM], dtype=tl.float32)

        sink_end = tl.minimum(sink, pos_max + 1)
        ph1_end = tl.cdiv(tl.maximum(sink_end, 0), BLOCK_N) * BLOCK_N
        ph2_start = tl.maximum(ph1_end, (tl.maximum(lo_min, 0) // BLOCK_N) * BLOCK_N)
        ph2_end = pos_max + 1
        n_ph1 = ph1_end // BLOCK_N
        n_ph2 = tl.cdiv(tl.maximum(ph2_end - ph2_start, 0), BLOCK_N)
        for it in range(0, n_ph1 + n_ph2):
            start_n = tl.where(it < n_ph1, it * BLOCK_N, ph2_start + (it - n_ph1) * BLOCK_N).to(tl.int64)
            cols = start_n + tl.arange(0, BLOCK_N)
            cmask = cols < NK
            k = tl.load(k_base + cols.to(tl.int64)[:, None] * s_kn + dcols[None, :], mask=cmask[:, None], other=0.0)
            v = tl.load(v_base + cols.to(tl.int64)[:, None] * s_vn + dcols[None, :], mask=cmask[:, None], other=0.0)
            qk = scores(q, k, IEEE) * qk_scale
            need_mask = partial_tile | (start_n + BLOCK_N - 1 > pos_min) | (
                (start_n < lo_max) & (start_n + BLOCK_N > sink)
            )
            if need_mask:
                c64 = cols.to(tl.int64)
                keep = (c64[None, :] <= pos[:, None]) & (
                    (c64[None, :] < sink) | (c64[None, :] >= lo[:, None])
                )
                qk = tl.where(keep, qk, float("-inf"))
            acc, m_i, l_i = update(acc, m_i, l_i, qk, v, IEEE)

        out, lse = finish(acc, m_i, l_i)
        o_ptrs = O + b * s_ob + h * s_oh + rows.to(tl.int64)[:, None] * s_om + dcols[None, :]
        tl.store(o_ptrs, out.to(O.dtype.element_ty), mask=rmask[:, None])
        tl.store(LSE + b * s_lb + h * s_lh + rows, lse, mask=rmask)

    _KERNEL = _interval_attn_fwd
    return _KERNEL


def supported(q, k, v) -> Optional[str]:
    """Why the Triton kernel cannot run these tensors, or None."""
    D = q.shape[-1]
    if q.dtype not in (torch.float16, torch.bfloat16, torch.float32):
        return f"dtype {q.dtype} (needs float16, bfloat16 or float32)"
    if k.dtype != q.dtype or v.dtype != q.dtype:
        return "q, k, v dtypes differ"
    if D < 16 or D > 256 or D & (D - 1):
        return f"head_dim {D} (needs a power of two in 16..256)"
    if v.shape[-1] != D or k.shape[-1] != D:
        return "head dims of q, k, v differ"
    if q.stride(-1) != 1 or k.stride(-1) != 1 or v.stride(-1) != 1:
        return "head_dim is not the unit-stride axis"
    return None


def _blocks(D: int, dtype: torch.dtype, interpret: bool):
    if interpret:
        return 16, 16, 4, 1
    if dtype == torch.float32:
        return 64, 32, 4, 2
    if D <= 64:
        return 128, 64, 4, 3
    if D <= 128:
        return 128, 64, 8, 3
    return 64, 32, 8, 2


def interval_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    *,
    scale: float,
    q_offset: int = 0,
    window: Optional[int] = None,
    sink: int = 0,
    positions: Optional[torch.Tensor] = None,
    lo: Optional[torch.Tensor] = None,
    out: Optional[torch.Tensor] = None,
    lse: Optional[torch.Tensor] = None,
):
    """Attention of q rows over their key intervals (see the module docstring).

    Parameters
    ----------
    q : (B, Hq, R, D); k, v : (B, Hkv, Nk, D)
    scale : float
    q_offset : int
        Position of row 0 when ``positions`` is None.
    window : int or None
        Band width counting the query itself (None: the whole causal prefix).
    sink : int
        Leading keys every row sees.
    positions : (R,) int, optional
        Absolute position of each row (default ``q_offset + r``).
    lo : (R,) int, optional
        Per-row first band key (overrides ``window``).
    out, lse : optional preallocated (B, Hq, R, D) / (B, Hq, R) float32 outputs (any strides
        with unit stride on D).

    Returns
    -------
    (out, lse): out (B, Hq, R, D) in q's dtype, lse (B, Hq, R) float32 natural log.
    """
    triton = _triton()
    kernel = _build()
    B, Hq, R, D = q.shape
    Hkv, NK = k.shape[1], k.shape[2]
    if Hq % Hkv:
        raise ValueError(f"q heads ({Hq}) must be a multiple of kv heads ({Hkv})")
    if out is None:
        out = torch.empty(B, Hq, R, D, dtype=q.dtype, device=q.device)
    if lse is None:
        lse = torch.empty(B, Hq, R, dtype=torch.float32, device=q.device)
    if R == 0:
        return out, lse
    if lse.stride(2) != 1:
        raise ValueError("lse must have unit stride on the row axis")
    interpret = q.device.type == "cpu"
    BM, BN, warps, stages = _blocks(D, q.dtype, interpret)
    win = (1 << 62) if window is None else int(window)
    dummy = torch.zeros(1, dtype=torch.int64, device=q.device)
    pos_t = positions.to(device=q.device, dtype=torch.int64).contiguous() if positions is not None else dummy
    lo_t = lo.to(device=q.device, dtype=torch.int64).contiguous() if lo is not None else dummy
    grid = (triton.cdiv(R, BM), B * Hq)
    kernel[grid](
        q, k, v, out, lse, pos_t, lo_t,
        q.stride(0), q.stride(1), q.stride(2),
        k.stride(0), k.stride(1), k.stride(2),
        v.stride(0), v.stride(1), v.stride(2),
        out.stride(0), out.stride(1), out.stride(2),
        lse.stride(0), lse.stride(1),
        Hq, R, NK, Hq // Hkv,
        int(q_offset), win, int(sink),
        float(scale) * _LOG2E,
        HAS_POS=positions is not None, HAS_LO=lo is not None, IEEE=q.dtype == torch.float32,
        BLOCK_M=BM, BLOCK_N=BN, HEAD_DIM=D,
        num_warps=warps, num_stages=stages,
    )
    return out, lse


# ---------------------------------------------------------------------------- the implementation
def triton_available() -> Optional[str]:
    """Why the Triton kernels cannot run on this machine (no triton; no CUDA outside the interpreter), or None."""
    import os

    from ..executor import has_module

    if not has_module("triton"):
        return 'triton is not installed (pip install "sparsekit-prefill[triton]")'
    if not torch.cuda.is_available() and os.environ.get("TRITON_INTERPRET") != "1":
        return "no CUDA device"
    return None


def triton_reason(q, k) -> Optional[str]:
    """Why the Triton kernels cannot run on these tensors (device, install, dtype, head_dim), or None."""
    import os

    from ..executor import has_module

    if q.device.type == "cpu" and os.environ.get("TRITON_INTERPRET") != "1":
        return "CPU tensors (Triton runs on the CPU only under its interpreter, TRITON_INTERPRET=1)"
    if q.device.type not in ("cuda", "cpu"):
        return f"device {q.device.type}"
    if not has_module("triton"):
        return 'triton is not installed (pip install "sparsekit-prefill[triton]")'
    return supported(q, k, k)


class BandTriton(Implementation):
    """Band patterns (dense causal, sink + window), contiguous or gathered rows: one Triton kernel."""

    name: ClassVar[str] = "triton_band"
    available_reason = staticmethod(triton_available)
    family: ClassVar[str] = "triton"
    rank: ClassVar[int] = 40

    def refuse(self, pattern, q, k):
        if not pattern.is_band:
            return "the pattern has block lists or columns (this kernel runs sink + window only)"
        return triton_reason(q, k)

    def run(self, pattern, state, q, k, v, *, scale: float, out=None):
        o, l = out if out is not None else (None, None)
        if l is not None and l.stride(-1) != 1:
            o, l = None, None
        res = interval_attention(
            q, k, v, scale=scale, q_offset=pattern.q_offset, window=pattern.window, sink=pattern.sink,
            positions=pattern.positions, out=o, lse=l,
        )
        return AttentionResult(*res)
