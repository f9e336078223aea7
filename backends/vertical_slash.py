"""Vertical-slash sparse prefill (MInference's dynamic pattern), executed through FlashInfer.

Jiang et al., "MInference 1.0: Accelerating Pre-filling for Long-Context LLMs via Dynamic
Sparse Attention", NeurIPS 2024 (https://arxiv.org/abs/2407.02490).

The exact pattern (``docs/vertical_slash.md`` says the same with pictures of the cases):

* **estimation**, per batch item and query head: the last ``L = min(last_q, q_len)`` query rows
  of the call attend every key up to their own position (softmax over the causal prefix,
  scaled scores). The *vertical score* of key ``j`` is the sum of those probabilities over the
  ``L`` rows; the *slash score* of diagonal ``o`` (``o`` = query position - key position) is
  the sum of the probabilities along that diagonal. Candidates are the keys ``0..P`` and the
  offsets ``0..P``, ``P = q_offset + q_len - 1`` (keys after the last query are never seen).
* **selection**: columns ``0..sink-1`` are always kept, then the highest vertical scores until
  ``max(vertical_size, sink)`` columns are kept (capped at ``P + 1``); diagonals ``0..local-1``
  are always kept, then the highest slash scores until ``max(slash_size, local)`` diagonals are
  kept. **Ties** keep the lower key index / the smaller offset (a stable sort).
* **execution** (what is attended, and what the CPU reference computes): query rows are grouped
  in blocks of ``block_q`` consecutive *absolute* positions (block ``b`` = positions
  ``[b*block_q, (b+1)*block_q)``, restricted to this call's rows), keys in pages of ``block_k``.
  Row block ``b`` attends every key page that a kept diagonal crosses within the block's rows,
  plus the kept columns that are not inside those pages; every (row, key) pair is then
  restricted to causal (key <= row position). As a set: row ``p`` sees key ``j`` iff
  ``j <= p`` and (``j`` is a kept column or ``j``'s page is crossed by a kept diagonal in
  ``p``'s row block). No key is counted twice. Offset 0 is always kept (``local >= 1``), so
  every row sees itself and every page that holds one of its block's rows.
* **chunked prefill** (``q_offset > 0``): the estimation block is the last rows of *this call*,
  attending the whole prefix (cached keys included); the pattern applies to this call's rows.
  The rows of the estimation block itself get the same pattern as every other row.

GPU execution (``sparsekit.kernels.vs_flashinfer``): the diagonal pages run as a FlashInfer FA3
paged prefill (page = ``block_k`` keys, exact causal through bottom-right alignment), the
remaining columns as a second FA3 paged prefill with pages of one token, non-causal (they all
lie before the block's first row); the two partials merge through the lse. Heads are stacked as
rows (one request per head and row block), so there is no Python loop over heads. Without
FlashInfer a FlexAttention path runs (``sparsekit.kernels.vs_flex``); on CPU the reference.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass, field
from typing import ClassVar, Optional, Sequence, Union

import torch
import torch.nn.functional as F

from sparsekit.base import Backend
from sparsekit.contract import AttentionResult
from sparsekit.reference import blockwise_attention, compute_dtype
from sparsekit.validate import check_int_option

__all__ = ["VerticalSlash", "VSPlan", "estimate_scores", "select_top"]

Budget = Union[int, str, Sequence[int]]
_IMPLS = ("auto", "flashinfer", "flex", "torch")


# ------------------------------------------------------------------------------ estimation
def estimate_scores(q, k, *, scale: float, q_offset: int, last_q: int):
    """Vertical and slash scores from the last ``last_q`` query rows.

    Parameters
    ----------
    q : (batch, q_heads, q_len, head_dim)
    k : (batch, kv_heads, kv_len, head_dim)

    Returns
    -------
    vertical : (batch, q_heads, P + 1) float
        ``vertical[j] = sum_r A[r, j]`` over the estimation rows ``r``.
    slash : (batch, q_heads, P + 1) float
        ``slash[o] = sum_r A[r, pos_r - o]`` (the sum along diagonal ``o``).
    Both in float32 (float64 for float64 inputs); ``P = q_offset + q_len - 1``.
    """
    B, Hq, Nq, D = q.shape
    Hkv = k.shape[1]
    G = Hq // Hkv
    W = q_offset + Nq  # keys 0..P
    L = min(last_q, Nq)
    cd = compute_dtype(q.dtype)
    ql = q[:, :, Nq - L:].reshape(B, Hkv, G * L, D)
    kk = k[:, :, :W]
    if q.is_cuda and q.dtype in (torch.float16, torch.bfloat16):
        s = torch.matmul(ql, kk.transpose(-1, -2)).to(cd)  # tensor-core matmul, fp32 after
    else:
        s = torch.matmul(ql.to(cd), kk.to(cd).transpose(-1, -2))
    s = s.view(B, Hq, L, W)
    s.mul_(scale)
    # causal inside the estimation block: row r (position W - L + r) sees keys <= its position
    tri = torch.ones(L, L, dtype=torch.bool, device=q.device).triu_(1)
    s[..., W - L:].masked_fill_(tri, float("-inf"))
    a = torch.softmax(s, dim=-1)
    del s
    vertical = a.sum(dim=-2)
    # slash: left-pad each row by L zeros; the strided view puts diagonal o of row r at column
    # u = P - o for every row, so a plain sum over rows gives the diagonal sums (u reversed).
    ap = F.pad(a, (L, 0)).reshape(B * Hq, L, W + L)
    del a
    diag = ap.as_strided((B * Hq, L, W), (L * (W + L), W + L + 1, 1), ap.storage_offset() + 1).sum(dim=1)
    slash = diag.flip(-1).view(B, Hq, W)
    return vertical, slash


def _split_budget(value) -> list:
    """``"1000/800/..."`` or a sequence -> list of per-head budgets (ints when they parse)."""
    if isinstance(value, str):
        out = []
        for part in value.split("/"):
            try:
                out.append(int(part))
            except ValueError:
                out.append(part.strip())
        return out
    return list(value)


def _per_head(budget: Budget, Hq: int, what: str) -> list[int]:
    if isinstance(budget, int):
        return [budget] * Hq
    b = _split_budget(budget)
    if len(b) != Hq:
        raise ValueError(f"vertical_slash: {what} has {len(b)} per-head budgets but q has {Hq} heads")
    return b


def select_top(score: torch.Tensor, forced: int, budgets: list[int]):
    """Keep the first ``forced`` candidates, then the best scores, ``max(budget, forced)`` in all.

    score (batch, q_heads, W) -> (index (batch, q_heads, K) int64 ascending, padded with W;
    count (q_heads,) int64). Ties keep the lower index (stable sort).
    """
    B, Hq, W = score.shape
    nkeep = torch.tensor([min(W, max(bud, forced)) for bud in budgets], dtype=torch.int64)
    K = int(nkeep.max())
    s = score.clone()
    s[..., : min(forced, W)] = float("inf")
    order = torch.sort(s, dim=-1, descending=True, stable=True).indices[..., :K]
    valid = torch.arange(K, device=score.device)[None, :] < nkeep.to(score.device)[:, None]  # (Hq, K)
    idx = torch.where(valid, order, torch.full_like(order, W)).sort(dim=-1).values
    return idx, nkeep


# ------------------------------------------------------------------------------ the plan
@dataclass
class VSPlan:
    """One vertical-slash pattern for one (q, k) shape: what estimation chose and how it runs.

    Attributes (``BH = batch * q_heads``; ``W = P + 1`` candidates, ``P`` the last position)
    ----------
    cols : (batch, q_heads, Kv) int64, kept columns ascending, padded with ``W``
    offsets : (batch, q_heads, Ko) int64, kept diagonal offsets ascending, padded with ``W``
    covered : (batch, q_heads, 3, S) bool
        Page shifts crossed by a kept diagonal, for the three row-block kinds (first, full,
        last block of the call): row block ``b`` attends page ``b * m - sh`` (``m =
        block_q // block_k``) iff ``covered[..., kind(b), sh + m - 1]`` and the page is ``>= 0``.
    vertical_scores, slash_scores : (batch, q_heads, W) the estimation's scores
    timings : dict of milliseconds (filled when planned with ``timings=True``)
    cache : per-implementation data built once per plan (FlashInfer wrappers, Flex masks);
        a plan passed to several layers that share the pattern is planned once.
    """

    B: int
    Hq: int
    Hkv: int
    Nq: int
    Nk: int
    D: int
    q_offset: int
    scale: float
    block_q: int
    block_k: int
    cols: torch.Tensor
    n_cols: torch.Tensor
    offsets: torch.Tensor
    n_offsets: torch.Tensor
    covered: torch.Tensor
    vertical_scores: torch.Tensor
    slash_scores: torch.Tensor
    timings: dict = field(default_factory=dict)
    cache: dict = field(default_factory=dict)

    # geometry --------------------------------------------------------------------------
    @property
    def P(self) -> int:
        return self.q_offset + self.Nq - 1

    @property
    def W(self) -> int:
        return self.P + 1

    @property
    def m(self) -> int:
        return self.block_q // self.block_k

    @property
    def b_first(self) -> int:
        return self.q_offset // self.block_q

    @property
    def n_blocks(self) -> int:
        return self.P // self.block_q - self.b_first + 1

    @property
    def S(self) -> int:
        return self.covered.shape[-1]

    @property
    def device(self):
        return self.cols.device

    def block_rows(self):
        """Per row block: (first position, last position, kind) as int64 tensors (n_blocks,)."""
        bq = self.block_q
        b = torch.arange(self.b_first, self.b_first + self.n_blocks, device=self.device)
        p_first = torch.clamp(b * bq, min=self.q_offset)
        p_last = torch.clamp(b * bq + bq - 1, max=self.P)
        kind = torch.ones_like(b)
        kind[0] = 0
        if self.n_blocks > 1:
            kind[-1] = 2
        return p_first, p_last, kind

    # the pattern as a mask (CPU reference, tests) --------------------------------------
    @property
    def colmask(self) -> torch.Tensor:
        """(batch, q_heads, W) bool: the kept columns."""
        cm = torch.zeros(self.B, self.Hq, self.W + 1, dtype=torch.bool, device=self.device)
        cm.scatter_(-1, self.cols, True)
        return cm[..., : self.W]

    def keep(self, i0: int, i1: int, kj: torch.Tensor) -> torch.Tensor:
        """Bool (batch, q_heads, i1 - i0, len(kj)): which keys ``kj`` rows ``i0..i1-1`` attend."""
        bq, bk, m, S = self.block_q, self.block_k, self.m, self.S
        p = self.q_offset + torch.arange(i0, i1, device=self.device)
        blk = p // bq
        _, _, kinds = self.block_rows()
        kind = kinds[blk - self.b_first]
        sh = (blk * m)[:, None] - (kj // bk)[None, :]
        idx = (kind[:, None] * S + sh + m - 1).clamp(0, 3 * S - 1)
        cov = self.covered.reshape(self.B, self.Hq, 3 * S)[:, :, idx]
        col = self.colmask[:, :, kj.clamp(max=self.W - 1)][:, :, None, :]
        causal = kj[None, :] <= p[:, None]
        return causal & (cov | col)

    def mask(self) -> torch.Tensor:
        """Bool (batch, q_heads, q_len, kv_len). Small sizes only."""
        return self.keep(0, self.Nq, torch.arange(self.Nk, device=self.device))

    # the pattern as lists (kernels, pair counts) ---------------------------------------
    def slash_pages(self):
        """Per (head, row block) the key pages crossed by kept diagonals, ascending.

        Returns ``count (BH, n_blocks)`` int64 and ``pages (count.sum(),)`` int64 page indices
        (pages of ``block_k`` keys of this head's K), ordered by head, block, page. The last
        page of every request is the page of its block's last row.
        """
        if "slash_pages" in self.cache:
            return self.cache["slash_pages"]
        BH, S, m, NB = self.B * self.Hq, self.S, self.m, self.n_blocks
        cov = self.covered.reshape(BH, 3, S)
        shv = torch.arange(S, device=self.device) - (m - 1)
        big = torch.iinfo(torch.int64).max
        asc = torch.where(cov, shv, torch.full_like(shv, big)).sort(dim=-1).values  # (BH, 3, S)
        ccum = cov.to(torch.int64).cumsum(-1)
        p_first, _, kind = self.block_rows()
        bm = (p_first // self.block_q) * m  # (NB,)
        cnt = ccum[:, kind, (bm + m - 1).clamp(max=S - 1)]  # (BH, NB): shifts <= bm
        flat_cnt = cnt.reshape(-1)
        total = int(flat_cnt.sum())
        req = torch.repeat_interleave(torch.arange(BH * NB, device=self.device), flat_cnt, output_size=total)
        start = torch.cumsum(flat_cnt, 0) - flat_cnt
        t = torch.arange(total, device=self.device) - start[req]
        bh, b = req // NB, req % NB
        sh = asc[bh, kind[b], flat_cnt[req] - 1 - t]
        self.cache["slash_pages"] = (cnt, bm[b] - sh)
        return self.cache["slash_pages"]

    def vertical_columns(self):
        """Per (head, row block) the kept columns outside the block's slash pages, ascending.

        Returns ``count (BH, n_blocks)`` int64 and ``cols (count.sum(),)`` int64 key indices,
        ordered by head, block, column. All of them lie before the block's first row, so they
        need no causal limit. Memory: a (BH, n_blocks, kept columns) temporary.
        """
        if "vertical_columns" in self.cache:
            return self.cache["vertical_columns"]
        BH, S, m, bk = self.B * self.Hq, self.S, self.m, self.block_k
        cols = self.cols.reshape(BH, -1)
        cov = self.covered.reshape(BH, 3 * S)
        p_first, _, kind = self.block_rows()
        bm = (p_first // self.block_q) * m
        base = (p_first // bk) * bk
        sh = bm[None, :, None] - (cols // bk)[:, None, :]
        idx = (kind[None, :, None] * S + sh + m - 1).clamp(0, 3 * S - 1)
        inside = cov.gather(1, idx.reshape(BH, -1)).view(BH, self.n_blocks, -1)
        del idx, sh
        inc = (cols[:, None, :] < base[None, :, None]) & ~inside
        count = inc.sum(-1)
        flat = cols[:, None, :].expand_as(inc)[inc]
        self.cache["vertical_columns"] = (count, flat)
        return count, flat

    def pairs_per_head(self) -> torch.Tensor:
        """(batch, q_heads) int64: (query, key) pairs this pattern attends, counted from the lists."""
        BH, bk = self.B * self.Hq, self.block_k
        p_first, p_last, _ = self.block_rows()
        rows = p_last - p_first + 1
        cnt, _ = self.slash_pages()
        ndiag = p_last // bk - p_first // bk + 1
        base = (p_first // bk) * bk
        tri = rows * (p_first - base + 1) + rows * (rows - 1) // 2
        slash = rows * bk * (cnt - ndiag) + tri
        vcount, _ = self.vertical_columns()
        total = (slash + rows * vcount).sum(-1)
        return total.view(self.B, self.Hq)

    def __repr__(self) -> str:
        return (
            f"VSPlan(B={self.B}, Hq={self.Hq}, Nq={self.Nq}, Nk={self.Nk}, q_offset={self.q_offset}, "
            f"block={self.block_q}x{self.block_k}, columns<={self.cols.shape[-1]}, "
            f"diagonals<={self.offsets.shape[-1]}, timings={self.timings})"
        )


def _cover(offsets: torch.Tensor, *, q_offset: int, Nq: int, block_q: int, block_k: int) -> torch.Tensor:
    """(B, Hq, Ko) kept offsets (padded with W) -> covered page shifts (B, Hq, 3, S) bool."""
    P = q_offset + Nq - 1
    W = P + 1
    bq, bk = block_q, block_k
    m = bq // bk
    b_first, b_last = q_offset // bq, P // bq
    S = (b_last + 1) * m
    r0_first = q_offset - b_first * bq
    r1_first = min(P - b_first * bq, bq - 1)
    r0 = torch.tensor([r0_first, 0, 0], device=offsets.device)
    r1 = torch.tensor([r1_first, bq - 1, P - b_last * bq], device=offsets.device)
    o = offsets[:, :, None, :]  # (B, Hq, 1, Ko)
    lo = -torch.div(r1[:, None] - o, bk, rounding_mode="floor")
    hi = (-torch.div(r0[:, None] - o, bk, rounding_mode="floor")).clamp(max=b_last * m)
    ok = (o < W) & (lo <= hi)
    lo = torch.where(ok, lo + m - 1, torch.zeros_like(lo))
    hi = torch.where(ok, hi + m, torch.zeros_like(hi))
    w = ok.to(torch.int32)
    B, Hq = offsets.shape[:2]
    diff = torch.zeros(B, Hq, 3, S + 1, dtype=torch.int32, device=offsets.device)
    diff.scatter_add_(-1, lo, w)
    diff.scatter_add_(-1, hi, -w)
    return diff.cumsum(-1)[..., :S] > 0


def _sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)


# ------------------------------------------------------------------------------ the backend
@dataclass
class VerticalSlash(Backend):
    """MInference vertical-slash pattern (https://arxiv.org/abs/2407.02490), FlashInfer on GPU.

    Parameters
    ----------
    vertical_size : int, or one int per query head (a sequence or ``"a/b/..."``), >= 0
        Kept columns in all, sink columns included (MInference's Llama-3-8B default 1000).
    slash_size : int, or one int per query head (a sequence or ``"a/b/..."``), >= 0
        Kept diagonals in all, local diagonals included (default 6096).
    last_q : int, >= 1
        Query rows the estimation uses (the last ones of the call).
    sink : int, >= 0
        First columns always kept.
    local : int, >= 1
        Nearest diagonals (offsets ``0..local-1``) always kept.
    block_q, block_k : int
        Row block and key page sizes of the executed pattern (``block_q % block_k == 0``).
        MInference uses 64 x 64; 128 x 64 fills FA3's 128-row query tile and measured 1.5-1.7x
        faster end to end on an H200 for a slightly denser pattern (bench/results/vertical_slash).
    impl : ``"auto"`` | ``"flashinfer"`` | ``"flex"`` | ``"torch"``
        ``auto``: FlashInfer on CUDA fp16/bf16 when installed, else FlexAttention on CUDA,
        else the exact blockwise reference.
    """

    name: ClassVar[str] = "vertical_slash"
    vertical_size: Budget = 1000
    slash_size: Budget = 6096
    last_q: int = 64
    sink: int = 30
    local: int = 100
    block_q: int = 128
    block_k: int = 64
    impl: str = "auto"

    def __post_init__(self):
        for what in ("vertical_size", "slash_size"):
            val = getattr(self, what)
            if isinstance(val, (list, tuple, str)):
                parts = _split_budget(val)
                if not parts:
                    raise ValueError(f"vertical_slash: {what} needs at least one budget")
                for x in parts:
                    check_int_option("vertical_slash", what, x, 0)
                # stored as "a/b/c" so the spec string round-trips
                setattr(self, what, "/".join(str(x) for x in parts))
            else:
                check_int_option("vertical_slash", what, val, 0)
        check_int_option("vertical_slash", "last_q", self.last_q, 1)
        check_int_option("vertical_slash", "sink", self.sink, 0)
        check_int_option("vertical_slash", "local", self.local, 1)
        check_int_option("vertical_slash", "block_q", self.block_q, 1)
        check_int_option("vertical_slash", "block_k", self.block_k, 1)
        if self.block_q % self.block_k:
            raise ValueError(
                f"vertical_slash: block_q ({self.block_q}) must be a multiple of block_k ({self.block_k})"
            )
        if self.impl not in _IMPLS:
            raise ValueError(f"vertical_slash: impl must be one of {_IMPLS}, got {self.impl!r}")
        # exact pair counts of the last plan built per (nq, nk, q_offset): the pattern is
        # data-dependent, so cost() can only be exact for a pattern that was estimated.
        self._last_pairs: dict = {}

    def unsupported(self, q, k, v) -> Optional[str]:
        Hq = q.shape[1]
        for what in ("vertical_size", "slash_size"):
            val = getattr(self, what)
            if isinstance(val, str) and len(_split_budget(val)) != Hq:
                return f"{what} has {len(_split_budget(val))} per-head budgets but q has {Hq} heads"
        return None

    # ---------------------------------------------------------------------------- plan/run
    def _impl_for(self, q, impl: Optional[str] = None) -> str:
        impl = self.impl if impl is None else impl
        if impl not in _IMPLS:
            raise ValueError(f"vertical_slash: impl must be one of {_IMPLS}, got {impl!r}")
        if impl in ("flashinfer", "flex") and not q.is_cuda:
            raise ValueError(f"vertical_slash: impl={impl!r} needs CUDA tensors (use 'auto' or 'torch' on CPU)")
        if impl != "auto":
            return impl
        if not q.is_cuda:
            return "torch"
        from sparsekit.kernels import vs_flashinfer

        if q.dtype in (torch.float16, torch.bfloat16) and vs_flashinfer.available():
            return "flashinfer"
        from sparsekit.kernels import vs_flex

        return "flex" if vs_flex.available() else "torch"

    def plan(self, q, k, *, scale: float, q_offset: int, timings: bool = False, impl: Optional[str] = None) -> VSPlan:
        """Estimation + index building (+ the FlashInfer plan on that path).

        q (batch, q_heads, q_len, head_dim), k (batch, kv_heads, kv_len, head_dim). With
        ``timings=True`` the device is synchronised between stages and ``plan.timings`` holds
        ``estimate_ms``, ``select_ms``, ``kernel_plan_ms`` (index building + FlashInfer plan; on
        that path also apart as ``index_ms`` and ``fi_plan_ms``).
        ``impl`` overrides the backend's ``impl`` option for this plan.
        """
        B, Hq, Nq, D = q.shape
        vb = _per_head(self.vertical_size, Hq, "vertical_size")
        sb = _per_head(self.slash_size, Hq, "slash_size")
        if q_offset + Nq > k.shape[2]:
            raise ValueError(f"q_offset + q_len must be <= kv_len: {q_offset} + {Nq} > {k.shape[2]}")
        t = {}
        dev = q.device
        t0 = time.perf_counter()
        vert, slash = estimate_scores(q, k, scale=scale, q_offset=q_offset, last_q=self.last_q)
        if timings:
            _sync(dev)
            t["estimate_ms"] = (time.perf_counter() - t0) * 1e3
        t1 = time.perf_counter()
        cols, ncols = select_top(vert, self.sink, vb)
        offs, noffs = select_top(slash, self.local, sb)
        covered = _cover(offs, q_offset=q_offset, Nq=Nq, block_q=self.block_q, block_k=self.block_k)
        if timings:
            _sync(dev)
            t["select_ms"] = (time.perf_counter() - t1) * 1e3
        plan = VSPlan(
            B=B, Hq=Hq, Hkv=k.shape[1], Nq=Nq, Nk=k.shape[2], D=D, q_offset=q_offset, scale=float(scale),
            block_q=self.block_q, block_k=self.block_k, cols=cols, n_cols=ncols, offsets=offs,
            n_offsets=noffs, covered=covered, vertical_scores=vert, slash_scores=slash, timings=t,
        )
        impl = self._impl_for(q, impl)
        plan.cache["impl"] = impl
        t2 = time.perf_counter()
        if impl == "flashinfer":
            from sparsekit.kernels import vs_flashinfer

            vs_flashinfer.prepare(plan, dtype=q.dtype, timings=timings)
        elif impl == "flex":
            from sparsekit.kernels import vs_flex

            vs_flex.prepare(plan)
        if timings:
            _sync(dev)
            t["kernel_plan_ms"] = (time.perf_counter() - t2) * 1e3
        self.plan_stats(plan)
        return plan

    def run(self, plan: VSPlan, q, k, v, *, scale: float, q_offset: int) -> AttentionResult:
        """Attention of q over k, v under ``plan`` (see :meth:`plan`); shapes as :meth:`prefill`."""
        if (q.shape[0], q.shape[1], q.shape[2], k.shape[1], k.shape[2]) != (plan.B, plan.Hq, plan.Nq, plan.Hkv, plan.Nk):
            raise ValueError(
                f"vertical_slash.run: plan is for B={plan.B}, Hq={plan.Hq}, Nq={plan.Nq}, Hkv={plan.Hkv}, "
                f"Nk={plan.Nk}; got q {tuple(q.shape)}, k {tuple(k.shape)}"
            )
        if q_offset != plan.q_offset or not math.isclose(scale, plan.scale, rel_tol=1e-12):
            raise ValueError(
                f"vertical_slash.run: plan was built for q_offset={plan.q_offset}, scale={plan.scale}; "
                f"got q_offset={q_offset}, scale={scale}"
            )
        impl = plan.cache.get("impl", "torch")
        if impl == "flashinfer":
            from sparsekit.kernels import vs_flashinfer

            return vs_flashinfer.run(plan, q, k, v)
        if impl == "flex":
            from sparsekit.kernels import vs_flex

            return vs_flex.run(plan, q, k, v)
        return self._reference(plan, q, k, v)

    def prefill(self, q, k, v, *, scale: float, q_offset: int) -> AttentionResult:
        return self.run(self.plan(q, k, scale=scale, q_offset=q_offset), q, k, v, scale=scale, q_offset=q_offset)

    @staticmethod
    def _reference(plan: VSPlan, q, k, v) -> AttentionResult:
        dev = q.device

        def select(i0, i1):
            kj = torch.arange(plan.q_offset + i1, device=dev)
            return kj, plan.keep(i0, i1, kj)

        return blockwise_attention(q, k, v, scale=plan.scale, select=select)

    # ---------------------------------------------------------------------------- pattern/cost
    def pattern(self, q, k, *, scale=None, q_offset=0) -> torch.Tensor:
        scale = q.shape[-1] ** -0.5 if scale is None else scale
        return self.plan(q, k, scale=scale, q_offset=q_offset, impl="torch").mask()

    def plan_stats(self, plan: VSPlan) -> dict:
        """Pairs attended per (batch, head), mean, and density vs dense causal; records cost()."""
        pairs = plan.pairs_per_head()
        mean = float(pairs.double().mean())
        dense = plan.Nq * (plan.q_offset + 1) + plan.Nq * (plan.Nq - 1) // 2
        self._last_pairs[(plan.Nq, plan.Nk, plan.q_offset)] = mean
        return {"pairs_mean": mean, "dense_pairs": dense, "density": mean / dense}

    def cost(self, nq: int, nk: int, q_offset: int) -> float:
        """Pairs per (batch, head): exact for the last pattern planned at these sizes.

        The pattern depends on the data, so without a plan this returns the upper bound of the
        budgets: every row sees its kept columns plus ``block_k * (pages crossed)`` keys, where
        each kept diagonal crosses at most ``1 + ceil((block_q - 1) / block_k)`` pages.
        """
        key = (nq, nk, q_offset)
        if key in self._last_pairs:
            return self._last_pairs[key]
        vb = max(_split_budget(self.vertical_size)) if isinstance(self.vertical_size, str) else self.vertical_size
        sb = max(_split_budget(self.slash_size)) if isinstance(self.slash_size, str) else self.slash_size
        vb, sb = max(vb, self.sink), max(sb, self.local)
        per_diag = self.block_k * (1 + -(-(self.block_q - 1) // self.block_k))
        seen = torch.arange(q_offset + 1, q_offset + nq + 1, dtype=torch.int64)
        return int(torch.clamp(seen, max=vb + sb * per_diag).sum())
