"""One executor: runs any :class:`~sparsekit.pattern.Pattern` with the best implementation that accepts it.

Implementations register like plug-ins, under the entry-point group ``sparsekit.kernels`` (the
first-party ones too: FlashInfer fa3, Triton, FlexAttention, the torch reference). Each says what it
accepts (:meth:`Implementation.refuse` returns a reason or None); dispatch tries them in ``rank``
order and keeps every refusal, so :meth:`Choice.explain` can say why a faster one did not run.

Forcing: ``with sparsekit.kernels.use("triton"): ...`` or ``attn(q, k, v, impl="triton")`` restricts
the candidates to the named implementations or families (``"flashinfer"``, ``"triton"``, ``"flex"``,
``"torch"``); a step that none of them accepts raises with every reason.
"""

from __future__ import annotations

import contextlib
import contextvars
import warnings
from dataclasses import dataclass, field
from typing import Any, ClassVar, Optional, Sequence, Union

import torch

from .contract import AttentionResult
from .registry import PluginConflictError, PluginLoadError, Registry

__all__ = [
    "Implementation",
    "Refused",
    "Choice",
    "IMPLEMENTATIONS",
    "implementations",
    "choose",
    "execute",
    "write_into",
    "use",
    "forced",
    "register_implementation",
]


class Refused(Exception):
    """Raised by :meth:`Implementation.prepare` when it finds out late that it cannot run a pattern."""


class Implementation:
    """One way to compute attention under a pattern.

    Subclass it, set ``name``, ``family`` and ``rank`` (lower runs first), implement the three
    methods, and register the class under the entry-point group ``sparsekit.kernels``.
    """

    name: ClassVar[str] = ""
    family: ClassVar[str] = ""
    rank: ClassVar[int] = 100
    #: the memory order it writes outputs in most cheaply: "BHND", or "BNHD" (FlashInfer's NHD)
    out_layout: ClassVar[str] = "BHND"

    @classmethod
    def available_reason(cls) -> Optional[str]:
        """Why this implementation cannot run on this machine at all (a missing package), or None."""
        return None

    def refuse(self, pattern, q, k) -> Optional[str]:
        """Why this implementation cannot run ``pattern`` for q (B, Hq, *, D) and k, or None.

        Called with the plan's q and k; read only their shape, dtype, device and strides.
        """
        raise NotImplementedError

    def prepare(self, pattern, q, k, *, scale: float) -> Any:
        """Plan-time work (index lists, kernel plans); the result is handed to :meth:`run`.

        May raise :class:`Refused` when the pattern turns out unsupported (dispatch moves on).
        """
        return None

    def run(self, pattern, state, q, k, v, *, scale: float, out=None) -> AttentionResult:
        """Attention of q (B, Hq, pattern.nq, D) over k, v (B, Hkv, pattern.nk, D) under ``pattern``.

        Returns out (B, Hq, nq, D) in q's dtype and lse (B, Hq, nq) float32 natural log over exactly
        the keys the pattern lets each row see (``-inf`` and out 0 for a row that sees none).
        ``out``: optional ``(out, lse)`` tensors of those shapes (views into larger buffers) to write
        the result into; an implementation that cannot write there returns its own tensors and the
        caller copies (:func:`write_into`).
        """
        raise NotImplementedError


IMPLEMENTATIONS = Registry("implementation", "sparsekit.kernels")


def register_implementation(name: str, cls: type) -> None:
    """Register an implementation in-process (entry points are the normal way)."""
    IMPLEMENTATIONS.register(name, cls)


_INSTANCES: dict = {}


def implementations() -> list:
    """Every implementation that loads, instantiated once, in rank order."""
    out = []
    for name in IMPLEMENTATIONS.names():
        try:
            cls = IMPLEMENTATIONS.get(name)
        except (PluginLoadError, PluginConflictError) as exc:
            warnings.warn(str(exc), RuntimeWarning, stacklevel=2)
            continue
        inst = _INSTANCES.get(cls)
        if inst is None:
            try:
                inst = _INSTANCES[cls] = cls()
            except Exception as exc:  # a broken third-party implementation must not stop the others
                warnings.warn(f"implementation {name!r} failed to start: {type(exc).__name__}: {exc}",
                              RuntimeWarning, stacklevel=2)
                continue
        out.append(inst)
    return sorted(out, key=lambda i: (i.rank, i.name))


# ---------------------------------------------------------------------------- forcing
_FORCED: contextvars.ContextVar = contextvars.ContextVar("sparsekit_forced_impl", default=None)


