"""Dense causal attention: the exact baseline every other backend is measured against."""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch

from sparsekit.base import Backend
from sparsekit.contract import AttentionResult
from sparsekit import kernels
from sparsekit.reference import blockwise_attention
from sparsekit.rows import causal_pairs


@dataclass
class Dense(Backend):
    """Exact causal attention, bottom-right aligned: row i sees keys ``0 .. q_offset + i``."""

    name: ClassVar[str] = "dense"

    def pattern(self, q, k, *, scale=None, q_offset=0) -> torch.Tensor:
        pq = q_offset + torch.arange(q.shape[2], device=q.device)
        kj = torch.arange(k.shape[2], device=q.device)
        return kj[None, :] <= pq[:, None]

    def prefill(self, q, k, v, *, scale: float, q_offset: int) -> AttentionResult:
        fast = kernels.dense_attention(q, k, v, scale=scale, q_offset=q_offset)
        if fast is not None:
            return fast
        device = q.device

        def select(i0, i1):
            hi = q_offset + i1
            kj = torch.arange(hi, device=device)
            pq = q_offset + torch.arange(i0, i1, device=device)
            return kj, kj[None, :] <= pq[:, None]

        return blockwise_attention(q, k, v, scale=scale, select=select)

    def cost(self, nq: int, nk: int, q_offset: int) -> int:
        return causal_pairs(nq, q_offset)
