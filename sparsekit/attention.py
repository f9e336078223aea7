"""SparseAttention: spec -> plan (patterns + chosen implementations) -> run -> (out, lse).

The whole composition in one place::

    plan = attn.plan(q, k)           # backend pattern, corrector rows, an implementation for each
    out, lse = attn.run(plan, q, k, v)
    out = attn(q, k, v)              # plan + run

A :class:`Plan` holds the backend's :class:`~sparsekit.pattern.Pattern` and the corrector's dense
rows (a second pattern over gathered rows), each with the executor's choice; its :meth:`Plan.cost`
is exact and :meth:`Plan.explain` says which implementation runs each step and why the others not.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Optional

import torch

from .contract import AttentionResult
from .executor import Choice, choose, write_into
from .pattern import Pattern
from .registry import BACKENDS
from .rows import causal_pairs
from .spec import SpecError, build, instantiate, is_plugin, parse_spec
from .validate import _check_layout, check_lengths, check_qk, check_qkv, to_bhnd

__all__ = ["SparseAttention", "Cost", "Plan"]


@dataclass(frozen=True)
class Cost:
    """Exact (query, key) pair counts per batch item and query head (a mean when heads differ)."""

    backend_pairs: float
    corrector_pairs: float
    dense_pairs: int

    @property
    def total_pairs(self):
        return self.backend_pairs + self.corrector_pairs

    @property
    def density(self) -> float:
        """Total pairs relative to dense causal attention of the same rows."""
        return self.total_pairs / self.dense_pairs if self.dense_pairs else 0.0

    @property
    def corrector_share(self) -> float:
        """The corrector's pairs relative to dense causal attention (its extra compute)."""
        return self.corrector_pairs / self.dense_pairs if self.dense_pairs else 0.0

    def __str__(self) -> str:
        def f(x):
            return f"{x:,}" if isinstance(x, int) else f"{x:,.1f}"

        return (
            f"backend {f(self.backend_pairs)} + corrector {f(self.corrector_pairs)} = "
            f"{f(self.total_pairs)} pairs of {self.dense_pairs:,} dense causal "
            f"(density {self.density:.2%})"
        )


@dataclass
class Plan:
    """Everything one call needs before it touches v: patterns, corrector rows, implementations.

    Attributes
    ----------
    spec : the SparseAttention spec string (formatted when read)
    batch, q_heads, kv_heads, nq, nk, head_dim, q_offset, scale, dtype, device : the call
    pattern : the backend's Pattern, or None when the corrector recomputes every row
    choice : the executor's choice for it
    rows : the corrector's row plan (``dense_rows()``, ``needs_sparse``), or None
    row_index : (R,) int64 on the device: the corrector's dense rows
    dense : Pattern of those rows over their causal prefix; ``dense_choice`` its implementation
    timings : seconds per planning step when planned with ``timings=True``
    """

    attention: object
    batch: int
    q_heads: int
    kv_heads: int
    nq: int
    nk: int
    head_dim: int
    q_offset: int
    scale: float
    dtype: torch.dtype
    device: torch.device
    pattern: Optional[Pattern] = None
    choice: Optional[Choice] = None
    rows: object = None
    row_index: Optional[torch.Tensor] = None
    dense: Optional[Pattern] = None
    dense_choice: Optional[Choice] = None
    timings: dict = field(default_factory=dict)
    corrector: object = None

    @property
    def spec(self) -> str:
        return str(self.attention)

    def cost(self) -> Cost:
        """Exact pairs of this plan per batch item and query head."""
        backend = self.pattern.mean_pairs() if self.pattern is not None else 0
        extra = self.dense.mean_pairs() if self.dense is not None else 0
        if self.corrector is not None and self.pattern is not None:
            extra = extra + self.corrector.complement_pairs(self.pattern)
        return Cost(backend, extra, causal_pairs(self.nq, self.q_offset))

    def implementations(self) -> dict:
        """Step -> implementation name."""
        out = {}
        if self.choice is not None:
            out["sparse"] = self.choice.impl.name
        if self.dense_choice is not None:
            out["dense rows"] = self.dense_choice.impl.name
        return out

    def explain(self) -> str:
        """Which implementation runs each step, and why each other one was refused."""
        lines = [f"{self.spec}: q [{self.batch}, {self.q_heads}, {self.nq}, {self.head_dim}] {self.dtype} on "
                 f"{self.device}, k/v [{self.batch}, {self.kv_heads}, {self.nk}, {self.head_dim}], "
                 f"q_offset={self.q_offset}"]
        if self.pattern is not None:
            lines.append(f"sparse: {self.pattern!r}")
            lines.append("  runs on " + self.choice.explain().replace("\n", "\n  "))
        if self.dense is not None:
            lines.append(f"dense rows ({self.dense.nq} rows of the corrector): {self.dense!r}")
            lines.append("  runs on " + self.dense_choice.explain().replace("\n", "\n  "))
        lines.append(f"cost: {self.cost()}")
        return "\n".join(lines)

    def check(self, q, k, v) -> None:
        got = (q.shape[0], q.shape[1], q.shape[2], k.shape[1], k.shape[2], q.shape[3])
        want = (self.batch, self.q_heads, self.nq, self.kv_heads, self.nk, self.head_dim)
        if got != want or q.dtype != self.dtype or q.device != self.device:
            raise ValueError(
                f"run: the plan is for q [{self.batch}, {self.q_heads}, {self.nq}, {self.head_dim}] and k/v "
                f"[{self.batch}, {self.kv_heads}, {self.nk}, {self.head_dim}] {self.dtype} on {self.device}; got q "
                f"{list(q.shape)}, k {list(k.shape)} {q.dtype} on {q.device}"
            )
        if v.shape != k.shape:
            raise ValueError(f"k and v must have the same shape, got k {list(k.shape)} and v {list(v.shape)}")


