"""StreamingLLM prefill: attention sinks plus a sliding window.

Xiao et al., "Efficient Streaming Language Models with Attention Sinks", ICLR 2024
(https://arxiv.org/abs/2309.17453). Defaults follow the Δ paper's setting: window 2048,
sink 1024.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch

from sparsekit import kernels
from sparsekit.base import Backend
from sparsekit.contract import AttentionResult
from sparsekit.reference import blockwise_attention
from sparsekit.validate import check_int_option


def streaming_keep(pq: torch.Tensor, kj: torch.Tensor, window: int, sink: int) -> torch.Tensor:
    """The pattern: key j is seen by the query at absolute position p iff
    ``j <= p`` and (``j < sink`` or ``j > p - window``). The window counts the query itself.

    pq (R,) positions, kj (M,) key indices -> bool (R, M).
    """
    p, j = pq[:, None], kj[None, :]
    return (j <= p) & ((j < sink) | (j > p - window))


@dataclass
class Streaming(Backend):
    """Sink + sliding window: row at position p sees keys ``[0, sink)`` and ``(p - window, p]``.

    Parameters
    ----------
    window : int, >= 1
        Keys ending at (and including) the query's own position.
    sink : int, >= 0
        Leading keys every query sees.
    """

    name: ClassVar[str] = "streaming"
    window: int = 2048
    sink: int = 1024

    def __post_init__(self):
        check_int_option("streaming", "window", self.window, 1)
        check_int_option("streaming", "sink", self.sink, 0)

    def pattern(self, q, k, *, scale=None, q_offset=0) -> torch.Tensor:
        pq = q_offset + torch.arange(q.shape[2], device=q.device)
        return streaming_keep(pq, torch.arange(k.shape[2], device=q.device), self.window, self.sink)

    def prefill(self, q, k, v, *, scale: float, q_offset: int) -> AttentionResult:
        fast = kernels.streaming_attention(
            q, k, v, scale=scale, q_offset=q_offset, window=self.window, sink=self.sink
        )
        if fast is not None:
            return fast
        device = q.device

        def select(i0, i1):
            p0, p1 = q_offset + i0, q_offset + i1 - 1  # first / last position of the block
            sink_hi = min(self.sink, p1 + 1)
            band_lo = max(sink_hi, p0 - self.window + 1)
            kj = torch.cat([torch.arange(sink_hi, device=device), torch.arange(band_lo, p1 + 1, device=device)])
            pq = torch.arange(p0, p1 + 1, device=device)
            return kj, streaming_keep(pq, kj, self.window, self.sink)

        return blockwise_attention(q, k, v, scale=scale, select=select)

    def cost(self, nq: int, nk: int, q_offset: int) -> int:
        seen = torch.arange(q_offset + 1, q_offset + nq + 1, dtype=torch.int64)  # p + 1
        sink = seen.clamp(max=self.sink)
        band = (seen - self.sink).clamp(min=0, max=self.window)
        return int((sink + band).sum())
