"""Repeat: the Δ paper's scheme (Alg. 1, ``repeat(Δ, γ)``)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

from sparsekit.base import Interpolation


@dataclass
class Repeat(Interpolation):
    """Every row of block k gets ``Δ_k`` (causal: uses only the block's own anchor)."""

    name: ClassVar[str] = "repeat"
    fused: ClassVar[str] = "repeat"  # sparsekit.kernels.delta_apply runs this scheme in one pass on CUDA

    def spread(self, delta, gamma: int, n_body: int):
        return delta.repeat_interleave(gamma, dim=-2)[..., :n_body, :]
