"""What a plug-in owes: the three base classes.

A third-party package subclasses one of these as a ``@dataclass`` (its fields are its
options), sets ``name``, and registers it under the entry-point group
``sparsekit.backends``, ``sparsekit.correctors`` or ``sparsekit.interpolations``.
"""

from __future__ import annotations

import dataclasses
from typing import ClassVar, Optional

import torch

from .contract import AttentionResult

__all__ = ["Plugin", "Backend", "Corrector", "Interpolation"]


class Plugin:
    """Shared behaviour: options are dataclass fields, printable as a spec string."""

    name: ClassVar[str] = ""
    kind: ClassVar[str] = ""

    def options(self) -> dict:
        """The plug-in's options as a plain dict (nested plug-ins as dicts)."""
        from .spec import to_dict

        d = to_dict(self)
        d.pop("name")
        return d

    def __str__(self) -> str:
        from .spec import format_spec

        return format_spec(self)


class Backend(Plugin):
    """A sparse (or dense) prefill attention method.

    Subclasses implement :meth:`prefill` and :meth:`pattern`; :meth:`pattern` is the
    exact truth of which key each query row sees, used by the CPU reference and tests.
    """

    kind: ClassVar[str] = "backend"

    def prefill(self, q, k, v, *, scale: float, q_offset: int) -> AttentionResult:
        """Attention of every query row over the keys this backend selects.

        Parameters
        ----------
        q : (batch, q_heads, q_len, head_dim)
        k, v : (batch, kv_heads, kv_len, head_dim); ``q_heads % kv_heads == 0``
        scale : float
        q_offset : int
            Row i is at absolute position ``q_offset + i``; it may see keys ``0..q_offset + i``.

        Returns
        -------
        AttentionResult with out (batch, q_heads, q_len, head_dim) in q's dtype and
        lse (batch, q_heads, q_len) float32, natural log, over exactly the attended keys.
        """
        raise NotImplementedError

    def pattern(self, q, k, *, scale: float, q_offset: int) -> torch.Tensor:
        """Boolean keep-mask broadcastable to (batch, q_heads, q_len, kv_len). Small sizes only."""
        raise NotImplementedError

    def cost(self, nq: int, nk: int, q_offset: int) -> int:
        """(query, key) pairs attended per batch item and query head."""
        raise NotImplementedError

    def unsupported(self, q, k, v) -> Optional[str]:
        """A reason this backend cannot run these inputs, or None. Checked before dispatch."""
        return None


class Corrector(Plugin):
    """Wraps any backend's result and corrects it with key-dense rows."""

    kind: ClassVar[str] = "corrector"

    def needs_sparse(self, nq: int) -> bool:
        """Whether :meth:`correct` uses the backend's result at all for ``nq`` rows."""
        return True

    def correct(
        self, sparse: Optional[AttentionResult], q, k, v, *, scale: float, q_offset: int
    ) -> AttentionResult:
        """Return the corrected result; ``sparse`` is None when :meth:`needs_sparse` is False."""
        raise NotImplementedError

    def extra_cost(self, nq: int, nk: int, q_offset: int) -> int:
        """(query, key) pairs the corrector attends on top of the backend, per batch and head."""
        raise NotImplementedError


class Interpolation(Plugin):
    """How the Δ measured at anchor rows is spread over the rows of the body."""

    kind: ClassVar[str] = "interpolation"

    def spread(self, delta: torch.Tensor, gamma: int, n_body: int) -> torch.Tensor:
        """Per-row correction.

        Parameters
        ----------
        delta : (..., n_blocks, C)
            Δ at each anchor row (row ``j * gamma``), ``n_blocks = ceil(n_body / gamma)``.
        gamma : int
        n_body : int

        Returns
        -------
        (..., n_body, C): the correction added to each body row. Anchor rows are
        overwritten with the exact dense row afterwards, whatever this returns there.
        """
        raise NotImplementedError


def option_names(cls) -> list[str]:
    return [f.name for f in dataclasses.fields(cls)] if dataclasses.is_dataclass(cls) else []
