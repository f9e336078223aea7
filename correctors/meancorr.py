"""Mean correction (FlashPrefill-V2): the dense tail of ``tailonly`` plus, for every body row, the key
blocks the backend skipped, each summarised by its mean key and mean value.

**The rule.** Let ``M`` be the mean-block size (:meth:`MeanCorr.mean_block`): mean block ``j`` holds
the keys ``[j*M, min((j+1)*M, nk))`` and ``len_j`` is its key count. For a row at absolute position
``p`` (a body row of the backend's pattern), block ``j`` is **corrected** iff

* every key of it is visible causally: ``min((j+1)*M, nk) - 1 <= p`` (fully visible), and
* the pattern attends none of its keys for that row (a block that the band, a listed block or a
  column touches even partially is not corrected).

With ``kbar_j``, ``vbar_j`` the means of k and v over block ``j`` (float32; float64 for float64
inputs; per KV head: the query heads of a GQA group share them, K/V are never expanded), each
corrected block adds ``len_j * exp(scale * q . kbar_j)`` to the row's softmax denominator and the
same times ``vbar_j`` to its numerator. Equivalently, an extra attention partial over "summary
keys" ``kbar_j`` with per-key bias ``log(len_j)``::

    lse_c = logsumexp_j (scale * q . kbar_j + log len_j)        over the corrected blocks j
    out_c = sum_j exp(scale * q . kbar_j + log len_j - lse_c) * vbar_j

merged into the backend's ``(out, lse)`` through lse (the algebra of :func:`sparsekit.merge`):
``lse = logaddexp(lse_s, lse_c)``, ``out = exp(lse_s - lse) out_s + exp(lse_c - lse) out_c``. Rows
with no corrected block are unchanged (``lse_c = -inf``). The correction is exact when the keys are
constant within every corrected block (then ``len_j exp(q . kbar_j) vbar_j`` is the block's exact
contribution); in general it is an estimate, and the merged ``lse`` is the estimated full-prefix lse.

**Rows.** The dense rows are :class:`~sparsekit.correctors.tailonly.TailOnly`'s (the last
``nq % gamma + max(128, gamma)`` rows, and row 0), so ``meancorr(gamma)`` is ``tailonly(gamma)`` +
the mean correction of the body rows, and ``tailonly`` with the same ``gamma`` is its control.

**Cost.** :meth:`MeanCorr.complement_pairs` counts the (row, corrected block) pairs exactly (each a
"summary key"); the means themselves read k and v once (``nk`` per KV head, not counted as pairs).

**Implementations.** On CUDA (and on CPU under Triton's interpreter, ``TRITON_INTERPRET=1``) one Triton
kernel (:mod:`sparsekit.kernels.triton_meancorr`) evaluates the rule from the band, the block lists
and per-group column flags and merges in place; elsewhere (CPU, float64, gathered rows, a
``sparsekit.kernels.use`` restriction without the ``triton`` family) the torch path below, which
reads the rule from :meth:`Pattern.keep <sparsekit.pattern.Pattern.keep>`.

The correction is not a fixed linear mix of sparse and dense rows (its weights depend on lse), so
``row_linear`` is False; :meth:`MeanCorr.effective_rows` gives its effective attention rows for the
fidelity probe of ``sparsekit eval``.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar, Optional

import torch

from sparsekit.contract import AttentionResult
from sparsekit.correctors.tailonly import TailOnly
from sparsekit.reference import compute_dtype
from sparsekit.validate import check_int_option

__all__ = ["MeanCorr", "block_means", "corrected_blocks", "pair_counts"]


@dataclass
class MeanCorr(TailOnly):
    """``tailonly(gamma)`` + the mean correction of the body rows (module docstring: the exact rule).

    Parameters
    ----------
    gamma : int, >= 1
        Sets the dense tail: the last ``nq % gamma + max(128, gamma)`` rows (as ``tailonly``).
    tail : int or None
        Dense tail rows; None = the default above (0 allowed).
    block : int or None, >= 1
        Mean-block size ``M`` in keys; None = the pattern's ``block_k``. When the pattern has block
        lists and ``M`` is not a multiple of its ``block_k``, ``M`` is rounded up to the next multiple
        (a mean block then covers whole key blocks, so "touched by a listed block" is exact).
    """

    name: ClassVar[str] = "meancorr"
    control: ClassVar[bool] = False
    row_linear: ClassVar[bool] = False
    block: Optional[int] = None

    def __post_init__(self):
        super().__post_init__()
        self.block = check_int_option(self.name, "block", self.block, 1, allow_none=True)

    # ------------------------------------------------------------------ the rule
    def mean_block(self, pattern) -> int:
        """The mean-block size ``M`` used for ``pattern`` (see ``block``)."""
        m = pattern.block_k if self.block is None else self.block
        if pattern.block_indptr is not None and m % pattern.block_k:
            m = -(-m // pattern.block_k) * pattern.block_k
        return m

    def complement_pairs(self, pattern):
        """(row, corrected block) pairs per batch item and query head, averaged (exact)."""
        if pattern is None:
            return 0
        p = pattern.expand(pair_counts(pattern, self.mean_block(pattern)))
        total, n = int(p.sum()), p.numel()
        return total // n if total % n == 0 else total / n

    # ------------------------------------------------------------------ the correction
    def path(self, pattern, sparse: AttentionResult, q, k) -> tuple:
        """``("triton", None)`` or ``("torch", why not Triton)``: which implementation :meth:`complement` runs."""
        from sparsekit.kernels.triton_meancorr import refuse

        why = refuse(pattern, sparse, q, k)
        return ("torch", why) if why else ("triton", None)

    def complement(self, pattern, sparse: AttentionResult, q, k, v, *, scale: float) -> None:
        """Merge the mean correction into rows ``0..pattern.nq-1`` of ``sparse`` in place."""
        if pattern.nq == 0 or sparse is None:
            return
        M = self.mean_block(pattern)
        if not _any_corrected(pattern, M):
            return
        which, _ = self.path(pattern, sparse, q, k)
        if which == "triton":
            from sparsekit.kernels.triton_meancorr import mean_complement

            mean_complement(pattern, sparse.out, sparse.lse, q, k, v, scale=scale, block=M)
        else:
            complement_torch(pattern, sparse, q, k, v, scale=scale, block=M)

    # ------------------------------------------------------------------ fidelity probe
    def effective_rows(self, pattern, q, k, *, scale: float, rows: torch.Tensor) -> torch.Tensor:
        """Effective attention ``[B, Hq, R, nk]`` (float64) of call ``rows`` (ascending) under this corrector.

        ``pattern``: the backend's pattern over all ``nq`` rows of q. Dense rows (row 0 of the body and
        the tail) are causal softmax rows; a body row gives each attended key
        ``exp(scale q.k - lse)`` and each key of a corrected block ``exp(scale q.kbar_j - lse)``, with
        ``lse`` the merged lse: ``A_eff @ v`` is the corrected output exactly (the mean of v per block).
        """
        nq, nk = q.shape[2], k.shape[2]
        dev = q.device
        plan = self.rows(nq)
        dense = torch.zeros(nq, dtype=torch.bool, device=dev)
        dense[plan.dense_rows(dev)] = True
        M = self.mean_block(pattern)
        B, Hq, _, D = q.shape
        G = Hq // k.shape[1]
        pos = pattern.row_positions()
        keys = torch.arange(nk, device=dev)
        out = torch.zeros(B, Hq, rows.numel(), nk, dtype=torch.float64, device=dev)
        kd = k.double().repeat_interleave(G, 1)  # small probes only (the fidelity probe's sizes)
        kbar = block_means(k, M, torch.float64).repeat_interleave(G, 1)  # [B, Hq, NMB, D]
        owner = keys // M
        for i, r in enumerate(rows.tolist()):
            s = torch.einsum("bhd,bhkd->bhk", q[:, :, r].double(), kd) * scale  # [B, Hq, nk]
            causal = keys <= pos[r]
            if dense[r]:
                keep = causal.expand_as(s)
                out[:, :, i] = torch.softmax(s.masked_fill(~keep, float("-inf")), -1)
                continue
            keep = pattern.expand(pattern.keep(r, r + 1, keys))[:, :, 0]  # [B, Hq, nk]
            corr = pattern.expand(corrected_blocks(pattern, M, r, r + 1))[:, :, 0]  # [B, Hq, NMB]
            sb = torch.einsum("bhd,bhjd->bhj", q[:, :, r].double(), kbar) * scale  # [B, Hq, NMB]
            per_key = torch.where(keep, s, torch.where(corr[..., owner], sb[..., owner], float("-inf")))
            out[:, :, i] = torch.softmax(per_key, -1).nan_to_num(0.0)
        return out


# ---------------------------------------------------------------------------- shared pieces
def block_means(x: torch.Tensor, M: int, dtype: torch.dtype) -> torch.Tensor:
    """Means of ``x [B, H, N, D]`` over blocks of ``M`` keys (the last may be short): ``[B, H, ceil(N/M), D]``."""
    B, H, N, D = x.shape
    nfull = N // M
    parts = []
    if nfull:
        parts.append(x[:, :, : nfull * M].unflatten(2, (nfull, M)).sum(dim=-2, dtype=dtype).div_(M))
    if N % M:
        parts.append(x[:, :, nfull * M:].sum(dim=-2, keepdim=True, dtype=dtype).div_(N % M))
    return parts[0] if len(parts) == 1 else torch.cat(parts, dim=2)


def block_log_len(nk: int, M: int, dtype=torch.float32, device=None) -> torch.Tensor:
    """``log(len_j)`` of every mean block, ``[ceil(nk/M)]``."""
    nmb = -(-nk // M)
    start = torch.arange(nmb, device=device) * M
    length = torch.clamp(start + M, max=nk) - start
    return length.to(dtype).log()


def _bounds(pattern, M: int, pos: torch.Tensor) -> torch.Tensor:
    """Per row, ``U(p)``: mean blocks ``j < U(p)`` are fully visible and outside the window part of
    the band (nondecreasing in ``p``). Corrected blocks lie in ``[ceil(sink/M), U(p))``."""
    nk = pattern.nk
    p1 = pos + 1
    full = p1 // M
    if nk % M:  # the short last block is fully visible to the row at nk - 1
        full = full + (p1 == nk).to(pos.dtype)
    if pattern.window:
        return torch.minimum(full, torch.clamp(pos - pattern.window + 1, min=0) // M)
    return full


def _any_corrected(pattern, M: int) -> bool:
    """Whether some row may have a corrected block (cheap: the last row's bound)."""
    pos = pattern.row_positions()[-1:]
    return int(_bounds(pattern, M, pos)[0]) > -(-pattern.sink // M)


def corrected_blocks(pattern, M: int, r0: int, r1: int) -> torch.Tensor:
    """bool ``[Bp, Hp, r1 - r0, ceil(nk/M)]``: the rule for call rows ``r0..r1-1``, from :meth:`Pattern.keep`."""
    nk = pattern.nk
    nmb = -(-nk // M)
    keep = pattern.keep(r0, r1, torch.arange(nk, device=pattern.device))  # [Bp, Hp, R, nk]
    pad = nmb * M - nk
    if pad:
        keep = torch.nn.functional.pad(keep, (0, pad))
    touched = keep.view(*keep.shape[:3], nmb, M).any(-1)
    ends = torch.clamp((torch.arange(nmb, device=pattern.device) + 1) * M, max=nk)
    pos = pattern.row_positions()[r0:r1]
    visible = ends[None, :] <= pos[:, None] + 1  # [R, nmb]
    return visible & ~touched


def complement_torch(pattern, sparse: AttentionResult, q, k, v, *, scale: float, block: int) -> None:
    """The torch path of :meth:`MeanCorr.complement` (any device; the reference of the Triton kernel)."""
    B, Hq, R, D = q.shape
    Hkv, nk = k.shape[1], k.shape[2]
    G = Hq // Hkv
    M = block
    nmb = -(-nk // M)
    cd = compute_dtype(q.dtype)
    kbar = block_means(k, M, cd)  # [B, Hkv, nmb, D]
    vbar = block_means(v, M, cd)
    loglen = block_log_len(nk, M, cd, q.device)
    Bp, Hp = pattern.group_batch, pattern.group_heads
    step = max(1, min((1 << 24) // max(1, Bp * Hp * (nk + M)), (1 << 24) // max(1, B * Hq * nmb)))
    ninf = float("-inf")
    for r0 in range(0, R, step):
        r1 = min(R, r0 + step)
        c = r1 - r0
        corr = corrected_blocks(pattern, M, r0, r1)
        if not bool(corr.any()):
            continue
        corr = pattern.expand(corr)  # [B, Hq, c, nmb]
        qc = q[:, :, r0:r1].to(cd).reshape(B, Hkv, G * c, D)
        s = torch.matmul(qc, kbar.transpose(-1, -2)).mul_(scale).add_(loglen).view(B, Hq, c, nmb)
        s = s.masked_fill(~corr, ninf)
        m = s.amax(-1, keepdim=True)
        m = torch.where(torch.isfinite(m), m, torch.zeros_like(m))
        p = torch.exp(s - m)
        tot = p.sum(-1, keepdim=True)
        lse_c = (m + torch.log(tot)).squeeze(-1)  # -inf where no block is corrected
        p = p / torch.where(tot > 0, tot, torch.ones_like(tot))
        out_c = torch.matmul(p.view(B, Hkv, G * c, nmb), vbar).view(B, Hq, c, D)
        # merge through lse (sparsekit.merge's algebra), in the compute dtype
        o_s = sparse.out[:, :, r0:r1]
        l_s = sparse.lse[:, :, r0:r1]
        ls = l_s.to(cd)
        mx = torch.maximum(ls, lse_c)
        mx = torch.where(torch.isfinite(mx), mx, torch.zeros_like(mx))
        ws, wc = torch.exp(ls - mx), torch.exp(lse_c - mx)
        tot = ws + wc
        nz = tot > 0
        tsafe = torch.where(nz, tot, torch.ones_like(tot))
        new_o = (ws[..., None] * o_s.to(cd) + wc[..., None] * out_c) / tsafe[..., None]
        new_l = torch.where(nz, mx + torch.log(tsafe), ls)
        fix = torch.isfinite(lse_c)  # rows with a corrected block; the others stay bit-identical
        o_s.copy_(torch.where(fix[..., None], new_o.to(o_s.dtype), o_s))
        l_s.copy_(torch.where(fix, new_l.to(l_s.dtype), l_s))


def pair_counts(pattern, M: int) -> torch.Tensor:
    """(row, corrected block) pairs per group, int64 ``[Bp, Hp]`` (exact, without a mask).

    Per row, the corrected blocks are ``[s_b, U(p))`` (``s_b = ceil(sink / M)``, :func:`_bounds`) minus
    the mean blocks a listed block or a column touches. ``U`` is nondecreasing over the rows, so the
    rows of a query block for which a touched block ``t`` lies below ``U`` are a suffix found by one
    ``searchsorted``; listed and column blocks are counted once each (their overlap added back).
    """
    dev = pattern.device
    G, NQB = pattern.groups, pattern.n_qblocks
    nk, nq = pattern.nk, pattern.nq
    nmb = -(-nk // M)
    sb = -(-pattern.sink // M)
    pos = pattern.row_positions()
    U = _bounds(pattern, M, pos)
    base = int(torch.clamp(U - sb, min=0).sum())
    total = torch.full((G,), base, dtype=torch.int64, device=dev)

    def rows_above(t, lo, hi):
        # rows in [lo, hi) whose U exceeds t (a suffix: U is nondecreasing)
        first = torch.searchsorted(U, t, right=True)
        first = torch.minimum(torch.maximum(first, lo), hi)
        return hi - first

    rb = pattern.row_bounds()
    lkey = None
    if pattern.block_indptr is not None and pattern.block_indices.numel():
        f = M // pattern.block_k
        S = G * NQB
        cnt = pattern.block_indptr[1:] - pattern.block_indptr[:-1]
        seg = torch.repeat_interleave(torch.arange(S, device=dev), cnt, output_size=pattern.block_indices.numel())
        mb = pattern.block_indices.to(torch.int64) // f
        ok = (mb >= sb) & (mb < nmb)
        lkey = torch.unique(seg[ok] * (nmb + 1) + mb[ok])  # distinct (segment, mean block)
        seg, mb = lkey // (nmb + 1), lkey % (nmb + 1)
        qb = seg % NQB
        n = rows_above(mb, rb[qb], rb[qb + 1])
        total.scatter_add_(0, seg // NQB, -n)
    if pattern.columns is not None:
        cols = pattern.columns.reshape(G, -1)
        g = torch.arange(G, device=dev)[:, None].expand_as(cols)
        ok = (cols >= 0) & (cols // M >= sb)
        ckey = torch.unique(g[ok] * (nmb + 1) + cols[ok] // M)  # distinct (group, mean block)
        cg, cmb = ckey // (nmb + 1), ckey % (nmb + 1)
        zero = torch.zeros_like(cmb)
        total.scatter_add_(0, cg, -rows_above(cmb, zero, torch.full_like(cmb, nq)))
        if lkey is not None and lkey.numel() and ckey.numel():
            # (segment, mean block) pairs touched both by a listed block and a column: counted twice above
            lseg, lmb = lkey // (nmb + 1), lkey % (nmb + 1)
            want = (lseg // NQB) * (nmb + 1) + lmb
            at = torch.searchsorted(ckey, want).clamp(max=ckey.numel() - 1)
            both = ckey[at] == want
            if bool(both.any()):
                qb = lseg[both] % NQB
                total.scatter_add_(0, lseg[both] // NQB, rows_above(lmb[both], rb[qb], rb[qb + 1]))
    return total.view(pattern.group_batch, pattern.group_heads).cpu()
