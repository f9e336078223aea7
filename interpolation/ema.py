"""Exponential moving average over the repeated Δ (Δ paper, App. J, Table 8)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

from sparsekit.base import Interpolation

from ._filter import run_filter


@dataclass
class EMA(Interpolation):
    """Repeat Δ γ times, then ``Δ̂_i = (1 - beta) Δ̂_{i-1} + beta Δ_i`` row by row (``Δ̂_{-1} = Δ_0``).

    Causal. The paper tries beta in {0.5, 0.75, 0.95}.
    """

    name: ClassVar[str] = "ema"
    beta: float = 0.75

    def __post_init__(self):
        if isinstance(self.beta, bool) or not isinstance(self.beta, (int, float)) or not 0 < self.beta <= 1:
            raise ValueError(f"ema: beta must be a float in (0, 1], got {self.beta!r}")
        self.beta = float(self.beta)

    def spread(self, delta, gamma: int, n_body: int):
        return run_filter(delta, gamma, n_body, A=[[1 - self.beta]], b=[self.beta], c=[1.0], s0=[1.0])
