"""Fast paths any plug-in may use. Each returns None when it does not apply to the inputs
(e.g. CPU tensors), and the caller falls back to the exact blockwise reference.

The GPU implementations live in this package and import triton / flashinfer lazily.
"""

from __future__ import annotations

from typing import Optional

import torch

from ..contract import AttentionResult
from ..reference import causal_rows_attention

__all__ = ["dense_attention", "streaming_attention", "rows_attention"]


def dense_attention(q, k, v, *, scale: float, q_offset: int) -> Optional[AttentionResult]:
    """Dense causal attention with lse on an accelerator, or None."""
    return None


def streaming_attention(q, k, v, *, scale: float, q_offset: int, window: int, sink: int) -> Optional[AttentionResult]:
    """Sink + sliding-window attention with lse on an accelerator, or None."""
    return None


def rows_attention(q_rows, k, v, *, positions: torch.Tensor, scale: float) -> AttentionResult:
    """Key-dense attention of gathered rows, row r over keys ``0..positions[r]``.

    q_rows (B, Hq, R, D); k, v (B, Hkv, Nk, D); positions (R,) int64 ascending.
    """
    return causal_rows_attention(q_rows, k, v, positions=positions, scale=scale)
