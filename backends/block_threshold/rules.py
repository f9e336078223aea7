"""Keep rules of ``block_threshold``: which scored key blocks a query block keeps.

Each reads the scorer's map ``P`` ``[B, G, R, n_kblocks]`` (a share of attention per key block,
rows summing to 1 over visible blocks) and returns a bool map of the same shape. The backend
adds the blocks it always keeps (sink, window, the last query block) afterwards.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch

from .pieces import KeepRule

__all__ = ["Relative", "Mass", "TopK"]


def _check_unit(owner: str, name: str, v, lo_open: bool = True) -> float:
    if isinstance(v, bool) or not isinstance(v, (int, float)):
        raise TypeError(f"{owner}: {name} must be a number in (0, 1], got {v!r}")
    v = float(v)
    if not (0.0 < v <= 1.0):
        raise ValueError(f"{owner}: {name} must be in (0, 1], got {v}")
    return v


@dataclass
class Relative(KeepRule):
    """FlashPrefill's max-relative threshold: keep block j iff ``P[j] >= alpha * max_j P[j]``.

    No sort, no cumulative sum: one max per (group, query block). ``alpha = 1`` keeps the best
    block(s) only; smaller keeps more.
    """

    name: ClassVar[str] = "relative"
    alpha: float = 0.1

    def __post_init__(self):
        self.alpha = _check_unit("relative", "alpha", self.alpha)

    def keep(self, P, visible):
        top = P.amax(dim=-1, keepdim=True)
        return (P >= self.alpha * top) & (P > 0) & visible


@dataclass
class Mass(KeepRule):
    """Cumulative mass (XAttention's / FlexPrefill's top-p): the fewest blocks whose shares sum to
    at least ``tau`` of the row, taken best first (ties: the lower block id first)."""

    name: ClassVar[str] = "mass"
    tau: float = 0.9

    def __post_init__(self):
        self.tau = _check_unit("mass", "tau", self.tau)

    def keep(self, P, visible):
        Pv = torch.where(visible, P, torch.zeros((), dtype=P.dtype, device=P.device))
        vals, order = torch.sort(Pv, dim=-1, descending=True, stable=True)
        total = vals.sum(dim=-1, keepdim=True)
        before = vals.cumsum(dim=-1) - vals  # mass of the better blocks
        take = (before < self.tau * total) & (vals > 0)
        out = torch.zeros_like(take)
        out.scatter_(-1, order, take)
        return out & visible


@dataclass
class TopK(KeepRule):
    """The ``k`` best visible blocks of each row (ties: the lower block id first)."""

    name: ClassVar[str] = "topk"
    k: int = 16

    def __post_init__(self):
        from sparsekit.validate import check_int_option

        self.k = check_int_option("topk", "k", self.k, 1)

    def keep(self, P, visible):
        n = min(self.k, P.shape[-1])
        Pv = torch.where(visible, P, torch.full((), -1.0, dtype=P.dtype, device=P.device))
        _, order = torch.sort(Pv, dim=-1, descending=True, stable=True)
        out = torch.zeros(P.shape, dtype=torch.bool, device=P.device)
        out.scatter_(-1, order[..., :n], True)
        return out & visible
