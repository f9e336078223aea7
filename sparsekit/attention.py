"""SparseAttention: resolve spec -> validate -> backend -> corrector -> (out, lse)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

from .base import Backend, Corrector
from .contract import AttentionResult
from .spec import SpecError, build, instantiate, parse_spec
from .registry import BACKENDS
from .rows import causal_pairs
from .validate import check_qkv

__all__ = ["SparseAttention", "Cost"]


@dataclass(frozen=True)
class Cost:
    """Exact (query, key) pair counts per batch item and query head."""

    backend_pairs: int
    corrector_pairs: int
    dense_pairs: int

    @property
    def total_pairs(self) -> int:
        return self.backend_pairs + self.corrector_pairs

    @property
    def density(self) -> float:
        """Total pairs relative to dense causal attention of the same rows."""
        return self.total_pairs / self.dense_pairs if self.dense_pairs else 0.0

    def __str__(self) -> str:
        return (
            f"backend {self.backend_pairs:,} + corrector {self.corrector_pairs:,} = "
            f"{self.total_pairs:,} pairs of {self.dense_pairs:,} dense causal "
            f"(density {self.density:.2%})"
        )


class SparseAttention:
    """Sparse prefill attention with an optional corrector.

    >>> attn = SparseAttention(backend="streaming", corrector=Delta(gamma=64), window=2048, sink=1024)
    >>> out = attn(q, k, v)                        # doctest: +SKIP
    >>> out, lse = attn(q, k, v, return_lse=True)  # doctest: +SKIP

    Parameters
    ----------
    backend : str, dict or Backend
        A registry name (options as keyword arguments), a spec dict, or an instance.
    corrector : str, dict, Corrector or None
        E.g. ``Delta(gamma=64)``, ``"recompute"``, ``{"name": "delta", "gamma": 32}``.
    **options
        Backend options when ``backend`` is a name.
    """

    def __init__(self, backend="dense", corrector: Optional[object] = None, **options):
        if isinstance(backend, Backend):
            if options:
                raise TypeError(
                    f"options {sorted(options)} given with a backend instance; set them on the instance"
                )
            self.backend = backend
        elif isinstance(backend, str) and "(" not in backend and "+" not in backend:
            self.backend = instantiate(BACKENDS.get(backend), options)
        else:
            if options:
                raise TypeError(f"options {sorted(options)} given with a backend spec; put them in the spec")
            self.backend = build("backend", backend)
        self.corrector: Optional[Corrector] = None if corrector is None else build("corrector", corrector)

    # ------------------------------------------------------------------ calling
    def __call__(self, q, k, v, *, scale=None, q_offset=None, return_lse: bool = False):
        """Attention of q over k, v.

        Parameters
        ----------
        q : (batch, q_heads, q_len, head_dim)
        k, v : (batch, kv_heads, kv_len, head_dim); ``q_heads % kv_heads == 0``
        scale : float, optional (default ``head_dim ** -0.5``)
        q_offset : int, optional
            Absolute position of query row 0 (default ``kv_len - q_len``, bottom-right causal).
        return_lse : bool
            Also return lse (batch, q_heads, q_len), float32, natural log.
        """
        res = self.forward(q, k, v, scale=scale, q_offset=q_offset)
        return (res.out, res.lse) if return_lse else res.out

    def forward(self, q, k, v, *, scale=None, q_offset=None) -> AttentionResult:
        """Like ``__call__`` but always returns an :class:`AttentionResult`."""
        q_offset, scale = check_qkv(q, k, v, q_offset=q_offset, scale=scale)
        reason = self.backend.unsupported(q, k, v)
        if reason:
            raise ValueError(f"backend {self.backend.name!r} cannot run these inputs: {reason}")
        if self.corrector is None:
            return self.backend.prefill(q, k, v, scale=scale, q_offset=q_offset)
        nq = q.shape[2]
        sparse = None
        if self.corrector.needs_sparse(nq):
            sparse = self.backend.prefill(q, k, v, scale=scale, q_offset=q_offset)
        return self.corrector.correct(sparse, q, k, v, scale=scale, q_offset=q_offset)

    # ------------------------------------------------------------------ introspection
    def cost(self, nq: int, nk: Optional[int] = None, q_offset: Optional[int] = None) -> Cost:
        """Exact pair counts for ``nq`` query rows over ``nk`` keys (default ``nk = nq``)."""
        nk = nq if nk is None else nk
        q_offset = nk - nq if q_offset is None else q_offset
        if nq < 1 or q_offset < 0 or q_offset + nq > nk:
            raise ValueError(f"cost: need nq >= 1, q_offset >= 0 and q_offset + nq <= nk; got {nq}, {q_offset}, {nk}")
        use_backend = self.corrector is None or self.corrector.needs_sparse(nq)
        backend = self.backend.cost(nq, nk, q_offset) if use_backend else 0
        extra = self.corrector.extra_cost(nq, nk, q_offset) if self.corrector else 0
        return Cost(backend, extra, causal_pairs(nq, q_offset))

    # ------------------------------------------------------------------ specs
    def to_dict(self) -> dict:
        from .spec import to_dict

        return {
            "backend": to_dict(self.backend),
            "corrector": None if self.corrector is None else to_dict(self.corrector),
        }

    @classmethod
    def from_dict(cls, d: dict) -> "SparseAttention":
        if not isinstance(d, dict) or "backend" not in d:
            raise SpecError(f"expected a dict with keys 'backend' and 'corrector', got {d!r}")
        extra = set(d) - {"backend", "corrector"}
        if extra:
            raise SpecError(f"unknown keys {sorted(extra)} in SparseAttention dict")
        return cls(backend=d["backend"], corrector=d.get("corrector"))

    @classmethod
    def from_string(cls, text: str) -> "SparseAttention":
        """``"streaming(window=2048,sink=1024)+delta(gamma=64)"`` -> SparseAttention."""
        parts = parse_spec(text)
        if len(parts) > 2:
            raise SpecError(f"expected 'backend' or 'backend+corrector', got {len(parts)} parts in {text!r}")
        return cls(backend=parts[0], corrector=parts[1] if len(parts) == 2 else None)

    def __str__(self) -> str:
        from .spec import format_spec

        return format_spec(self.backend, self.corrector)

    def __repr__(self) -> str:
        return f"SparseAttention({str(self)!r})"

    def __eq__(self, other) -> bool:
        return isinstance(other, SparseAttention) and self.to_dict() == other.to_dict()
