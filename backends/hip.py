"""HiP: hierarchically pruned attention, our own implementation (CPU reference + Triton kernels).

Lee et al., "A Training-free Sub-quadratic Cost Transformer Model Serving Framework With
Hierarchically Pruned Attention", ICLR 2025 (https://arxiv.org/abs/2406.09827), and its
multi-stage successor InfiniteHiP (https://arxiv.org/abs/2502.08910).

For every block of ``block_q`` query rows the causal key range is cut into chunks; each chunk
is scored against a sample of the block's queries, the best chunks survive, survivors are split
into smaller chunks and scored again, until the chunks are key blocks of ``block_k`` keys. The
block's rows then attend the ``k // block_k`` best key blocks plus the attention sink and a
sliding window. ``docs/hip.md`` states the exact selection semantics; in short:

* **geometry** (absolute key positions, query block ``b`` starts at ``P0 = q_offset + b*block_q``):
  sink ``[0, S)`` with ``S = ceil(sink / block_k) * block_k``; window ``[W_b, p]`` for row ``p``
  with ``W_b = floor(max(0, P0 - window + 1) / block_k) * block_k`` (block aligned, so every
  row sees at least its last ``window`` keys); candidates are the key blocks of ``[S, W_b)``.
* **coarse stages** (``stages="256:16384"`` = chunk 256 keys, keep 16384 keys): chunks are laid
  on a grid that starts at ``S``; a chunk is scored by its representative key, the mean of its
  keys, as ``max_r q_r . mean(K_chunk)`` over the block's sampled queries ``q_r`` (every
  ``q_stride``-th row of the block; with ``share_kv=True`` the rows of all query heads of the
  KV group). The best ``keep // chunk`` candidate chunks survive; the next stage splits them.
* **final stage**: the candidate key blocks inside the survivors are scored exactly,
  ``max_{r, j in block} q_r . k_j``, and the best ``k // block_k`` are selected.
* **ties**: equal scores keep the lower (earlier) chunk or block (CPU reference: stable sort).
  On CUDA the top-k is ``torch.topk`` and exact ties may resolve either way.
* row ``p`` attends key ``j`` iff ``j <= p`` and (``j < S`` or ``j >= W_b`` or ``j``'s block is
  selected). The pattern is causal, always holds sink, window and diagonal, and equals dense
  when ``k`` covers every candidate block.

Defaults follow the Δ paper's HiP setting (sink 1024, window 1024, top-k 2048 keys, query
blocks of 64, four-fold query sampling in the scan); see ``docs/hip.md`` for what differs
from the official package and why.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import ClassVar, Optional

import torch

from sparsekit.base import Backend
from sparsekit.contract import AttentionResult
from sparsekit.reference import blockwise_attention, compute_dtype
from sparsekit.validate import check_int_option

__all__ = ["HiP", "HiPPlan", "parse_stages"]


def parse_stages(stages) -> list[tuple[int, int]]:
    """``"256:16384"`` or ``"1024:65536/256:16384"`` -> ``[(chunk, keep), ...]``; ``""`` -> ``[]``.

    Also accepts a sequence of ``(chunk, keep)`` pairs.
    """
    if stages is None or (isinstance(stages, str) and not stages.strip()):
        return []
    if isinstance(stages, str):
        out = []
        for part in stages.split("/"):
            bits = part.strip().split(":")
            if len(bits) != 2:
                raise ValueError(f"hip: stages must look like 'chunk:keep[/chunk:keep...]', got {stages!r}")
            try:
                out.append((int(bits[0]), int(bits[1])))
            except ValueError:
                raise ValueError(f"hip: stages must hold integers, got {stages!r}") from None
        return out
    try:
        return [(int(c), int(k)) for c, k in stages]
    except (TypeError, ValueError):
        raise TypeError(f"hip: stages must be a string 'chunk:keep/...' or (chunk, keep) pairs, got {stages!r}") from None


# ----------------------------------------------------------------------------------- plan
@dataclass
class HiPPlan:
    """The selection of one call: which key blocks each (batch, selection head, query block) attends.

    Attributes
    ----------
    blocks : (batch, sel_heads, n_qblocks, n_select) int32
        Selected key-block ids (absolute, in units of ``block_k``), ascending, ``-1`` padding last.
    counts : (batch, sel_heads, n_qblocks) int32
        Number of valid entries of ``blocks``.
    win_start : (n_qblocks,) int64
        ``W_b``: first key of each query block's window (a multiple of ``block_k``).
    sink_end : int
        ``S``: keys ``[0, S)`` are the sink (a multiple of ``block_k``).
    heads_per_sel : int
        Query heads sharing one selection head (``q_heads // kv_heads`` with ``share_kv``, else 1).
    """

    blocks: torch.Tensor
    counts: torch.Tensor
    win_start: torch.Tensor
    sink_end: int
    nq: int
    nk: int
    q_offset: int
    block_q: int
    block_k: int
    heads_per_sel: int
    _table: Optional[torch.Tensor] = field(default=None, repr=False)

    @property
    def n_qblocks(self) -> int:
        return self.blocks.shape[2]

    def block_table(self) -> torch.Tensor:
        """(batch, sel_heads, n_qblocks, n_kblocks) bool: selected key blocks. Small sizes only."""
        if self._table is None:
            self._table = self._make_table()
        return self._table

    def _make_table(self) -> torch.Tensor:
        B, Hs, NBq, n = self.blocks.shape
        nkb = -(-self.nk // self.block_k)
        table = torch.zeros(B, Hs, NBq, nkb + 1, dtype=torch.bool, device=self.blocks.device)
        idx = torch.where(self.blocks >= 0, self.blocks.long(), torch.full_like(self.blocks.long(), nkb))
        table.scatter_(-1, idx, True)
        return table[..., :nkb]

    def keep_rows(self, i0: int, i1: int, key_index: torch.Tensor) -> torch.Tensor:
        """Keep-mask (batch, q_heads, i1 - i0, len(key_index)) of query rows ``i0..i1-1``."""
        dev = self.blocks.device
        rows = torch.arange(i0, i1, device=dev)
        pos = self.q_offset + rows
        qb = rows // self.block_q
        kj = key_index.to(dev)
        w = torch.clamp(self.win_start.to(dev)[qb], min=self.sink_end)
        dense_part = (kj[None, :] < self.sink_end) | (kj[None, :] >= w[:, None])
        causal = kj[None, :] <= pos[:, None]
        table = self.block_table()  # [B, Hs, NBq, NKb]
        sel = table[:, :, qb][..., kj // self.block_k]  # [B, Hs, R, M]
        keep = causal & (dense_part | sel)
        return keep.repeat_interleave(self.heads_per_sel, dim=1)

    def keep_mask(self) -> torch.Tensor:
        """(batch, q_heads, nq, nk) bool: the exact pattern. Small sizes only."""
        return self.keep_rows(0, self.nq, torch.arange(self.nk, device=self.blocks.device))


# ------------------------------------------------------------------------------- backend
@dataclass
class HiP(Backend):
    """Hierarchically pruned attention: top-k key blocks per query block, plus sink and window.

    Lee et al., ICLR 2025 (https://arxiv.org/abs/2406.09827); InfiniteHiP
    (https://arxiv.org/abs/2502.08910). Exact semantics: module docstring and ``docs/hip.md``.

    Parameters
    ----------
    k : int
        Keys selected by the last stage per query block (a multiple of ``block_k``), on top of
        sink and window. The budget: each row sees about ``sink + window + k`` keys.
    block_q : int
        Query rows sharing one selection.
    block_k : int
        Key-block size of the final selection (the attention kernel's key tile).
    stages : str
        Coarse stages, ``"chunk:keep[/chunk:keep...]"``: chunk sizes decreasing, each a multiple of
        the next and of ``block_k``; ``keep`` keys (``keep // chunk`` chunks) survive each stage,
        with ``keep >= next keep + chunk`` (the last stage's next keep is ``k``) so the budget is
        always filled. ``""``: score every candidate key block exactly (no coarse stage).
    q_stride : int
        Every ``q_stride``-th row of a query block is sampled for scoring.
    sink, window : int
        Leading keys every row sees (rounded up to whole key blocks), and at least the last
        ``window`` keys of each row (the window start is rounded down to a key block).
    share_kv : bool
        True: the query heads of one KV group share one selection, scored with all their sampled
        rows (one K load serves the group). False: one selection per query head.
    """

    name: ClassVar[str] = "hip"
    k: int = 2048
    block_q: int = 64
    block_k: int = 64
    stages: str = "256:16384"
    q_stride: int = 4
    sink: int = 1024
    window: int = 1024
    share_kv: bool = True

    def __post_init__(self):
        check_int_option("hip", "k", self.k, 1)
        check_int_option("hip", "block_q", self.block_q, 1)
        check_int_option("hip", "block_k", self.block_k, 1)
        check_int_option("hip", "q_stride", self.q_stride, 1)
        check_int_option("hip", "sink", self.sink, 0)
        check_int_option("hip", "window", self.window, 1)
        if not isinstance(self.share_kv, bool):
            raise TypeError(f"hip: share_kv must be a bool, got {self.share_kv!r}")
        if self.k % self.block_k:
            raise ValueError(f"hip: k ({self.k}) must be a multiple of block_k ({self.block_k})")
        st = parse_stages(self.stages)
        prev = None
        for i, (c, keep) in enumerate(st):
            if c < 1 or c % self.block_k:
                raise ValueError(f"hip: stage {i} chunk {c} must be a positive multiple of block_k ({self.block_k})")
            if prev is not None and (c >= prev or prev % c):
                raise ValueError(f"hip: stage {i} chunk {c} must be smaller than and divide the previous chunk {prev}")
            nxt = st[i + 1][1] if i + 1 < len(st) else self.k
            if (keep // c) * c < nxt + c:
                raise ValueError(
                    f"hip: stage {i} keeps {keep} keys in chunks of {c}; it must keep at least "
                    f"next stage's {nxt} + one chunk ({nxt + c}) so the budget is always filled"
                )
            prev = c
        self._stages = st

    # ------------------------------------------------------------------ geometry
    @property
    def n_select(self) -> int:
        return self.k // self.block_k

    def sink_end(self) -> int:
        return -(-self.sink // self.block_k) * self.block_k

    def win_starts(self, nq: int, q_offset: int, device=None) -> torch.Tensor:
        """(n_qblocks,) int64: ``W_b`` of each query block."""
        p0 = q_offset + torch.arange(0, nq, self.block_q, device=device, dtype=torch.int64)
        return (torch.clamp(p0 - self.window + 1, min=0) // self.block_k) * self.block_k

    # ------------------------------------------------------------------ the contract
    def plan(self, q, k, *, scale: Optional[float] = None, q_offset: int = 0, impl: str = "auto",
             trace: Optional[dict] = None) -> HiPPlan:
        """The selection (mask estimation) for q (B, Hq, Nq, D) over k (B, Hkv, Nk, D).

        ``impl``: ``"auto"`` (Triton on CUDA when it applies, else torch), ``"torch"`` (the
        reference on any device) or ``"triton"``. ``scale`` does not change the ranking.
        ``trace``: a dict that receives the seconds spent in each step (synchronising the device
        between steps; for benchmarks).
        """
        use_triton = self._triton_ok(q, impl)
        scorer = _TritonScorer(self) if use_triton else _TorchScorer(self)
        return _select(self, q, k, q_offset, scorer, exact_ties=not use_triton, trace=trace)

    def run(self, plan: HiPPlan, q, k, v, *, scale: float, q_offset: int, impl: str = "auto") -> AttentionResult:
        """Attention of q over the keys ``plan`` selected (plus sink and window)."""
        if plan.nq != q.shape[2] or plan.nk != k.shape[2] or plan.q_offset != q_offset:
            raise ValueError(
                f"hip.run: plan was made for nq={plan.nq}, nk={plan.nk}, q_offset={plan.q_offset}, "
                f"got nq={q.shape[2]}, nk={k.shape[2]}, q_offset={q_offset}"
            )
        if self._triton_ok(q, impl):
            from sparsekit.kernels import hip_triton

            return hip_triton.hip_attention(q, k, v, plan, scale=scale)

        def select(i0, i1):
            key_index = torch.arange(q_offset + i1, device=q.device)
            return key_index, plan.keep_rows(i0, i1, key_index)

        return blockwise_attention(q, k, v, scale=scale, select=select)

    def prefill(self, q, k, v, *, scale: float, q_offset: int) -> AttentionResult:
        return self.run(self.plan(q, k, scale=scale, q_offset=q_offset), q, k, v, scale=scale, q_offset=q_offset)

    def pattern(self, q, k, *, scale=None, q_offset=0) -> torch.Tensor:
        return self.plan(q, k, scale=scale, q_offset=q_offset).keep_mask()

    def cost(self, nq: int, nk: int, q_offset: int) -> int:
        """Exact pairs per (batch, query head): the budget is always filled when candidates allow."""
        S = self.sink_end()
        pos = q_offset + torch.arange(nq, dtype=torch.int64)
        W = self.win_starts(nq, q_offset)[torch.arange(nq) // self.block_q]
        sink = torch.clamp(pos + 1, max=S)
        window = torch.clamp(pos + 1 - torch.clamp(W, min=S), min=0)
        ncand = torch.clamp((W - S) // self.block_k, min=0)
        sel = torch.clamp(ncand, max=self.n_select) * self.block_k
        return int((sink + window + sel).sum())

    def _triton_ok(self, q, impl: str) -> bool:
        if impl == "torch":
            return False
        pow2 = lambda x: x >= 16 and (x & (x - 1)) == 0
        ok = (
            q.is_cuda
            and q.dtype in (torch.float16, torch.bfloat16, torch.float32)
            and pow2(self.block_q)
            and pow2(self.block_k)
            and q.shape[-1] in (16, 32, 64, 128, 256)
        )
        if impl == "triton":
            if not (q.dtype in (torch.float16, torch.bfloat16, torch.float32) and pow2(self.block_q) and pow2(self.block_k)):
                raise ValueError("hip: the Triton path needs fp16/bf16/fp32 and power-of-two block sizes >= 16")
            return True
        if ok:
            try:
                import triton  # noqa: F401
            except ImportError:
                return False
        return ok


# ----------------------------------------------------------------------------- selection
def _sampled_rows(hip: HiP, nq: int, device) -> tuple[torch.Tensor, torch.Tensor]:
    """(n_qblocks, T) row indices of the sampled queries and their validity."""
    nbq = -(-nq // hip.block_q)
    T = -(-hip.block_q // hip.q_stride)
    rows = torch.arange(nbq, device=device)[:, None] * hip.block_q + torch.arange(T, device=device)[None, :] * hip.q_stride
    return rows.clamp(max=nq - 1), rows < nq


def _top(scores: torch.Tensor, ids: Optional[torch.Tensor], m: int, exact_ties: bool) -> torch.Tensor:
    """The ``m`` best ids per row (ascending, ``-1`` padding last); -inf scores are never kept.

    scores (..., M) with -inf for non-candidates; ids (..., M) int64 ascending (None: arange).
    """
    M = scores.shape[-1]
    if ids is None:
        ids = torch.arange(M, device=scores.device).expand(scores.shape)
    if m < M:
        if exact_ties:
            order = torch.sort(scores, dim=-1, descending=True, stable=True).indices[..., :m]
        else:
            order = torch.topk(scores, m, dim=-1, sorted=False).indices
        sc = scores.gather(-1, order)
        ids = ids.gather(-1, order)
    else:
        sc = scores
    big = torch.iinfo(torch.int64).max
    ids = torch.where(sc > float("-inf"), ids, torch.full_like(ids, big))
    ids = torch.sort(ids, dim=-1).values
    return torch.where(ids == big, torch.full_like(ids, -1), ids)


class _Clock:
    """Step timer for ``plan(trace=...)``; a no-op without a trace dict."""

    def __init__(self, trace: Optional[dict], device):
        self.trace, self.cuda = trace, device.type == "cuda"
        self.t = self._now() if trace is not None else 0.0

    def _now(self):
        import time

        if self.cuda:
            torch.cuda.synchronize()
        return time.perf_counter()

    def __call__(self, name: str):
        if self.trace is not None:
            t = self._now()
            self.trace[name] = self.trace.get(name, 0.0) + t - self.t
            self.t = t


def _select(hip: HiP, q, k, q_offset: int, scorer, exact_ties: bool, trace: Optional[dict] = None) -> HiPPlan:
    B, Hq, Nq, D = q.shape
    Hkv, Nk = k.shape[1], k.shape[2]
    G = Hq // Hkv
    gs = G if hip.share_kv else 1
    bk = hip.block_k
    S = hip.sink_end()
    W = hip.win_starts(Nq, q_offset, device=q.device)  # [NBq]
    ncand_blocks = torch.clamp((W - S) // bk, min=0)  # candidate blocks per query block
    clock = _Clock(trace, q.device)
    scorer.setup(q, k, gs, S)
    stages = hip._stages
    if stages:
        c0, keep0 = stages[0]
        ncand = -(-(ncand_blocks * bk) // c0)  # candidate chunks (grid from S)
        scores = scorer.dense_means(c0, ncand)  # [B, Hs, NBq, Nc0]
        clock(f"score chunks of {c0}")
        ids = _top(scores, None, keep0 // c0, exact_ties)
        del scores
        clock("top-k")
        chunk = c0
        for c, keep in stages[1:] + [(bk, hip.k)]:
            r = chunk // c
            child = ids[..., :, None] * r + torch.arange(r, device=q.device)
            child = torch.where(ids[..., :, None] >= 0, child, torch.full_like(child, -1)).flatten(-2)
            cand = -(-(ncand_blocks * bk) // c)  # candidates at this size, per query block
            valid = (child >= 0) & (child < cand[None, None, :, None])
            child = torch.where(valid, child, torch.full_like(child, -1))
            if c == bk:
                scores = scorer.gathered_blocks(child)
            else:
                scores = scorer.gathered_means(c, child)
            clock(f"score chunks of {c}")
            ids = _top(scores, child, keep // c, exact_ties)
            clock("top-k")
            chunk = c
    else:
        scores = scorer.dense_blocks(ncand_blocks)
        clock(f"score chunks of {bk}")
        ids = _top(scores, None, hip.n_select, exact_ties)
        clock("top-k")
    blocks = torch.where(ids >= 0, ids + S // bk, ids).to(torch.int32)
    counts = (blocks >= 0).sum(-1).to(torch.int32)
    return HiPPlan(blocks.contiguous(), counts.contiguous(), W, S, Nq, Nk, q_offset, hip.block_q, bk, gs)


class _TorchScorer:
    """Reference scoring in the compute dtype (float32, float64 for float64 inputs). Any device."""

    def __init__(self, hip: HiP):
        self.hip = hip

    def setup(self, q, k, gs, S):
        hip = self.hip
        B, Hq, Nq, D = q.shape
        Hkv = k.shape[1]
        self.cd = compute_dtype(q.dtype)
        rows, rvalid = _sampled_rows(hip, Nq, q.device)  # [NBq, T]
        qs = q.to(self.cd)[:, :, rows]  # [B, Hq, NBq, T, D]
        NBq, T = rows.shape
        Hs = Hq // gs
        # [B, Hs, NBq, gs*T, D]: the sampled rows of the gs query heads sharing a selection
        self.qs = qs.view(B, Hs, gs, NBq, T, D).permute(0, 1, 3, 2, 4, 5).reshape(B, Hs, NBq, gs * T, D)
        self.rvalid = rvalid.repeat(1, gs)  # [NBq, gs*T]
        self.kv_of_sel = torch.arange(Hs, device=q.device) * gs // (Hq // Hkv)
        self.k = k
        self.S = S
        self.Nk = k.shape[2]

    def _means(self, c):
        k = self.k[:, :, self.S:].to(self.cd)
        n = k.shape[2]
        nc = -(-n // c)
        pad = nc * c - n
        ks = torch.nn.functional.pad(k, (0, 0, 0, pad)).view(k.shape[0], k.shape[1], nc, c, k.shape[-1]).sum(3)
        cnt = torch.clamp(n - torch.arange(nc, device=k.device) * c, max=c).to(self.cd)
        return (ks / cnt[:, None])[:, self.kv_of_sel]  # [B, Hs, Nc, D]

    def _max_rows(self, s):  # s [B, Hs, NBq, R, ...] -> max over valid sampled rows
        mask = self.rvalid.view(1, 1, *self.rvalid.shape, *([1] * (s.dim() - 4)))
        return s.masked_fill(~mask, float("-inf")).amax(3)

    def dense_means(self, c, ncand):
        km = self._means(c)  # [B, Hs, Nc, D]
        s = torch.einsum("bsqrd,bscd->bsqrc", self.qs, km)
        s = self._max_rows(s)  # [B, Hs, NBq, Nc]
        cand = torch.arange(km.shape[2], device=s.device)[None, :] < ncand[:, None]
        return s.masked_fill(~cand, float("-inf"))

    def gathered_means(self, c, ids):
        km = self._means(c)
        idx = ids.clamp(min=0)
        B, Hs, NBq, M = ids.shape
        kg = km.gather(2, idx.reshape(B, Hs, NBq * M, 1).expand(-1, -1, -1, km.shape[-1])).view(B, Hs, NBq, M, km.shape[-1])
        s = self._max_rows(torch.einsum("bsqrd,bsqmd->bsqrm", self.qs, kg))
        return s.masked_fill(ids < 0, float("-inf"))

    def _blocks(self):
        bk = self.hip.block_k
        k = self.k[:, :, self.S:].to(self.cd)
        nb = k.shape[2] // bk  # candidates are whole blocks before W <= Nk
        return k[:, :, : nb * bk].reshape(k.shape[0], k.shape[1], nb, bk, k.shape[-1])[:, self.kv_of_sel]

    def dense_blocks(self, ncand):
        kb = self._blocks()  # [B, Hs, NB, bk, D]
        s = torch.einsum("bsqrd,bsnjd->bsqrnj", self.qs, kb).amax(-1)
        s = self._max_rows(s)
        cand = torch.arange(kb.shape[2], device=s.device)[None, :] < ncand[:, None]
        return s.masked_fill(~cand, float("-inf"))

    def gathered_blocks(self, ids):
        kb = self._blocks()
        B, Hs, NBq, M = ids.shape
        if kb.shape[2] == 0:
            return torch.full(ids.shape, float("-inf"), dtype=self.cd, device=ids.device)
        idx = ids.clamp(min=0, max=kb.shape[2] - 1).reshape(B, Hs, NBq * M)
        kg = kb.gather(2, idx[..., None, None].expand(-1, -1, -1, *kb.shape[3:])).view(B, Hs, NBq, M, *kb.shape[3:])
        s = torch.einsum("bsqrd,bsqmjd->bsqrmj", self.qs, kg).amax(-1)
        s = self._max_rows(s)
        return s.masked_fill(ids < 0, float("-inf"))


class _TritonScorer:
    """Scoring with the Triton kernels of :mod:`sparsekit.kernels.hip_triton` (CUDA, or the interpreter)."""

    def __init__(self, hip: HiP):
        self.hip = hip

    def setup(self, q, k, gs, S):
        from sparsekit.kernels import hip_triton

        self.kern = hip_triton
        self.q, self.k, self.gs, self.S = q, k, gs, S
        self._mean_cache = {}

    def _means(self, c):
        if c not in self._mean_cache:
            self._mean_cache[c] = self.kern.chunk_means(self.k, self.S, c)
        return self._mean_cache[c]

    def _args(self):
        h = self.hip
        return dict(block_q=h.block_q, q_stride=h.q_stride, gs=self.gs)

    def dense_means(self, c, ncand):
        return self.kern.mean_scores(self.q, self._means(c), None, ncand, **self._args())

    def gathered_means(self, c, ids):
        return self.kern.mean_scores(self.q, self._means(c), ids, None, **self._args())

    def dense_blocks(self, ncand):
        return self.kern.block_scores(self.q, self.k, None, ncand, S=self.S, block_k=self.hip.block_k, **self._args())

    def gathered_blocks(self, ids):
        return self.kern.block_scores(self.q, self.k, ids, None, S=self.S, block_k=self.hip.block_k, **self._args())
