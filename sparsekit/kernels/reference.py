"""The torch reference implementation: any pattern, any device, any dtype (the CPU path).

Rows are processed in blocks; each block attends the keys some row of it may see
(:meth:`~sparsekit.pattern.Pattern.candidate_keys`) under the pattern's exact keep-mask
(:meth:`~sparsekit.pattern.Pattern.keep`), so what runs is the pattern's definition itself.
K/V are never expanded to the query heads.
"""

from __future__ import annotations

from typing import ClassVar

from ..executor import Implementation
from ..reference import blockwise_attention

__all__ = ["Reference"]


class Reference(Implementation):
    """Exact blockwise attention in float32 (float64 for float64 inputs); the ground truth."""

    name: ClassVar[str] = "reference"
    family: ClassVar[str] = "torch"
    rank: ClassVar[int] = 1000

    def refuse(self, pattern, q, k):
        return None

    def run(self, pattern, state, q, k, v, *, scale: float, out=None):
        G = pattern.q_heads // pattern.group_heads

        def select(i0, i1):
            keys = pattern.candidate_keys(i0, i1)
            keep = pattern.keep(i0, i1, keys)  # [Bp, Hp, R, M]
            if G > 1:
                keep = keep.repeat_interleave(G, dim=1)
            return keys, keep

        return blockwise_attention(q, k, v, scale=scale, select=select)
