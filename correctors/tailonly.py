"""Control corrector for ablations: the dense tail of Δ / recompute alone, no anchors."""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

from sparsekit.correctors.recompute import Recompute
from sparsekit.rows import RowPlan, default_tail
from sparsekit.validate import check_int_option


@dataclass
class TailOnly(Recompute):
    """Recompute only the dense tail that Δ(gamma) would recompute; every other row stays sparse.

    Willette, Lee, Hwang, "Δ Attention", NeurIPS 2025 (https://arxiv.org/abs/2505.11254):
    Δ and recompute also recompute the last ``nq % gamma + max(128, gamma)`` rows densely
    (the official code's ``cut_n``). This control keeps that tail and drops the strided
    anchors, so "Δ minus tail-only" isolates what the anchors and the correction add.
    The one remaining anchor is row 0, which sees only key 0 and is the same under any
    causal pattern that keeps the diagonal.

    The control of ``sparsekit eval`` and ``sparsekit demo``; registered like every first-party
    corrector (``"streaming(...)+tailonly(gamma=64)"``).
    """

    name: ClassVar[str] = "tailonly"
    control: ClassVar[bool] = True

    def rows(self, nq: int) -> RowPlan:
        nq = check_int_option(self.name, "nq", nq, 0)
        n_tail = default_tail(nq, self.gamma) if self.tail is None else min(nq, self.tail)
        return RowPlan(nq=nq, gamma=max(nq, 1), n_body=nq - n_tail)