def _names(spec: Union[str, Sequence[str], None]) -> Optional[tuple]:
    if spec is None:
        return None
    if isinstance(spec, str):
        spec = [s for s in spec.replace(" ", "").split(",") if s]
    spec = tuple(spec)
    if not spec or any(not isinstance(s, str) for s in spec):
        raise TypeError(f"impl must be a name, a family or a list of them, got {spec!r}")
    if spec == ("auto",):
        return None
    known = {i.name for i in implementations()} | {i.family for i in implementations()}
    unknown = [s for s in spec if s not in known]
    if unknown:
        raise ValueError(f"unknown implementation(s) {unknown}; known: {', '.join(sorted(known))}")
    return spec


@contextlib.contextmanager
def use(impl: Union[str, Sequence[str]]):
    """Restrict dispatch inside a ``with`` block to implementations named (or of the families named)
    in ``impl``, e.g. ``use("triton")``, ``use("fa3_paged,triton")``; ``"auto"`` lifts the restriction."""
    token = _FORCED.set(_names(impl))
    try:
        yield
    finally:
        _FORCED.reset(token)


def forced() -> Optional[tuple]:
    """The names / families dispatch is restricted to here, or None."""
    return _FORCED.get()


# ---------------------------------------------------------------------------- dispatch
@dataclass
class Choice:
    """The implementation chosen for one pattern, its prepared state, and why the others were not."""

    impl: Implementation
    state: Any
    refused: dict = field(default_factory=dict)

    def explain(self) -> str:
        lines = [f"{self.impl.name} ({self.impl.family})"]
        for name, why in self.refused.items():
            lines.append(f"  not {name}: {why}")
        return "\n".join(lines)


def choose(pattern, q, k, *, scale: float, impl: Union[str, Sequence[str], None] = None) -> Choice:
    """Pick and prepare the first implementation (in rank order) that accepts ``pattern``.

    ``impl`` restricts the candidates (as :func:`use` does); the default reads :func:`use`'s setting.
    """
    allow = _names(impl) if impl is not None else forced()
    refused: dict = {}
    for cand in implementations():
        if allow is not None and cand.name not in allow and cand.family not in allow:
            refused[cand.name] = "not among the forced implementations " + ",".join(allow)
            continue
        try:
            why = cand.refuse(pattern, q, k)
        except Exception as exc:  # a refuse() that breaks is a refusal, with its reason
            why = f"refuse() raised {type(exc).__name__}: {exc}"
        if why:
            refused[cand.name] = why
            continue
        try:
            state = cand.prepare(pattern, q, k, scale=scale)
        except Refused as exc:
            refused[cand.name] = str(exc)
            continue
        return Choice(cand, state, refused)
    lines = "; ".join(f"{n}: {w}" for n, w in refused.items())
    raise RuntimeError(f"no implementation accepts {pattern!r}: {lines}")


def execute(pattern, q, k, v, *, scale: float, choice: Optional[Choice] = None,
            impl: Union[str, Sequence[str], None] = None, out=None) -> AttentionResult:
    """Attention under ``pattern`` (chooses an implementation unless ``choice`` is given).

    ``out``: optional ``(out, lse)`` tensors to hold the result (see :meth:`Implementation.run`).
    """
    if choice is None:
        choice = choose(pattern, q, k, scale=scale, impl=impl)
    res = choice.impl.run(pattern, choice.state, q, k, v, scale=scale, out=out)
    return write_into(res, out)


def write_into(res: AttentionResult, out) -> AttentionResult:
    """``res`` copied into the ``(out, lse)`` tensors unless it already lives there."""
    if out is None:
        return res
    o, l = out
    if res.out.data_ptr() != o.data_ptr() or res.out.stride() != o.stride():
        o.copy_(res.out)
    if res.lse.data_ptr() != l.data_ptr() or res.lse.stride() != l.stride():
        l.copy_(res.lse)
    return AttentionResult(o, l)


# helpers implementations share -----------------------------------------------------------------
def has_module(name: str) -> bool:
    import importlib.util

    try:
        return importlib.util.find_spec(name) is not None
    except (ImportError, ValueError):
        return False


def head_dim_reason(D: int, lo: int = 16, hi: int = 256) -> Optional[str]:
    if D < lo or D > hi or D & (D - 1):
        return f"head_dim {D} (needs a power of two in {lo}..{hi})"
    return None


def unit_stride_reason(*ts: torch.Tensor) -> Optional[str]:
    if any(t.stride(-1) != 1 for t in ts):
        return "head_dim is not the unit-stride axis"
    return None
