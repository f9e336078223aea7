"""HiP's selection: which key blocks each query block attends (torch reference and Triton scorers).

The exact semantics are in ``backends/hip/__init__.py`` and ``docs/hip.md``. :func:`select` returns a
:class:`Selection`; :meth:`HiP.pattern` turns it into a :class:`~sparsekit.pattern.Pattern`.
The torch scorer runs on any device in the compute dtype (the reference); the Triton scorer
(:mod:`.triton_scoring`) runs on CUDA, or on the CPU under Triton's interpreter.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch

from sparsekit.reference import compute_dtype

__all__ = ["Selection", "select", "triton_scoring_ok"]


@dataclass
class Selection:
    """The selection of one call.

    Attributes
    ----------
    blocks : (batch, sel_heads, n_qblocks, n_select) int32
        Selected key-block ids (absolute, in units of ``block_k``), ascending, ``-1`` padding last.
    win_start : (n_qblocks,) int64
        ``W_b``: first key of each query block's window (a multiple of ``block_k``).
    sink_end : int
        ``S``: keys ``[0, S)`` are the sink (a multiple of ``block_k``).
    heads_per_sel : int
        Query heads sharing one selection head (``q_heads // kv_heads`` with ``share_kv``, else 1).
    """

    blocks: torch.Tensor
    win_start: torch.Tensor
    sink_end: int
    heads_per_sel: int


def triton_scoring_ok(q, block_q: int, block_k: int) -> Optional[str]:
    """Why the Triton scorer cannot run here, or None."""
    from sparsekit.kernels.triton_band import triton_reason

    pow2 = lambda x: x >= 16 and (x & (x - 1)) == 0  # noqa: E731
    if not (pow2(block_q) and pow2(block_k)):
        return "block sizes are not powers of two >= 16"
    return triton_reason(q, q)


def select(hip, q, k, q_offset: int, *, scorer: str = "auto", trace: Optional[dict] = None) -> Selection:
    """HiP's selection for q (B, Hq, Nq, D) over k (B, Hkv, Nk, D).

    ``scorer``: ``"auto"`` (Triton when it can run here, else torch), ``"torch"`` (the reference,
    exact ties: the lower id wins) or ``"triton"``. ``trace``: a dict that receives the seconds
    spent in each step (synchronising the device between steps).
    """
    if scorer not in ("auto", "torch", "triton"):
        raise ValueError(f"hip.select: scorer must be 'auto', 'torch' or 'triton', got {scorer!r}")
    why = triton_scoring_ok(q, hip.block_q, hip.block_k) if scorer != "torch" else "torch forced"
    if scorer == "triton" and why:
        raise ValueError(f"hip: the Triton scorer cannot run here: {why}")
    use_triton = why is None
    sc = _TritonScorer(hip) if use_triton else _TorchScorer(hip)
    return _select(hip, q, k, q_offset, sc, exact_ties=not use_triton, trace=trace)


def _sampled_rows(hip, nq: int, device) -> tuple[torch.Tensor, torch.Tensor]:
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


def _select(hip, q, k, q_offset: int, scorer, exact_ties: bool, trace: Optional[dict] = None) -> Selection:
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
    return Selection(blocks.contiguous(), W, S, gs)


class _TorchScorer:
    """Reference scoring in the compute dtype (float32, float64 for float64 inputs). Any device."""

    def __init__(self, hip):
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
    """Scoring with the Triton kernels of :mod:`.triton_scoring` (CUDA, or the interpreter)."""

    def __init__(self, hip):
        self.hip = hip

    def setup(self, q, k, gs, S):
        from . import triton_scoring as hip_triton

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
