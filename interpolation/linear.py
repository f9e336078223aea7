"""Linear interpolation between consecutive anchors (Δ paper, App. J, Table 8)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch

from sparsekit.base import Interpolation


@dataclass
class Linear(Interpolation):
    """``Δ̂[kγ + j] = (1 - j/γ) Δ_k + (j/γ) Δ_{k+1}``; the last block holds ``Δ_last`` constant.

    Non-causal: a row uses the next block's anchor, which lies after it.
    """

    name: ClassVar[str] = "linear"
    fused: ClassVar[str] = "linear"  # sparsekit.kernels.delta_apply runs this scheme in one pass on CUDA

    def spread(self, delta, gamma: int, n_body: int):
        nxt = torch.cat([delta[..., 1:, :], delta[..., -1:, :]], dim=-2)
        beta = torch.arange(gamma, device=delta.device, dtype=delta.dtype) / gamma  # j / γ
        beta = beta[:, None]  # [γ, 1]
        rows = delta.unsqueeze(-2) * (1 - beta) + nxt.unsqueeze(-2) * beta  # [..., nb, γ, C]
        return rows.flatten(-3, -2)[..., :n_body, :]
