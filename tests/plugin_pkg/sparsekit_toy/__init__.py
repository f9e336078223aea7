"""A third-party plug-in: a fixed block pattern and a toy interpolation. Uses only public API.

The backend writes one method, ``pattern``; running it on any device (the CPU reference, the
Triton pattern kernel, FlashInfer's paged fa3 on Hopper), its keep-mask and its cost come from
sparsekit.
"""

from dataclasses import dataclass
from typing import ClassVar

import torch

from sparsekit import Backend, Interpolation, Pattern


@dataclass
class Strided(Backend):
    """Each query block sees its ``local`` nearest key blocks and every ``stride``-th key block before."""

    name: ClassVar[str] = "strided"
    block_q: int = 128
    block_k: int = 64
    local: int = 4
    stride: int = 8

    def pattern(self, q, k, *, scale, q_offset):
        nq, nk, dev = q.shape[2], k.shape[2], q.device
        rows = torch.arange(0, nq, self.block_q, device=dev)
        first = (q_offset + rows) // self.block_k  # key block of each query block's first and last row
        last = (q_offset + torch.clamp(rows + self.block_q, max=nq) - 1) // self.block_k
        kb = torch.arange(-(-nk // self.block_k), device=dev)
        keep = (kb <= last[:, None]) & ((kb > first[:, None] - self.local) | (kb % self.stride == 0))
        blocks = torch.where(keep, kb, -1)[None, None]  # one list for every batch item and head
        return Pattern.from_blocks(q, k, q_offset=q_offset, block_q=self.block_q, block_k=self.block_k,
                                   blocks=blocks)


@dataclass
class HoldFirst(Interpolation):
    """Every body row gets the first anchor's Δ (a deliberately odd scheme)."""

    name: ClassVar[str] = "hold_first"

    def spread(self, delta, gamma, n_body):
        return delta[..., :1, :].expand(*delta.shape[:-2], n_body, delta.shape[-1])
