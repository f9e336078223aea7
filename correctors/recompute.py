"""Strided dense recompute (the Δ paper's Eq. 5 baseline)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

from sparsekit.correctors.anchored import AnchoredCorrector
from sparsekit.contract import AttentionResult


@dataclass
class Recompute(AnchoredCorrector):
    """Replace the anchor rows (every ``gamma``-th row) and the dense tail with exact dense rows.

    Willette, Lee, Hwang, "Δ Attention", NeurIPS 2025 (https://arxiv.org/abs/2505.11254), Eq. 5.
    Every other row keeps the backend's sparse output and lse unchanged: no correction
    reaches them. ``lse`` of the replaced rows is the exact full-prefix lse.
    """

    name: ClassVar[str] = "recompute"

    def mix(self, rows, sparse, dense) -> AttentionResult:
        from sparsekit.kernels import dense_layout

        idx = rows.dense_rows(sparse.out.device)
        if sparse.out.is_cuda and dense_layout(sparse.out) and dense_layout(sparse.lse):
            # write the dense rows into the sparse buffers: no second N-row buffer
            out, lse = sparse.out, sparse.lse
            out.index_copy_(2, idx, dense.out.to(out.dtype))
            lse.index_copy_(2, idx, dense.lse.to(lse.dtype))
            return AttentionResult(out, lse)
        out = sparse.out.clone()
        lse = sparse.lse.clone()
        out[:, :, idx] = dense.out.to(out.dtype)
        lse[:, :, idx] = dense.lse
        return AttentionResult(out, lse)
