"""Shared machinery of correctors that compute anchor and tail rows key-dense (Δ, recompute)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch

from . import kernels
from .base import Corrector
from .contract import AttentionResult
from .rows import RowPlan, plan_rows
from .validate import check_int_option

__all__ = ["AnchoredCorrector"]


@dataclass
class AnchoredCorrector(Corrector):
    """Base for correctors whose dense rows follow :mod:`sparsekit.rows`.

    Parameters
    ----------
    gamma : int, >= 1
        Query stride: rows ``0, gamma, 2*gamma, ...`` of the body are computed key-dense.
    tail : int or None
        Dense tail rows at the end of the query block; None = ``nq % gamma + max(128, gamma)``.
    """

    gamma: int = 64
    tail: Optional[int] = None

    def __post_init__(self):
        check_int_option(self.name, "gamma", self.gamma, 1)
        check_int_option(self.name, "tail", self.tail, 0, allow_none=True)

    def plan(self, nq: int) -> RowPlan:
        return plan_rows(nq, self.gamma, self.tail)

    def needs_sparse(self, nq: int) -> bool:
        return self.plan(nq).n_body > 0

    def extra_cost(self, nq: int, nk: int, q_offset: int) -> int:
        return self.plan(nq).dense_pairs(q_offset)

    def dense_rows(self, plan: RowPlan, q, k, v, *, scale: float, q_offset: int):
        """``(rows, result)``: the anchor+tail row indices and their key-dense attention."""
        rows = plan.dense_rows(q.device)
        res = kernels.rows_attention(
            q.index_select(2, rows), k, v, positions=rows + q_offset, scale=scale
        )
        return rows, res

    def correct(self, sparse, q, k, v, *, scale: float, q_offset: int) -> AttentionResult:
        plan = self.plan(q.shape[2])
        rows, dense = self.dense_rows(plan, q, k, v, scale=scale, q_offset=q_offset)
        if plan.n_body == 0:  # every row is in the dense tail
            return dense
        if sparse is None:
            raise ValueError(f"{self.name}: the backend result is required when the body is non-empty")
        return self.combine(plan, rows, sparse, dense)

    def combine(self, plan: RowPlan, rows: torch.Tensor, sparse: AttentionResult, dense: AttentionResult) -> AttentionResult:
        raise NotImplementedError
