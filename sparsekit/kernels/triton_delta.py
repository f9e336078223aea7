"""Fused Δ application: one pass over the output rows (Triton).

Δ attention (Willette, Lee, Hwang, NeurIPS 2025, https://arxiv.org/abs/2505.11254), Alg. 1.
With ``Δ_k = dense[k] - sparse[k * gamma]`` measured at the anchors (a small float32 tensor,
``n_blocks`` rows per head, computed before this pass), every output row is written once:

* body row ``i = k * gamma + j`` (``i < n_body``), ``j > 0`` (a block whose Δ or Δlse holds a
  non-finite value uses Δ = 0: its rows keep the sparse values):
  ``out[i] = sparse[i] + Δ̂_i`` and ``lse[i] = sparse_lse[i] + Δ̂lse_i`` where
  ``Δ̂_i = Δ_k`` (``repeat``) or ``(1 - j/γ) Δ_k + (j/γ) Δ_{min(k+1, nb-1)}`` (``linear``);
* anchor rows (``j = 0``): the exact dense row and lse;
* tail rows (``i >= n_body``): dense row ``n_blocks + i - n_body`` and its lse.

Shapes: sparse out (B, H, N, D) (any strides, unit stride on D), sparse lse (B, H, N)
float32; dense out (B, H, n_blocks + N - n_body, D), dense lse likewise; the result is
written to ``out``/``out_lse``, which may be the sparse tensors themselves (in place): each
row is read and written by the same program, and Δ was taken from the anchors beforehand.
"""

from __future__ import annotations

import torch

from .triton_band import _triton

__all__ = ["delta_apply"]

_KERNEL = None


