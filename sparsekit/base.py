"""What a plug-in owes: the three base classes.

A third-party package subclasses one of these as a ``@dataclass`` (its fields are its options),
sets ``name``, and registers it under the entry-point group ``sparsekit.backends``,
``sparsekit.correctors`` or ``sparsekit.interpolations``.

* a **backend** writes one method, :meth:`Backend.pattern`: which keys each query row sees, as a
  :class:`~sparsekit.pattern.Pattern`. Running it (on every device), its keep-mask and its cost
  come from sparsekit;
* a **corrector** says which rows it computes key-dense (:meth:`Corrector.rows`) and how it
  combines them with the backend's rows (:meth:`Corrector.combine`);
* an **interpolation** says how Δ measured at anchor rows spreads over the rows between them.
"""

from __future__ import annotations

from typing import ClassVar, Optional

import torch

from .contract import AttentionResult
from .spec import format_spec, option_names, to_dict

__all__ = ["Plugin", "Backend", "Corrector", "Interpolation", "option_names"]


class Plugin:
    """Shared behaviour: options are dataclass fields, printable as a spec string."""

    name: ClassVar[str] = ""
    kind: ClassVar[str] = ""

    def options(self) -> dict:
        """The plug-in's options as a plain dict (nested plug-ins as dicts)."""
        d = to_dict(self)
        d.pop("name")
        return d

    def __str__(self) -> str:
        return format_spec(self)


def _shape_only(nq: int, nk: int):
    """Stand-in q, k of the given lengths that hold no data (stride-0 views of one element)."""
    one = torch.zeros(1)
    return one.expand(1, 1, nq, 1), one.expand(1, 1, nk, 1)


class Backend(Plugin):
    """A sparse (or dense) prefill attention method: it says which keys each query row sees.

    Subclasses implement :meth:`pattern` only. :meth:`prefill` (run it through the executor on
    any device), :meth:`mask` (its keep-mask) and :meth:`cost` (its exact pair count) come from
    here. A backend whose pattern depends on the values of q and k (top-k selection, estimation)
    sets ``data_dependent = True``; its cost then comes from a plan
    (``SparseAttention.plan(q, k).cost()``).

    For ``sparsekit sweep`` (density vs quality) a backend may declare its default knob settings,
    :meth:`sweep` (none by default: the sweep then skips it unless given ``--specs``), and the curve a
    setting belongs to, :meth:`series` (its name by default). A ``reference_only`` backend's series
    named after the backend is the sweep's reference (the ``oracle``: the gap column).
    """

    kind: ClassVar[str] = "backend"
    data_dependent: ClassVar[bool] = False
    #: an analysis tool rather than a fast path (e.g. ``oracle``): ``sparsekit bench --backends all`` leaves it out
    reference_only: ClassVar[bool] = False

    def pattern(self, q, k, *, scale: float, q_offset: int):
        """Which keys each query row of q sees, as a :class:`~sparsekit.pattern.Pattern`.

        Parameters
        ----------
        q : (batch, q_heads, q_len, head_dim)
        k : (batch, kv_heads, kv_len, head_dim); ``q_heads % kv_heads == 0``
        scale : float
            The softmax scale (for backends that estimate attention to select keys).
        q_offset : int
            Row i sits at absolute position ``q_offset + i``; it may see keys ``0..q_offset + i``.

        Data-dependent selection (scoring, top-k) happens here. The pattern must be causal (the
        executor applies causality anyway) and be built on q's device.
        """
        raise NotImplementedError(f"backend {self.name!r} must implement pattern(q, k, *, scale, q_offset)")

    def unsupported(self, q, k, v) -> Optional[str]:
        """A reason this backend cannot run these inputs, or None. Checked before dispatch."""
        return None

    @classmethod
    def sweep(cls, n: int) -> list:
        """Default knob settings for ``sparsekit sweep`` at length ``n``, spanning densities of about
        1% to 50%: ``[{"series": str, "label": str, "options": dict}]``, ``options`` the constructor's
        keyword arguments, ``series`` the curve the setting belongs to (as :meth:`series` names it),
        ``label`` its name on that curve. ``[]`` (the default): none, the sweep skips the backend
        (settings can still be given as specs, ``sparsekit sweep --specs``)."""
        return []

    def series(self) -> str:
        """The sweep curve this setting belongs to when it is given as a spec: the backend's name by
        default; a backend with several knobs may name one curve per knob."""
        return self.name

    # ------------------------------------------------------------------ derived
    def prefill(self, q, k, v, *, scale: Optional[float] = None, q_offset: Optional[int] = None) -> AttentionResult:
        """Attention under :meth:`pattern`, by the executor (same shapes as ``SparseAttention``)."""
        from .attention import SparseAttention

        return SparseAttention(self).forward(q, k, v, scale=scale, q_offset=q_offset)

    def mask(self, q, k, *, scale: Optional[float] = None, q_offset: int = 0) -> torch.Tensor:
        """Boolean keep-mask ``[batch, q_heads, q_len, kv_len]`` of :meth:`pattern`. Small sizes only."""
        scale = q.shape[-1] ** -0.5 if scale is None else scale
        p = self.pattern(q, k, scale=scale, q_offset=q_offset)
        return p.expand(p.mask())

    def cost(self, nq: int, nk: Optional[int] = None, q_offset: Optional[int] = None):
        """(query, key) pairs attended per batch item and query head, for ``nq`` rows over ``nk`` keys.

        Only for patterns that do not depend on the data; otherwise use ``plan(q, k).cost()``.
        """
        from .attention import SparseAttention

        return SparseAttention(self).cost(nq, nk, q_offset).backend_pairs