class _Clock:
    def __init__(self, on: bool, device):
        self.on, self.cuda, self.t = on, torch.device(device).type == "cuda", None
        if on:
            self.t = self._now()

    def _now(self):
        if self.cuda:
            torch.cuda.synchronize()
        return time.perf_counter()

    def __call__(self, store: dict, name: str):
        if self.on:
            t = self._now()
            store[name] = store.get(name, 0.0) + t - self.t
            self.t = t


class SparseAttention:
    """Sparse prefill attention with an optional corrector.

    >>> attn = SparseAttention(backend="streaming", corrector=Delta(gamma=64), window=2048, sink=1024)
    >>> out = attn(q, k, v)                        # doctest: +SKIP
    >>> out, lse = attn(q, k, v, return_lse=True)  # doctest: +SKIP

    Parameters
    ----------
    backend : str, dict or Backend
        A registry name (options as keyword arguments), a spec dict, or an instance.
        A whole spec string with a corrector goes to :meth:`from_string`.
    corrector : str, dict, Corrector or None
        E.g. ``Delta(gamma=64)``, ``"recompute"``, ``{"name": "delta", "gamma": 32}``.
    **options
        Backend options when ``backend`` is a name.
    """

    def __init__(self, backend="dense", corrector: Optional[object] = None, **options):
        if is_plugin(backend):
            if backend.kind != "backend":
                raise TypeError(f"expected a backend, got the {backend.kind} {backend.name!r}")
            if options:
                raise TypeError(
                    f"options {sorted(options)} given with a backend instance; set them on the instance"
                )
            self.backend = backend
        elif isinstance(backend, str) and "+" in backend:
            raise SpecError(
                f"{backend!r} holds a backend and a corrector: use SparseAttention.from_string({backend!r}), "
                "or SparseAttention(backend, corrector=...)"
            )
        elif isinstance(backend, str) and "(" not in backend:
            self.backend = instantiate(BACKENDS.get(backend), options, kind="backend")
        else:
            if options:
                raise TypeError(f"options {sorted(options)} given with a backend spec; put them in the spec")
            self.backend = build("backend", backend)
        self.corrector = None if corrector is None else build("corrector", corrector)

    # ------------------------------------------------------------------ plan / run
    def plan(self, q, k, *, scale=None, q_offset=None, impl=None, layout=None, timings: bool = False) -> Plan:
        """Everything before v: the backend's pattern (selection included), the corrector's rows,
        and an implementation for each.

        Parameters
        ----------
        q : (batch, q_heads, q_len, head_dim); k : (batch, kv_heads, kv_len, head_dim)
            (``[B, N, H, D]`` with ``layout="BNHD"``)
        scale : float, optional (default ``head_dim ** -0.5``)
        q_offset : int, optional (default ``kv_len - q_len``, bottom-right causal)
        impl : str or list, optional
            Restrict the implementations (names or families), as ``sparsekit.kernels.use`` does.
        timings : synchronise the device and record seconds per step in ``plan.timings``.
        """
        q, k, _, q_offset, scale = check_qk(q, k, q_offset=q_offset, scale=scale, layout=layout)
        return self._plan(q, k, q_offset=q_offset, scale=scale, impl=impl, timings=timings)

    def _plan(self, q, k, *, q_offset, scale, impl=None, timings=False, dispatch=True) -> Plan:
        reason = self.backend.unsupported(q, k, k)
        if reason:
            raise ValueError(f"backend {self.backend.name!r} cannot run these inputs: {reason}")
        B, Hq, nq, D = q.shape
        plan = Plan(self, B, Hq, k.shape[1], nq, k.shape[2], D, q_offset, scale, q.dtype, q.device,
                    corrector=self.corrector)
        clock = _Clock(timings, q.device)
        rows = self.corrector.rows(nq) if self.corrector is not None else None
        plan.rows = rows
        if rows is None or rows.needs_sparse:
            pat = self.backend.pattern(q, k, scale=scale, q_offset=q_offset)
            if not isinstance(pat, Pattern):
                raise TypeError(
                    f"backend {self.backend.name!r}: pattern() must return a sparsekit.Pattern, got {type(pat).__name__}"
                )
            if (pat.batch, pat.q_heads, pat.kv_heads, pat.nq, pat.nk) != (B, Hq, k.shape[1], nq, k.shape[2]):
                raise ValueError(f"backend {self.backend.name!r}: pattern() returned {pat!r} for q {list(q.shape)}, "
                                 f"k {list(k.shape)}")
            n_sparse = getattr(rows, "n_sparse", nq) if rows is not None else nq
            if 0 < n_sparse < nq:  # rows the corrector recomputes never need the backend's values
                pat = pat.head(n_sparse)
            plan.pattern = pat
            clock(plan.timings, "pattern")
            if dispatch:
                plan.choice = choose(pat, q, k, scale=scale, impl=impl)
                clock(plan.timings, "prepare sparse")
        if rows is not None:
            idx = rows.dense_rows()  # on the CPU: checked and planned there, copied to the device once
            plan.row_index = idx.to(q.device)
            if idx.numel():
                shape_only = q[:, :, :1].expand(B, Hq, idx.numel(), D)
                plan.dense = Pattern.gathered(shape_only, k, positions=idx + q_offset)
                if dispatch:
                    plan.dense_choice = choose(plan.dense, q, k, scale=scale, impl=impl)
                clock(plan.timings, "prepare dense rows")
        return plan

    def run(self, plan: Plan, q, k, v, *, layout=None, timings: Optional[dict] = None) -> AttentionResult:
        """Attention of q over k, v under ``plan`` (made by :meth:`plan` for tensors of these shapes).

        Returns an :class:`~sparsekit.AttentionResult` (``out, lse = ...``) in the input layout:
        out like q, lse (batch, q_heads, q_len) float32 natural log. ``timings``: a dict that
        receives seconds per step (synchronising the device).
        """
        lay, _ = _check_layout(layout)
        q, k, v = to_bhnd(q, lay), to_bhnd(k, lay), to_bhnd(v, lay)
        plan.check(q, k, v)
        clock = _Clock(timings is not None, q.device)
        sparse = None
        if plan.pattern is not None:
            impl, state = plan.choice.impl, plan.choice.state
            nb = plan.pattern.nq
            if nb < plan.nq:
                # the body's rows into buffers of every row: the corrector writes the rest in place
                B, H, N, D = q.shape
                if impl.out_layout == "BNHD":
                    buf = torch.empty(B, N, H, D, dtype=q.dtype, device=q.device).transpose(1, 2)
                else:
                    buf = torch.empty(B, H, N, D, dtype=q.dtype, device=q.device)
                lbuf = torch.empty(B, H, N, dtype=torch.float32, device=q.device)
                part = (buf[:, :, :nb], lbuf[:, :, :nb])
                write_into(impl.run(plan.pattern, state, q[:, :, :nb], k, v, scale=plan.scale, out=part), part)
                sparse = AttentionResult(buf, lbuf)
            else:
                sparse = impl.run(plan.pattern, state, q, k, v, scale=plan.scale)
            clock(timings, "sparse")
            if self.corrector is not None:
                nb = plan.pattern.nq
                self.corrector.complement(plan.pattern, sparse, q[:, :, :nb], k, v, scale=plan.scale)
                clock(timings, "complement")
        if self.corrector is None:
            res = sparse
        else:
            if plan.dense is not None:
                qr = q.index_select(2, plan.row_index)
                dense = plan.dense_choice.impl.run(plan.dense, plan.dense_choice.state, qr, k, v, scale=plan.scale)
            else:
                dense = AttentionResult(q.new_zeros(q.shape[0], q.shape[1], 0, q.shape[3]),
                                        torch.zeros(q.shape[0], q.shape[1], 0, device=q.device))
            clock(timings, "dense rows")
            res = self.corrector.combine(plan.rows, sparse, dense)
            clock(timings, "combine")
        if lay == "BNHD":
            res = AttentionResult(res.out.transpose(1, 2), res.lse)
        return res

    # ------------------------------------------------------------------ calling
    def __call__(self, q, k, v, *, scale=None, q_offset=None, return_lse: bool = False, impl=None, layout=None):
        """Attention of q over k, v: :meth:`plan` then :meth:`run`.

        Parameters
        ----------
        q : (batch, q_heads, q_len, head_dim)
        k, v : (batch, kv_heads, kv_len, head_dim); ``q_heads % kv_heads == 0``
            With ``layout="BNHD"``: q (batch, q_len, q_heads, head_dim), k/v likewise; out follows.
        scale : float, optional (default ``head_dim ** -0.5``)
        q_offset : int, optional
            Absolute position of query row 0 (default ``kv_len - q_len``, bottom-right causal).
        return_lse : bool
            Also return lse (batch, q_heads, q_len), float32, natural log.
        impl : str or list, optional
            Restrict the implementations (see :meth:`plan`).
        layout : "BHND" (default) or "BNHD"
        """
        res = self.forward(q, k, v, scale=scale, q_offset=q_offset, impl=impl, layout=layout)
        return (res.out, res.lse) if return_lse else res.out

    def forward(self, q, k, v, *, scale=None, q_offset=None, impl=None, layout=None) -> AttentionResult:
        """Like ``__call__`` but always returns an :class:`AttentionResult`."""
        qb, kb, vb, q_offset, scale = check_qkv(q, k, v, q_offset=q_offset, scale=scale, layout=layout)
        plan = self._plan(qb, kb, q_offset=q_offset, scale=scale, impl=impl)
        lay = _check_layout(layout)[0]
        return self.run(plan, q, k, v, layout=lay)

    def explain(self, q, k, v=None, *, scale=None, q_offset=None, impl=None, layout=None) -> str:
        """Which implementation would run each step for these inputs, and why the others would not."""
        return self.plan(q, k, scale=scale, q_offset=q_offset, impl=impl, layout=layout).explain()

    # ------------------------------------------------------------------ introspection
    def cost(self, nq: int, nk: Optional[int] = None, q_offset: Optional[int] = None) -> Cost:
        """Exact pair counts for ``nq`` query rows over ``nk`` keys (default ``nk = nq``).

        For a backend whose pattern depends on the data, use ``attn.plan(q, k).cost()``.
        """
        nq, nk, q_offset = check_lengths(nq, nk, q_offset)
        if self.backend.data_dependent and (self.corrector is None or self.corrector.rows(nq).needs_sparse):
            raise ValueError(
                f"backend {self.backend.name!r} selects keys from the values of q and k, so its cost depends on "
                "the data: use attn.plan(q, k).cost()"
            )
        from .base import _shape_only

        q, k = _shape_only(nq, nk)
        return self._plan(q, k, q_offset=q_offset, scale=1.0, dispatch=False).cost()

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
