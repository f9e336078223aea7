"""A third-party plug-in: a window without sinks, and a toy interpolation. Uses only public API."""

from dataclasses import dataclass
from typing import ClassVar

import torch

from sparsekit import Backend, Interpolation
from sparsekit.reference import blockwise_attention


@dataclass
class LocalOnly(Backend):
    """Each query sees the last ``window`` keys up to itself, nothing else."""

    name: ClassVar[str] = "local_only"
    window: int = 16

    def pattern(self, q, k, *, scale=None, q_offset=0):
        pq = q_offset + torch.arange(q.shape[2])[:, None]
        kj = torch.arange(k.shape[2])[None, :]
        return (kj <= pq) & (kj > pq - self.window)

    def prefill(self, q, k, v, *, scale, q_offset):
        def select(i0, i1):
            kj = torch.arange(max(0, q_offset + i0 - self.window + 1), q_offset + i1)
            pq = q_offset + torch.arange(i0, i1)
            return kj, (kj[None, :] <= pq[:, None]) & (kj[None, :] > pq[:, None] - self.window)

        return blockwise_attention(q, k, v, scale=scale, select=select)

    def cost(self, nq, nk, q_offset):
        return sum(min(self.window, q_offset + i + 1) for i in range(nq))


@dataclass
class HoldFirst(Interpolation):
    """Every body row gets the first anchor's Δ (a deliberately odd scheme)."""

    name: ClassVar[str] = "hold_first"

    def spread(self, delta, gamma, n_body):
        return delta[..., :1, :].expand(*delta.shape[:-2], n_body, delta.shape[-1])