class Corrector(Plugin):
    """Corrects a backend's result with rows computed over their whole causal prefix.

    Subclasses implement :meth:`rows` (which rows are computed key-dense: an object with
    ``dense_rows(device) -> LongTensor`` ascending, ``needs_sparse: bool`` and ``n_sparse: int``,
    the rows ``0..n_sparse-1`` whose backend values it reads, such as
    :class:`~sparsekit.rows.RowPlan`) and :meth:`combine`. sparsekit computes those rows with the
    same executor as the backend and never tells the corrector which backend it wraps.

    ``row_linear = True`` declares that :meth:`combine`'s output rows are a fixed linear mix of
    sparse and dense rows, channel by channel (true of Δ, recompute, tail-only); the fidelity probe
    of ``sparsekit eval`` reads effective attention rows through it. A corrector that is not (its
    weights depend on the data, e.g. ``meancorr``) may give them itself as
    ``effective_rows(pattern, q, k, *, scale, rows) -> [batch, q_heads, len(rows), kv_len]`` float64;
    without it the probe skips its rank correlation.
    """

    kind: ClassVar[str] = "corrector"
    row_linear: ClassVar[bool] = False
    #: a control of ablations rather than a correction (it only recomputes rows; e.g. ``tailonly``):
    #: ``sparsekit eval`` compares the other correctors of a backend against it
    control: ClassVar[bool] = False

    def rows(self, nq: int):
        """Which of ``nq`` query rows are computed key-dense (see the class docstring)."""
        raise NotImplementedError(f"corrector {self.name!r} must implement rows(nq)")

    def complement(self, pattern, sparse: AttentionResult, q, k, v, *, scale: float) -> None:
        """Fold an estimate of the keys the backend skipped into its rows, in place (optional).

        Called once per call, after the backend ran and before :meth:`combine`, when the corrector
        reads backend rows. The default does nothing. A corrector that estimates the skipped part
        of each row's softmax (e.g. ``meancorr``) merges it into ``sparse`` through lse here and
        counts its work in :meth:`complement_pairs`. ``sparse`` may be the implementation's own
        result or views of larger buffers, in any memory layout (``out`` may be ``[B, N, H, D]``
        underneath): write through the given tensors.

        Parameters
        ----------
        pattern : the backend's :class:`~sparsekit.pattern.Pattern` over rows ``0..pattern.nq-1``
        sparse : (batch, q_heads, >= pattern.nq, ·) buffers; rows ``0..pattern.nq-1`` hold the
            backend's values and are updated in place (``out`` and ``lse``)
        q : (batch, q_heads, pattern.nq, head_dim), the rows of ``pattern``
        k, v : (batch, kv_heads, kv_len, head_dim)
        """
        return None

    def complement_pairs(self, pattern) -> float:
        """(row, key-or-summary) pairs :meth:`complement` evaluates per batch item and query head
        (a mean over them when heads differ); :meth:`Plan.cost <sparsekit.attention.Plan.cost>` adds
        them to the corrector's pairs."""
        return 0

    def combine(self, rows, sparse: Optional[AttentionResult], dense: AttentionResult) -> AttentionResult:
        """The corrected result.

        Parameters
        ----------
        rows : what :meth:`rows` returned for this call
        sparse : the backend's result, (batch, q_heads, q_len, ·): rows ``0..rows.n_sparse-1`` hold
            the backend's values, later rows are not computed (the buffer is there so the corrector can
            write every row in place); None when ``rows.needs_sparse`` is False
        dense : the key-dense rows ``rows.dense_rows()``, in that order, (batch, q_heads, R, ·)
        """
        raise NotImplementedError(f"corrector {self.name!r} must implement combine(rows, sparse, dense)")


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
        raise NotImplementedError(f"interpolation {self.name!r} must implement spread(delta, gamma, n_body)")
