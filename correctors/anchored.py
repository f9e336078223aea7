"""The shared base of correctors whose key-dense rows are the Δ paper's anchors and tail (Δ, recompute, tail-only)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar, Optional

from sparsekit.base import Corrector
from sparsekit.contract import AttentionResult
from sparsekit.rows import RowPlan, plan_rows
from sparsekit.validate import check_int_option

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

    row_linear: ClassVar[bool] = True
    gamma: int = 64
    tail: Optional[int] = None

    def __post_init__(self):
        self.gamma = check_int_option(self.name, "gamma", self.gamma, 1)
        self.tail = check_int_option(self.name, "tail", self.tail, 0, allow_none=True)

    def rows(self, nq: int) -> RowPlan:
        return plan_rows(nq, self.gamma, self.tail)

    def combine(self, rows: RowPlan, sparse: Optional[AttentionResult], dense: AttentionResult) -> AttentionResult:
        if rows.n_body == 0:  # every row is in the dense tail
            return dense
        if sparse is None:
            raise ValueError(f"{self.name}: the backend result is required when the body is non-empty")
        return self.mix(rows, sparse, dense)

    def mix(self, rows: RowPlan, sparse: AttentionResult, dense: AttentionResult) -> AttentionResult:
        """The corrected result when some rows keep the backend's values (``rows.n_body > 0``)."""
        raise NotImplementedError