def _build():
    global _KERNEL
    if _KERNEL is not None:
        return _KERNEL
    triton = _triton()
    import triton.language as tl

    @triton.jit
    def _delta_apply(
        S, SL, DO, DL, DLT, DLTL, O, OL,
        s_sb, s_sh, s_sn, s_slb, s_slh,
        s_db, s_dh, s_dn, s_dlb, s_dlh,
        s_tb, s_th, s_tn, s_tlb, s_tlh,
        s_ob, s_oh, s_on, s_olb, s_olh,
        H, N, n_body, n_blocks, gamma,
        LINEAR: tl.constexpr, BLOCK_R: tl.constexpr, HEAD_DIM: tl.constexpr,
    ):
        pid = tl.program_id(0)
        bh = tl.program_id(1)
        b = (bh // H).to(tl.int64)
        h = (bh % H).to(tl.int64)
        rows = pid * BLOCK_R + tl.arange(0, BLOCK_R)
        rmask = rows < N
        d = tl.arange(0, HEAD_DIM)
        body = rows < n_body
        kblk = rows // gamma
        j = rows - kblk * gamma
        anchor = body & (j == 0)
        from_sparse = rmask & body & (j != 0)
        from_dense = rmask & ((~body) | anchor)
        drow = tl.where(body, kblk, n_blocks + rows - n_body).to(tl.int64)
        r64 = rows.to(tl.int64)

        s = tl.load(S + b * s_sb + h * s_sh + r64[:, None] * s_sn + d[None, :],
                    mask=from_sparse[:, None], other=0.0).to(tl.float32)
        sl = tl.load(SL + b * s_slb + h * s_slh + r64, mask=from_sparse, other=0.0)
        k64 = kblk.to(tl.int64)
        t_base = DLT + b * s_tb + h * s_th
        tl_base = DLTL + b * s_tlb + h * s_tlh
        delta = tl.load(t_base + k64[:, None] * s_tn + d[None, :], mask=from_sparse[:, None], other=0.0)
        dl = tl.load(tl_base + k64, mask=from_sparse, other=0.0)
        if LINEAR:
            k2 = tl.minimum(kblk + 1, n_blocks - 1).to(tl.int64)
            w = j.to(tl.float32) / gamma
            delta2 = tl.load(t_base + k2[:, None] * s_tn + d[None, :], mask=from_sparse[:, None], other=0.0)
            dl2 = tl.load(tl_base + k2, mask=from_sparse, other=0.0)
            delta = delta * (1.0 - w)[:, None] + delta2 * w[:, None]
            dl = dl * (1.0 - w) + dl2 * w
        dv = tl.load(DO + b * s_db + h * s_dh + drow[:, None] * s_dn + d[None, :],
                     mask=from_dense[:, None], other=0.0).to(tl.float32)
        dlv = tl.load(DL + b * s_dlb + h * s_dlh + drow, mask=from_dense, other=0.0)
        val = tl.where(from_dense[:, None], dv, s + delta)
        lval = tl.where(from_dense, dlv, sl + dl)
        tl.store(O + b * s_ob + h * s_oh + r64[:, None] * s_on + d[None, :],
                 val.to(O.dtype.element_ty), mask=rmask[:, None])
        tl.store(OL + b * s_olb + h * s_olh + r64, lval, mask=rmask)

    _KERNEL = _delta_apply
    return _KERNEL


def delta_apply(sparse_out, sparse_lse, dense_out, dense_lse, *, gamma: int, n_body: int,
                linear: bool, out=None, out_lse=None):
    """Write the Δ-corrected rows (see the module docstring); returns ``(out, out_lse)``.

    sparse_out (B, H, N, D), sparse_lse (B, H, N) float32, dense_out (B, H, Rd, D),
    dense_lse (B, H, Rd) float32 with ``Rd = n_blocks + N - n_body``.
    ``out``/``out_lse`` default to new tensors; pass the sparse tensors to work in place.
    """
    triton = _triton()
    kernel = _build()
    B, H, N, D = sparse_out.shape
    nb = -(-n_body // gamma)
    if dense_out.shape[2] != nb + N - n_body:
        raise ValueError(
            f"dense rows: expected {nb + N - n_body} (anchors + tail), got {dense_out.shape[2]}"
        )
    if out is None:
        out = torch.empty(B, H, N, D, dtype=sparse_out.dtype, device=sparse_out.device)
    if out_lse is None:
        out_lse = torch.empty(B, H, N, dtype=torch.float32, device=sparse_out.device)
    for t in (sparse_out, dense_out, out):
        if t.stride(-1) != 1:
            raise ValueError("delta_apply: head_dim must be the unit-stride axis")
    for t in (sparse_lse, dense_lse, out_lse):
        if t.stride(-1) != 1:
            raise ValueError("delta_apply: lse must have unit stride on the row axis")
    if nb > 0:
        # Δ at the anchors, float32 [B, H, nb, D] and [B, H, nb]: a 1/gamma-sized pre-pass
        delta = dense_out[:, :, :nb].float() - sparse_out[:, :, 0:n_body:gamma].float()
        dlse = (dense_lse[:, :, :nb] - sparse_lse[:, :, 0:n_body:gamma]).contiguous()
        # a non-finite Δ must not spread: its block keeps the uncorrected sparse rows
        bad = ~(torch.isfinite(delta).all(-1) & torch.isfinite(dlse))
        delta = delta.masked_fill(bad[..., None], 0.0)
        dlse = dlse.masked_fill(bad, 0.0)
    else:
        delta = torch.zeros(B, H, 1, D, dtype=torch.float32, device=sparse_out.device)
        dlse = torch.zeros(B, H, 1, dtype=torch.float32, device=sparse_out.device)
    interpret = sparse_out.device.type == "cpu"
    BLOCK_R = 16 if interpret else max(8, min(64, 8192 // D))
    grid = (triton.cdiv(N, BLOCK_R), B * H)
    kernel[grid](
        sparse_out, sparse_lse, dense_out, dense_lse, delta, dlse, out, out_lse,
        sparse_out.stride(0), sparse_out.stride(1), sparse_out.stride(2), sparse_lse.stride(0), sparse_lse.stride(1),
        dense_out.stride(0), dense_out.stride(1), dense_out.stride(2), dense_lse.stride(0), dense_lse.stride(1),
        delta.stride(0), delta.stride(1), delta.stride(2), dlse.stride(0), dlse.stride(1),
        out.stride(0), out.stride(1), out.stride(2), out_lse.stride(0), out_lse.stride(1),
        H, N, n_body, nb, gamma,
        LINEAR=bool(linear), BLOCK_R=BLOCK_R, HEAD_DIM=D,
        num_warps=4,
    )
    return out, out_lse
