"""Δ (delta) correction of sparse prefill attention."""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar, Union

import torch

from sparsekit.correctors.anchored import AnchoredCorrector
from sparsekit.base import Interpolation
from sparsekit.contract import AttentionResult
from sparsekit.reference import compute_dtype
from sparsekit.spec import build


@dataclass
class Delta(AnchoredCorrector):
    """Add the dense-minus-sparse difference measured at every ``gamma``-th row to the rows after it.

    Willette, Lee, Hwang, "Δ Attention: Fast and Accurate Sparse Attention Inference by
    Delta Correction", NeurIPS 2025 (https://arxiv.org/abs/2505.11254), Eqs. 6-7 and Alg. 1.

    For a body row i in block k (``k = i // gamma``):
    ``out[i] = sparse[i] + spread(Δ)[i]`` with ``Δ_k = dense[k*gamma] - sparse[k*gamma]``;
    with ``interpolation="repeat"`` (the paper) ``spread(Δ)[i] = Δ_k``. Anchor rows and the
    dense tail are the exact dense rows.

    ``lse`` of corrected rows: anchor and tail rows carry their exact full-prefix lse. Other
    body rows carry ``sparse_lse[i] + spread(Δlse)[i]`` with ``Δlse_k = dense_lse[k*gamma] -
    sparse_lse[k*gamma]``: the same locality assumption applied to the log-normaliser, an
    *estimate* of the lse over the row's full causal prefix (not an exact partial; do not
    merge such rows with attention over keys they may already account for).

    Parameters
    ----------
    gamma : int
        Query stride (the paper uses 64: ~1.5% extra work).
    tail : int or None
        Dense tail rows; None = ``nq % gamma + max(128, gamma)`` (the official code).
    interpolation : str, dict or Interpolation
        ``"repeat"`` (paper default), ``"linear"``, ``"ema"``, ``"abg"`` or any registered scheme.

    A non-finite Δ (a NaN or inf in the anchor's dense or sparse row) is not spread: it counts as
    zero (with ``repeat`` the block's other rows keep their uncorrected sparse values), so one bad
    row stays one bad row.
    """

    name: ClassVar[str] = "delta"
    interpolation: Union[str, dict, Interpolation] = "repeat"

    def __post_init__(self):
        super().__post_init__()
        self.interpolation = build("interpolation", self.interpolation)

    def mix(self, rows, sparse, dense) -> AttentionResult:
        """Corrected result from the sparse result and the dense anchor + tail rows.

        On CUDA, the first-party ``repeat`` and ``linear`` run as one fused pass over the output
        (:func:`sparsekit.kernels.delta_apply`) that writes into the sparse result's buffers;
        other schemes and CPU tensors use the torch code below (same semantics). A block whose Δ
        (or Δlse) holds a non-finite value is not corrected: its rows keep the sparse values.
        """
        nb, nbody = rows.n_blocks, rows.n_body
        fused = type(self.interpolation).__dict__.get("fused")  # declared by the class itself, not inherited
        if sparse.out.is_cuda and fused is not None:
            from sparsekit import kernels

            res = kernels.delta_apply(sparse, dense, gamma=self.gamma, n_body=nbody, linear=fused == "linear")
            if res is not None:
                return res
        anchors = rows.anchors(sparse.out.device)
        cd = compute_dtype(sparse.out.dtype)
        D = sparse.out.shape[-1]
        delta = dense.out[:, :, :nb].to(cd) - sparse.out.index_select(2, anchors).to(cd)
        dlse = dense.lse[:, :, :nb] - sparse.lse.index_select(2, anchors)
        ext = torch.cat([delta, dlse.unsqueeze(-1).to(cd)], dim=-1)  # spread out and lse together
        ext = ext.masked_fill(~torch.isfinite(ext).all(-1, keepdim=True), 0.0)
        per_row = self.interpolation.spread(ext, self.gamma, nbody)
        body_out = sparse.out[:, :, :nbody].to(cd) + per_row[..., :D]
        body_lse = sparse.lse[:, :, :nbody] + per_row[..., D].float()
        body_out[:, :, anchors] = dense.out[:, :, :nb].to(cd)
        body_lse[:, :, anchors] = dense.lse[:, :, :nb]
        out = torch.cat([body_out.to(sparse.out.dtype), dense.out[:, :, nb:].to(sparse.out.dtype)], dim=2)
        lse = torch.cat([body_lse, dense.lse[:, :, nb:]], dim=2)
        return AttentionResult(out, lse)
