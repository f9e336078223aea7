"""The executor's implementations, and the fused Δ pass.

Each module holds implementations of :class:`sparsekit.executor.Implementation`, registered under
the entry-point group ``sparsekit.kernels`` (third-party kernels register the same way) and imported
only when dispatch first asks for them; triton and flashinfer are imported lazily inside them:

=================  ==========  ==================================================================
name               family      runs
=================  ==========  ==================================================================
``fa3_band``       flashinfer  band patterns (dense causal, sink + window) through fa3 single prefill
``fa3_rows``       flashinfer  gathered rows over their causal prefix (a corrector's dense rows)
``fa3_paged``      flashinfer  block lists + columns through fa3 paged prefill
``triton_band``    triton      band patterns, contiguous or gathered rows
``triton_blocks``  triton      any pattern
``flex``           flex        any pattern (compiled FlexAttention, CUDA)
``reference``      torch       any pattern, any device (the CPU path and the ground truth)
=================  ==========  ==================================================================

Two corrector passes live here too, outside dispatch: Δ's fused application (``triton_delta``, through
:func:`delta_apply`) and meancorr's mean correction (``triton_meancorr``); each falls back to torch when
a ``use(...)`` restriction leaves out the ``triton`` family.

``sparsekit.kernels.use("triton")`` restricts dispatch inside a ``with`` block;
``SparseAttention.explain(q, k)`` says which implementation runs each step and why the others not.
"""

from __future__ import annotations

from typing import Optional

import torch

from ..contract import AttentionResult
from ..executor import choose, execute, forced, implementations, register_implementation, use

__all__ = ["use", "forced", "implementations", "register_implementation", "choose", "execute", "delta_apply",
           "dense_layout"]


def dense_layout(t: torch.Tensor) -> bool:
    """True when ``t`` covers its elements exactly once (safe to write in place)."""
    dims = sorted(range(t.dim()), key=lambda d: t.stride(d))
    expect = 1
    for d in dims:
        if t.shape[d] != 1 and t.stride(d) != expect:
            return False
        expect *= t.shape[d]
    return True


def delta_apply(sparse: AttentionResult, dense: AttentionResult, *, gamma: int, n_body: int,
                linear: bool) -> Optional[AttentionResult]:
    """Fused Δ application on CUDA with Triton (repeat, or linear when ``linear``), or None.

    sparse: out (B, H, N, D), lse (B, H, N); dense: the anchor rows then the tail rows.
    Writes into the sparse result's buffers when they are plain dense tensors (the corrected
    prefill then needs no second N-row buffer) and returns them as the corrected result.
    A ``use(...)`` restriction that excludes the ``triton`` family turns it off.
    """
    allow = forced()
    if not sparse.out.is_cuda or (allow is not None and "triton" not in allow):
        return None
    from ..executor import has_module

    if not has_module("triton"):
        return None
    D = sparse.out.shape[-1]
    if D < 16 or D > 256 or D & (D - 1) or sparse.out.stride(-1) != 1 or dense.out.stride(-1) != 1:
        return None
    from .triton_delta import delta_apply as _apply

    inplace = dense_layout(sparse.out) and dense_layout(sparse.lse) and sparse.lse.stride(-1) == 1
    lse_in = sparse.lse if sparse.lse.stride(-1) == 1 else sparse.lse.contiguous()
    dl = dense.lse if dense.lse.stride(-1) == 1 else dense.lse.contiguous()
    out, lse = _apply(
        sparse.out, lse_in, dense.out, dl, gamma=gamma, n_body=n_body, linear=linear,
        out=sparse.out if inplace else None, out_lse=lse_in if inplace else None,
    )
    return AttentionResult(out, lse)
