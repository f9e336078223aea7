"""Dense causal attention: the exact baseline every other backend is measured against."""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

from sparsekit.base import Backend
from sparsekit.pattern import Pattern


@dataclass
class Dense(Backend):
    """Exact causal attention, bottom-right aligned: row i sees keys ``0 .. q_offset + i``."""

    name: ClassVar[str] = "dense"

    def pattern(self, q, k, *, scale: float, q_offset: int) -> Pattern:
        return Pattern.causal(q, k, q_offset=q_offset)
