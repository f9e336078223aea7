"""sparsekit: sparse long-context prefill with Δ correction.

Any sparse backend x any corrector, one ``(out, lse)`` contract::

    from sparsekit import SparseAttention, Delta
    attn = SparseAttention(backend="streaming", corrector=Delta(gamma=64), window=2048, sink=1024)
    out = attn(q, k, v)            # q [B, Hq, Nq, D], k/v [B, Hkv, Nk, D]

A backend describes which keys each query sees (a :class:`Pattern`), a corrector says which rows
to fix and how, and sparsekit decides how to compute it (``attn.plan(q, k)``, ``attn.run(plan, q, k, v)``,
``attn.explain(q, k)``).
"""

from .attention import Cost, Plan, SparseAttention
from .base import Backend, Corrector, Interpolation
from .contract import AttentionResult, merge, merge_many
from .executor import Implementation
from .pattern import Pattern
from .registry import (
    PluginConflictError,
    PluginLoadError,
    available_backends,
    available_correctors,
    available_interpolations,
    register_backend,
    register_corrector,
    register_interpolation,
)
from .rows import RowPlan, plan_rows

__version__ = "0.2.0"


# first-party correctors live in the plug-in package sparsekit.correctors (registered by entry point too)
from .correctors.delta import Delta  # noqa: E402
from .correctors.recompute import Recompute  # noqa: E402
from .correctors.tailonly import TailOnly  # noqa: E402
from .correctors.meancorr import MeanCorr  # noqa: E402

__all__ = [
    "SparseAttention",
    "Plan",
    "Cost",
    "Pattern",
    "Implementation",
    "Delta",
    "Recompute",
    "TailOnly",
    "MeanCorr",
    "Backend",
    "Corrector",
    "Interpolation",
    "AttentionResult",
    "merge",
    "merge_many",
    "RowPlan",
    "plan_rows",
    "available_backends",
    "available_correctors",
    "available_interpolations",
    "register_backend",
    "register_corrector",
    "register_interpolation",
    "PluginLoadError",
    "PluginConflictError",
]
