"""Fast paths any plug-in may use. Each returns None when it does not apply to the inputs
(e.g. CPU tensors), and the caller falls back to the exact blockwise reference.

The GPU implementations live in this package and import triton / flashinfer lazily:

* :mod:`.triton_attention`: one Triton kernel for per-row key intervals (dense causal,
  sink + window, gathered key-dense rows), native GQA, natural-log lse;
* :mod:`.triton_delta`: the fused Δ application (repeat / linear) in one pass over the output;
* :mod:`.flashinfer_attention`: FlashInfer fa3 adapters (dense, window + sink merge, paged
  batch prefill for the key-dense rows), used when FlashInfer is installed and its kernel for
  the dtype / head_dim is already built (so nothing compiles behind the caller's back).

Which implementation runs is chosen per call: ``"auto"`` (FlashInfer when ready, else Triton),
or forced for a block of code with :func:`use` (the benchmark compares them this way).
"""

from __future__ import annotations

import contextlib
from typing import Optional

import torch

from ..contract import AttentionResult
from ..reference import causal_rows_attention

__all__ = [
    "dense_attention",
    "streaming_attention",
    "rows_attention",
    "delta_apply",
    "use",
    "implementation",
    "IMPLEMENTATIONS",
]

IMPLEMENTATIONS = ("auto", "triton", "flashinfer", "reference")
_CHOICE = ["auto"]


@contextlib.contextmanager
def use(impl: str):
    """Force an implementation inside a ``with`` block: "auto", "triton", "flashinfer" or
    "reference" (the CPU-semantics torch code, on any device)."""
    if impl not in IMPLEMENTATIONS:
        raise ValueError(f"use: impl must be one of {IMPLEMENTATIONS}, got {impl!r}")
    old = _CHOICE[0]
    _CHOICE[0] = impl
    try:
        yield
    finally:
        _CHOICE[0] = old


def _has_triton() -> bool:
    try:
        import triton  # noqa: F401

        return True
    except ImportError:
        return False


def _fi_ok(q, k, v, kind: str, swa: bool = False) -> bool:
    from . import flashinfer_attention as fa

    if q.dtype not in (torch.float16, torch.bfloat16) or k.dtype != q.dtype or v.dtype != q.dtype:
        return False
    if q.stride(-1) != 1 or k.stride(-1) != 1 or v.stride(-1) != 1:
        return False
    if not fa.available() or torch.cuda.get_device_capability(q.device)[0] != 9:
        return False
    return fa.ready(kind, q.dtype, q.shape[-1], swa)


def _triton_ok(q, k, v) -> bool:
    if not _has_triton():
        return False
    from .triton_attention import supported

    return supported(q, k, v) is None


def implementation(piece: str, q, k, v) -> str:
    """Which implementation :func:`dense_attention` / :func:`streaming_attention` /
    :func:`rows_attention` (``piece`` = "dense" | "streaming" | "rows") would use."""
    if not q.is_cuda:
        return "reference"
    choice = _CHOICE[0]
    if choice == "reference":
        return "reference"
    kind = "batch" if piece == "rows" else "single"
    fi = False
    if choice in ("auto", "flashinfer"):
        fi = _fi_ok(q, k, v, kind, swa=piece == "streaming")
        if piece == "streaming" and fi:
            fi = _fi_ok(q, k, v, "single")
        if piece == "rows" and fi:
            fi = k.is_contiguous() and v.is_contiguous() and _triton_ok(q, k, v)
    if fi:
        return "flashinfer"
    if choice == "flashinfer":
        raise RuntimeError(f"FlashInfer cannot run {piece} for these inputs (not installed or not built)")
    if _triton_ok(q, k, v):
        return "triton"
    return "reference"


def dense_attention(q, k, v, *, scale: float, q_offset: int) -> Optional[AttentionResult]:
    """Dense causal attention with lse on an accelerator, or None."""
    impl = implementation("dense", q, k, v)
    if impl == "flashinfer":
        from . import flashinfer_attention as fa

        return fa.dense(q, k, v, scale=scale, q_offset=q_offset)
    if impl == "triton":
        from .triton_attention import interval_attention

        return AttentionResult(*interval_attention(q, k, v, scale=scale, q_offset=q_offset))
    return None


def streaming_attention(q, k, v, *, scale: float, q_offset: int, window: int, sink: int) -> Optional[AttentionResult]:
    """Sink + sliding-window attention with lse on an accelerator, or None."""
    impl = implementation("streaming", q, k, v)
    if impl == "flashinfer":
        from . import flashinfer_attention as fa

        return fa.streaming(q, k, v, scale=scale, q_offset=q_offset, window=window, sink=sink)
    if impl == "triton":
        from .triton_attention import interval_attention

        out, lse = interval_attention(q, k, v, scale=scale, q_offset=q_offset, window=window, sink=sink)
        return AttentionResult(out, lse)
    return None


def rows_attention(q_rows, k, v, *, positions: torch.Tensor, scale: float) -> AttentionResult:
    """Key-dense attention of gathered rows, row r over keys ``0..positions[r]``.

    q_rows (B, Hq, R, D); k, v (B, Hkv, Nk, D); positions (R,) int64 ascending.
    """
    impl = implementation("rows", q_rows, k, v)
    if impl == "flashinfer" and q_rows.shape[2] > 0:
        from . import flashinfer_attention as fa

        return fa.rows(q_rows, k, v, positions=positions, scale=scale)
    if impl in ("triton", "flashinfer"):
        from .triton_attention import interval_attention

        return AttentionResult(*interval_attention(q_rows, k, v, scale=scale, positions=positions))
    return causal_rows_attention(q_rows, k, v, positions=positions, scale=scale)


def _dense_layout(t: torch.Tensor) -> bool:
    """True when ``t`` covers its elements exactly once (safe to write in place)."""
    dims = sorted(range(t.dim()), key=lambda d: t.stride(d))
    expect = 1
    for d in dims:
        if t.shape[d] != 1 and t.stride(d) != expect:
            return False
        expect *= t.shape[d]
    return True


def delta_apply(sparse: AttentionResult, dense: AttentionResult, *, gamma: int, n_body: int,
                scheme: str) -> Optional[AttentionResult]:
    """Fused Δ application on an accelerator (``scheme`` "repeat" or "linear"), or None.

    sparse: out (B, H, N, D), lse (B, H, N); dense: the anchor rows then the tail rows.
    Writes into the sparse result's buffers when they are plain dense tensors (the corrected
    prefill then needs no second N-row buffer) and returns them as the corrected result.
    """
    if not sparse.out.is_cuda or scheme not in ("repeat", "linear") or _CHOICE[0] == "reference":
        return None
    if not _has_triton():
        return None
    D = sparse.out.shape[-1]
    if D < 16 or D > 256 or D & (D - 1) or sparse.out.stride(-1) != 1 or dense.out.stride(-1) != 1:
        return None
    from .triton_delta import delta_apply as _apply

    inplace = _dense_layout(sparse.out) and _dense_layout(sparse.lse) and sparse.lse.stride(-1) == 1
    lse_in = sparse.lse if sparse.lse.stride(-1) == 1 else sparse.lse.contiguous()
    dl = dense.lse if dense.lse.stride(-1) == 1 else dense.lse.contiguous()
    out, lse = _apply(
        sparse.out, lse_in, dense.out, dl, gamma=gamma, n_body=n_body, linear=scheme == "linear",
        out=sparse.out if inplace else None, out_lse=lse_in if inplace else None,
    )
    return AttentionResult(out, lse)
