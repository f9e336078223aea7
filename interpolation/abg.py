"""Alpha-beta-gamma (Kalman-style) filter over the repeated Δ (Δ paper, App. J, Alg. 2, Table 8)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

from sparsekit.base import Interpolation

from ._filter import run_filter


@dataclass
class AlphaBetaGamma(Interpolation):
    """Track Δ with position x, velocity v and acceleration a, one row per time step:

    predict ``x' = x + v + a/2``, ``v' = v + a``; residual ``r = Δ_i - x'``;
    update ``x = x' + alpha r``, ``v = v' + beta r``, ``a = a + 2 gamma r``; output x.
    Starts at ``x = Δ_0, v = a = 0``. Defaults are the paper's best setting (0.2, 5e-2, 3.5e-3).
    Causal.
    """

    name: ClassVar[str] = "abg"
    alpha: float = 0.2
    beta: float = 5e-2
    gamma: float = 3.5e-3

    def __post_init__(self):
        for key in ("alpha", "beta", "gamma"):
            val = getattr(self, key)
            if isinstance(val, bool) or not isinstance(val, (int, float)) or not 0 <= val <= 2:
                raise ValueError(f"abg: {key} must be a float in [0, 2], got {val!r}")
            setattr(self, key, float(val))

    def spread(self, delta, gamma: int, n_body: int):
        import torch

        F = torch.tensor([[1.0, 1.0, 0.5], [0.0, 1.0, 1.0], [0.0, 0.0, 1.0]], dtype=torch.float64)
        K = torch.tensor([self.alpha, self.beta, 2 * self.gamma], dtype=torch.float64)
        H = torch.tensor([1.0, 0.0, 0.0], dtype=torch.float64)
        A = (torch.eye(3, dtype=torch.float64) - torch.outer(K, H)) @ F
        return run_filter(delta, gamma, n_body, A=A, b=K, c=H, s0=[1.0, 0.0, 0.0])
