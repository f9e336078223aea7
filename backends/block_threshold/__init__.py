"""Block-threshold sparse prefill: score key blocks cheaply, keep them by a rule (a package).

The family of FlashPrefill (Fan et al., arXiv 2603.06199; V2 arXiv 2608.19758), XAttention
(Xu et al., ICML 2025, arXiv 2503.16428) and FlexPrefill (Lai et al., ICLR 2025, arXiv
2502.20766): training-free, per (group, query block) a share of attention is estimated for every
key block by a **scorer**, and a **keep rule** picks blocks from those shares. Our own code,
from the papers; ``docs/block_threshold.md`` states the exact semantics. In short:

* **grid**: query block ``b`` = call rows ``[b*block_q, (b+1)*block_q)``; key block ``j`` = keys
  ``[j*block_k, (j+1)*block_k)``; key block ``j`` is *visible* to query block ``b`` when
  ``j*block_k <= P_b`` (``P_b``: the absolute position of the block's last row).
* **groups**: with ``share_kv=True`` the query heads of a KV head share one selection (their
  shares are averaged), so FlashInfer packs them into one tile; else one selection per query head.
* **scorer** (:mod:`.scorers`): ``pooled``, ``antidiagonal(stride=S)`` or ``vslash``; a map ``P``
  of shares per (group, query block, key block), rows summing to 1 over visible blocks.
* **keep rule** (:mod:`.rules`): ``relative(alpha)`` (``P >= alpha * max P``, no sort),
  ``mass(tau)`` (fewest best blocks reaching ``tau`` of the mass) or ``topk(k)``.
* ``budget`` (keys, optional): at most ``budget // block_k`` rule-kept blocks per query block
  (the best shares; ties: the lower id).
* **always kept**: the sink blocks ``j < ceil(sink / block_k)``, the window blocks
  ``j >= floor(max(0, F_b - window + 1) / block_k)`` (``F_b``: the block's first position; so every
  row sees at least its last ``window`` keys, the diagonal included) and, for the last
  ``dense_last`` query blocks of the call, every visible block (the rows decode reads first).
* **short prompts**: when the call has fewer than ``min_len`` query rows the pattern is dense
  causal (a sparse pass cannot pay for its scoring there).
* row ``p`` of query block ``b`` attends key ``j`` iff ``j <= p`` and ``j``'s block is kept for
  ``(group, b)``. The attention runs through sparsekit's executor like every pattern.

Scorers and rules are registered pieces (entry-point groups ``sparsekit.block_scorers`` and
``sparsekit.block_rules``); a third party adds one with a dataclass and an entry point.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar, Optional

import torch

from sparsekit.base import Backend
from sparsekit.pattern import Pattern
from sparsekit.validate import MAX_TOKENS, check_int_option

from .pieces import RULES, SCORERS, BlockScorer, Geometry, KeepRule, build_piece
from .scorers import _rows_per_chunk

__all__ = ["BlockThreshold", "select", "Geometry", "BlockScorer", "KeepRule", "SCORERS", "RULES"]


@dataclass
class BlockThreshold(Backend):
    """Block-threshold selection (module docstring for the exact rule).

    Parameters
    ----------
    scorer : str
        ``"pooled"``, ``"vslash"``, ``"antidiagonal(stride=8)"`` or any registered block scorer.
    rule : str
        ``"relative(alpha=...)"``, ``"mass(tau=...)"``, ``"topk(k=...)"`` or any registered keep rule.
    block_q, block_k : int
        Query-block and key-block sizes of the selection and the attention.
    sink, window : int
        Keys every row sees at the start (rounded up to key blocks) and at least the last ``window``
        keys of every row (window start rounded down to a key block).
    budget : int or None
        At most this many rule-kept keys per query block (rounded down to blocks); None: no cap.
    min_len : int
        Calls with fewer query rows run dense causal. Default 32768: on an H200 (Llama-3.1-8B layer shape,
        structured inputs) the sparse path's scoring and kernel planning cost more than they save at 16K
        (4.6 ms against dense fa3's 3.1) and it is 1.5x faster at 32K (``bench/results/h200/block_threshold/``).
    dense_last : int
        The last ``dense_last`` query blocks keep every visible key block.
    share_kv : bool
        One selection per KV head (True) or per query head (False).
    """

    name: ClassVar[str] = "block_threshold"
    data_dependent: ClassVar[bool] = True
    scorer: str = "pooled"
    rule: str = "relative(alpha=0.1)"
    block_q: int = 128
    block_k: int = 128
    sink: int = 128
    window: int = 1024
    budget: Optional[int] = None
    min_len: int = 32768
    dense_last: int = 1
    share_kv: bool = True

    def __post_init__(self):
        n = "block_threshold"
        self.block_q = check_int_option(n, "block_q", self.block_q, 1, maximum=MAX_TOKENS)
        self.block_k = check_int_option(n, "block_k", self.block_k, 1, maximum=MAX_TOKENS)
        self.sink = check_int_option(n, "sink", self.sink, 0, maximum=MAX_TOKENS)
        self.window = check_int_option(n, "window", self.window, 1, maximum=MAX_TOKENS)
        self.budget = check_int_option(n, "budget", self.budget, 0, maximum=MAX_TOKENS, allow_none=True)
        self.min_len = check_int_option(n, "min_len", self.min_len, 0, maximum=MAX_TOKENS)
        self.dense_last = check_int_option(n, "dense_last", self.dense_last, 0, maximum=MAX_TOKENS)
        if not isinstance(self.share_kv, bool):
            raise TypeError(f"{n}: share_kv must be a bool, got {self.share_kv!r}")
        self._scorer = build_piece(SCORERS, BlockScorer, self.scorer, n, "scorer")
        self._rule = build_piece(RULES, KeepRule, self.rule, n, "rule")
        self._scorer.check(self.block_q, self.block_k)
        self.scorer, self.rule = str(self._scorer), str(self._rule)

    #: the scorers of :meth:`sweep`'s default settings
    sweep_scorers: ClassVar[tuple] = ("pooled", "vslash", "antidiagonal(stride=8)")

    @classmethod
    def sweep(cls, n: int, scorers=None) -> list:
        """``sparsekit sweep``'s settings, for each of ``scorers`` (default :attr:`sweep_scorers`; ``sparsekit
        sweep --scorers`` passes its own): ``alpha`` 0.5..0.005, ``tau`` 0.3..0.98 and a ``budget`` of ``n / 256``
        to ``n / 4`` keys (rule ``relative(alpha=0.001)``: the budget alone decides); one curve per scorer and
        knob. Blocks of 64 up to 32K, 128 above (at 16K a 128-key grid cannot go below ~4% density: sink,
        window and diagonal blocks alone), sink one block, window ``n / 256``, ``min_len=0``, ``dense_last=0``
        (every density is the selection's own)."""
        bs = 64 if n <= 32768 else 128
        common = dict(block_q=bs, block_k=bs, sink=bs, window=max(bs, n // 256), min_len=0, dense_last=0)
        out = []
        for sc in cls.sweep_scorers if scorers is None else scorers:
            short = sc.split("(")[0]
            for a in (0.5, 0.3, 0.2, 0.1, 0.05, 0.03, 0.02, 0.01, 0.005):
                out.append(dict(series=f"{cls.name} {short} alpha", label=f"alpha={a}",
                                options=dict(scorer=sc, rule=f"relative(alpha={a})", **common)))
            for t in (0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9, 0.95, 0.98):
                out.append(dict(series=f"{cls.name} {short} tau", label=f"tau={t}",
                                options=dict(scorer=sc, rule=f"mass(tau={t})", **common)))
            for f in (1 / 256, 1 / 128, 1 / 64, 1 / 32, 1 / 16, 1 / 8, 1 / 4):
                bud = max(bs, int(round(f * n / bs)) * bs)
                out.append(dict(series=f"{cls.name} {short} budget", label=f"budget={bud}",
                                options=dict(scorer=sc, rule="relative(alpha=0.001)", budget=bud, **common)))
        return out

    def series(self) -> str:
        """The sweep curve: ``"block_threshold SCORER KNOB"``, the scorer without its options and the knob
        ``budget`` (a budget is set), ``alpha`` (relative rule), ``tau`` (mass rule) or the rule's name."""
        rule = self.rule.split("(")[0]
        knob = "budget" if self.budget is not None else {"relative": "alpha", "mass": "tau"}.get(rule, rule)
        return f"{self.name} {self.scorer.split('(')[0]} {knob}"

    def pattern(self, q, k, *, scale: float, q_offset: int) -> Pattern:
        if q.shape[2] < self.min_len:
            return Pattern.causal(q, k, q_offset=q_offset)
        indptr, indices, groups = select(self, q, k, q_offset, scale=scale)
        return Pattern.from_blocks(q, k, q_offset=q_offset, block_q=self.block_q, block_k=self.block_k,
                                   blocks=(indptr, indices), groups=groups, sorted_unique=True)

    # ------------------------------------------------------------------ geometry
    def geometry(self, q, k, q_offset: int, scale: float) -> Geometry:
        B, Hq, nq, _ = q.shape
        Hkv, nk = k.shape[1], k.shape[2]
        return Geometry(B, Hq, Hkv, Hkv if self.share_kv else Hq, nq, nk, q_offset, self.block_q, self.block_k,
                        float(scale), q.device)

    def forced(self, geo: Geometry, qb0: int, qb1: int) -> torch.Tensor:
        """bool ``[qb1 - qb0, n_kblocks]``: the blocks kept whatever the scores (sink, window, dense last)."""
        kb = torch.arange(geo.n_kblocks, device=geo.device)
        n_sink = -(-self.sink // self.block_k)
        w0 = torch.clamp(geo.first_pos(qb0, qb1) - self.window + 1, min=0) // self.block_k
        f = (kb[None, :] < n_sink) | (kb[None, :] >= w0[:, None])
        if self.dense_last:
            last = torch.arange(qb0, qb1, device=geo.device) >= geo.n_qblocks - self.dense_last
            f = f | last[:, None]
        return f & geo.visible(qb0, qb1)


def select(bt: BlockThreshold, q, k, q_offset: int, *, scale: float, scorer_impl: str = "auto",
           trace: Optional[dict] = None):
    """The kept blocks as CSR: ``(indptr (B*G*n_qblocks + 1,) int64, indices int32, (B, G))``.

    Lists ascend. ``scorer_impl``: ``"auto"`` (Triton when it can run here), ``"torch"`` or ``"triton"``.
    ``trace``: a dict receiving seconds per step (synchronising the device).
    """
    if scorer_impl not in ("auto", "torch", "triton"):
        raise ValueError(f"block_threshold.select: scorer_impl must be 'auto', 'torch' or 'triton', got {scorer_impl!r}")
    geo = bt.geometry(q, k, q_offset, scale)
    why = _triton_reason(q) if scorer_impl != "torch" else "torch forced"
    if scorer_impl == "triton" and why:
        raise ValueError(f"block_threshold: the Triton scorer cannot run here: {why}")
    clock = _Clock(trace, q.device)
    state = bt._scorer.prepare(geo, q, k, use_triton=why is None)
    clock("prepare")
    B, G, nqb, nkb = geo.batch, geo.groups, geo.n_qblocks, geo.n_kblocks
    keep = torch.empty(B, G, nqb, nkb, dtype=torch.bool, device=q.device)
    step = _rows_per_chunk(bt._scorer, geo, nkb)
    n_cap = None if bt.budget is None else bt.budget // bt.block_k
    for qb0 in range(0, nqb, step):
        qb1 = min(nqb, qb0 + step)
        P = bt._scorer.scores(state, qb0, qb1)
        clock("scores")
        vis = geo.visible(qb0, qb1)
        forced = bt.forced(geo, qb0, qb1)
        kept = bt._rule.keep(P, vis) & vis & ~forced
        if n_cap is not None:
            kept = _cap(P, kept, n_cap)
        keep[:, :, qb0:qb1] = kept | forced
        clock("rule")
    counts = keep.sum(dim=-1).reshape(-1)
    indptr = torch.zeros(counts.numel() + 1, dtype=torch.int64, device=q.device)
    indptr[1:] = counts.cumsum(0)
    indices = keep.reshape(-1, nkb).nonzero()[:, 1].to(torch.int32)
    clock("lists")
    return indptr, indices, (B, G)


def _cap(P, kept, n: int):
    """At most ``n`` kept blocks per row, the largest shares first (ties: the lower id)."""
    if n == 0:
        return torch.zeros_like(kept)
    if n >= kept.shape[-1]:
        return kept
    Pm = torch.where(kept, P, torch.full((), -1.0, dtype=P.dtype, device=P.device))
    _, order = torch.sort(Pm, dim=-1, descending=True, stable=True)
    top = torch.zeros_like(kept)
    top.scatter_(-1, order[..., :n], True)
    return top & kept


def _triton_reason(q) -> Optional[str]:
    from sparsekit.kernels.triton_band import triton_reason

    # the scorer reads float32 pooled means and pads any head_dim: only the device and the install matter
    probe = torch.zeros(1, 1, 1, 16, device=q.device)
    return triton_reason(probe, probe)


class _Clock:
    def __init__(self, trace, device):
        self.trace, self.cuda = trace, torch.device(device).type == "cuda"
        self.t = self._now() if trace is not None else None

    def _now(self):
        import time

        if self.cuda:
            torch.cuda.synchronize()
        return time.perf_counter()

    def __call__(self, name):
        if self.trace is not None:
            t = self._now()
            self.trace[name] = self.trace.get(name, 0.0) + t - self.t
            self.t = t
