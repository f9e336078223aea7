"""The one pattern type: which keys each query row attends.

A backend describes its attention as a :class:`Pattern`; sparsekit derives everything else from it:
the boolean keep-mask of the CPU reference and the tests, the exact pair count (``cost``), the
density, a picture, and the lists the GPU kernels walk (:meth:`Pattern.lower`).

**Rows.** Row ``r`` of the call sits at absolute position ``pos(r) = q_offset + r``, or
``positions[r]`` for a call over gathered rows (a corrector's anchor rows). Positions ascend.

**The rule.** Key ``j`` is visible to row ``r`` iff ``j <= pos(r)`` (causal, bottom-right aligned)
and at least one of

* **band**: ``j < sink`` or ``j > pos(r) - window`` (``window`` counts the row's own key;
  ``window = 0`` and ``sink = 0`` mean no band; ``window >= nk`` is dense causal attention);
* **blocks**: ``j // block_k`` is listed for the row's query block in the row's group;
* **columns**: ``j`` is one of the group's columns (single keys, e.g. vertical-slash verticals).

**Query blocks.** Block ``b`` holds the call rows ``[b*block_q - block_shift, (b+1)*block_q -
block_shift)`` clipped to ``[0, nq)``. ``block_shift = q_offset % block_q`` puts the grid on absolute
positions (vertical-slash); ``0`` puts it on the call's rows (HiP).

**Groups.** Block lists and columns are given per group ``(bp, hp)``, ``bp < Bp``, ``hp < Hp`` with
``Bp`` in ``{1, batch}`` and ``Hp`` in ``{1, kv_heads, q_heads}``: query head ``h`` of batch item
``b`` reads group ``(b if Bp > 1 else 0, h * Hp // q_heads)``. ``Hp = kv_heads`` is one selection per
KV group, ``Hp = q_heads`` one per query head, ``Hp = 1`` one for all heads.

Block lists are CSR over the ``Bp * Hp * n_qblocks`` segments (group-major, then query block):
``block_indptr`` (int64) and ``block_indices`` (key-block ids ascending inside a segment, no repeats).
:meth:`Pattern.from_blocks` also takes a padded ``[Bp, Hp, n_qblocks, M]`` tensor (``-1`` = none).
Columns are ``[Bp, Hp, C]`` int64, ascending, ``-1`` padding.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Optional

import torch

__all__ = ["Pattern", "Lowered", "PatternError"]

FULL = 1  # a lowered block whose keys are all visible (up to causality)
BAND = 0  # a lowered block where only the band rule (sink / window) holds


class PatternError(ValueError):
    """A pattern whose pieces do not fit together (shapes, ranges, order)."""


def _shape(t) -> str:
    return "[" + ", ".join(str(s) for s in t.shape) + "]"


@dataclass(frozen=True)
class Lowered:
    """The executable form of a pattern: per (group, query block) one sorted list of key blocks.

    Attributes (``S = groups * n_qblocks`` segments, group-major)
    ----------
    indptr : (S + 1,) int64
    kblock : (nnz,) int32, ascending inside a segment, unique
    full : (nnz,) int8; ``1``: every key of the block is visible to every row of the query block up
        to causality (a listed block, or a block inside the band for all rows); ``0``: only keys
        inside the band (``j < sink`` or ``j > pos - window``)
    col_indptr : (S + 1,) int64
    col_index : (ncol,) int64, ascending inside a segment: single keys outside every ``full`` block
        of the segment and not inside the band for every row; a row sees column ``j`` iff
        ``j <= pos`` and ``j`` is not inside its band (the band part is counted by the block list)
    groups, n_qblocks : int
    """

    indptr: torch.Tensor
    kblock: torch.Tensor
    full: torch.Tensor
    col_indptr: torch.Tensor
    col_index: torch.Tensor
    groups: int
    n_qblocks: int

    @property
    def has_columns(self) -> bool:
        return self.col_index.numel() > 0


@dataclass(eq=False)
class Pattern:
    """Which keys each query row attends (module docstring: the exact rule).

    Build one with :meth:`band`, :meth:`causal`, :meth:`from_blocks` or :meth:`gathered`; the fields
    are the data. Tensors live on the device of the q/k they were made for.

    Attributes
    ----------
    batch, q_heads, kv_heads, nq, nk : int
        The call: q ``[batch, q_heads, nq, D]``, k ``[batch, kv_heads, nk, D]``.
    q_offset : int
        Position of row 0 (ignored when ``positions`` is given).
    positions : (nq,) int64 or None
        Absolute positions of gathered rows, ascending.
    window, sink : int
        The band (0, 0: none).
    block_q, block_k, block_shift : int
        Query-block and key-block sizes, and the grid shift (module docstring).
    group_batch, group_heads : int
        ``Bp`` and ``Hp``.
    block_indptr, block_indices : CSR of listed key blocks, or None.
    columns : (Bp, Hp, C) int64 or None.
    """

    batch: int
    q_heads: int
    kv_heads: int
    nq: int
    nk: int
    q_offset: int = 0
    positions: Optional[torch.Tensor] = None
    window: int = 0
    sink: int = 0
    block_q: int = 128
    block_k: int = 64
    block_shift: int = 0
    group_batch: int = 1
    group_heads: int = 1
    block_indptr: Optional[torch.Tensor] = None
    block_indices: Optional[torch.Tensor] = None
    columns: Optional[torch.Tensor] = None
    device: torch.device = field(default_factory=lambda: torch.device("cpu"))
    canonical: bool = False
    _cache: dict = field(default_factory=dict, repr=False)

    # ------------------------------------------------------------------ construction
    def __post_init__(self):
        for name in ("batch", "q_heads", "kv_heads", "nq", "nk", "block_q", "block_k", "group_batch", "group_heads"):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, int) or v < 1:
                raise PatternError(f"Pattern: {name} must be an int >= 1, got {v!r}")
        for name in ("q_offset", "window", "sink", "block_shift"):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, int) or v < 0:
                raise PatternError(f"Pattern: {name} must be an int >= 0, got {v!r}")
        self.device = torch.device(self.device)
        if self.q_heads % self.kv_heads:
            raise PatternError(f"Pattern: q_heads ({self.q_heads}) must be a multiple of kv_heads ({self.kv_heads})")
        if self.group_batch not in (1, self.batch):
            raise PatternError(f"Pattern: group_batch must be 1 or batch ({self.batch}), got {self.group_batch}")
        if self.group_heads not in (1, self.kv_heads, self.q_heads):
            raise PatternError(
                f"Pattern: group_heads must be 1, kv_heads ({self.kv_heads}) or q_heads ({self.q_heads}), "
                f"got {self.group_heads}"
            )
        if self.block_shift >= self.block_q:
            raise PatternError(f"Pattern: block_shift ({self.block_shift}) must be < block_q ({self.block_q})")
        # keep the band inside int64 arithmetic: a window beyond nk means the same as nk
        self.window = min(self.window, self.nk)
        self.sink = min(self.sink, self.nk)
        if self.positions is not None:
            p = self.positions
            if not isinstance(p, torch.Tensor) or p.dim() != 1 or p.numel() != self.nq:
                raise PatternError(f"Pattern: positions must be a 1-D tensor of nq={self.nq} ints")
            p = p.to(dtype=torch.int64)  # checked where it was given (no device round trip for CPU positions)
            if self.nq and (int(p[0]) < 0 or int(p[-1]) >= self.nk):
                raise PatternError(f"Pattern: positions must lie in [0, nk={self.nk})")
            if self.nq > 1 and bool((p[1:] < p[:-1]).any()):
                raise PatternError("Pattern: positions must ascend")
            if p.device.type == "cpu":
                self._cache["positions_cpu"] = p
            self.positions = p.to(device=self.device)
            if self.block_shift:
                raise PatternError("Pattern: block_shift applies to contiguous rows only")
        elif self.q_offset + self.nq > self.nk:
            raise PatternError(f"Pattern: q_offset + nq ({self.q_offset} + {self.nq}) must be <= nk ({self.nk})")
        if (self.block_indptr is None) != (self.block_indices is None):
            raise PatternError("Pattern: give both block_indptr and block_indices, or neither")
        if self.block_indptr is not None:
            seg = self.groups * self.n_qblocks
            ip, ix = self.block_indptr, self.block_indices
            if ip.dim() != 1 or ip.numel() != seg + 1:
                raise PatternError(
                    f"Pattern: block_indptr must have groups * n_qblocks + 1 = {seg + 1} entries, got {_shape(ip)}"
                )
            self.block_indptr = ip.to(device=self.device, dtype=torch.int64)
            self.block_indices = ix.to(device=self.device, dtype=torch.int32).reshape(-1)
            if int(self.block_indptr[-1]) != self.block_indices.numel() or int(self.block_indptr[0]) != 0:
                raise PatternError("Pattern: block_indptr must start at 0 and end at len(block_indices)")
        if self.columns is not None:
            c = self.columns
            if c.dim() != 3 or c.shape[0] != self.group_batch or c.shape[1] != self.group_heads:
                raise PatternError(
                    f"Pattern: columns must be [group_batch={self.group_batch}, group_heads={self.group_heads}, C], "
                    f"got {_shape(c)}"
                )
            c = c.to(device=self.device, dtype=torch.int64)
            bad = (c < 0) | (c >= self.nk)
            big = torch.iinfo(torch.int64).max
            c = torch.where(bad, torch.full_like(c, big), c).sort(dim=-1).values
            dup = torch.zeros_like(bad)
            dup[..., 1:] = c[..., 1:] == c[..., :-1]
            c = torch.where(dup, torch.full_like(c, big), c).sort(dim=-1).values
            self.columns = torch.where(c == big, torch.full_like(c, -1), c)
            if self.columns.shape[-1] == 0 or bool((self.columns < 0).all()):
                self.columns = None

    @classmethod
    def _shape_of(cls, q, k):
        if q.dim() != 4 or k.dim() != 4:
            raise PatternError(f"Pattern: q and k must be [B, H, N, D], got {_shape(q)} and {_shape(k)}")
        return dict(batch=q.shape[0], q_heads=q.shape[1], kv_heads=k.shape[1], nq=q.shape[2], nk=k.shape[2],
                    device=q.device)

    @classmethod
    def band(cls, q, k, *, q_offset: int, window: int, sink: int = 0, block_q: int = 128, block_k: int = 64):
        """Sink + sliding window: row at position p sees ``[0, sink)`` and ``(p - window, p]``.

        q (batch, q_heads, nq, D), k (batch, kv_heads, nk, D): only their shapes and device are read.
        """
        return cls(q_offset=q_offset, window=window, sink=sink, block_q=block_q, block_k=block_k,
                   **cls._shape_of(q, k))

    @classmethod
    def causal(cls, q, k, *, q_offset: int):
        """Dense causal attention: row at position p sees keys ``0..p``."""
        return cls.band(q, k, q_offset=q_offset, window=k.shape[2])

    @classmethod
    def gathered(cls, q_rows, k, *, positions: torch.Tensor, window: Optional[int] = None, sink: int = 0,
                 block_q: int = 128):
        """Rows at given absolute positions (ascending); default: each over its whole causal prefix."""
        return cls(positions=positions, window=k.shape[2] if window is None else window, sink=sink,
                   block_q=block_q, **cls._shape_of(q_rows, k))

    @classmethod
    def from_blocks(cls, q, k, *, q_offset: int, block_q: int, block_k: int, blocks=None, block_shift: int = 0,
                    window: int = 0, sink: int = 0, columns=None, groups=None, sorted_unique: bool = False):
        """A block pattern (plus an optional band and columns).

        Parameters
        ----------
        q, k : only shapes and device are read.
        blocks : (Bp, Hp, n_qblocks, M) int tensor with ``-1`` for none, or a CSR tuple
            ``(indptr (Bp*Hp*n_qblocks + 1,), indices (nnz,))``; key-block ids (``key // block_k``).
        columns : (Bp, Hp, C) int tensor, ``-1`` padding, or None.
        groups : ``(Bp, Hp)``; needed only for CSR blocks without columns (else read from shapes).
        sorted_unique : the lists already ascend, without repeats, and hold no block after the block
            of their query block's last row (skips a sort and a check; backends that build their lists
            that way say so).
        """
        shape = cls._shape_of(q, k)
        Bp = Hp = None
        indptr = indices = None
        if blocks is not None:
            if isinstance(blocks, (tuple, list)):
                indptr, indices = blocks
            else:
                if blocks.dim() != 4:
                    raise PatternError(f"Pattern.from_blocks: blocks must be [Bp, Hp, n_qblocks, M], got {_shape(blocks)}")
                Bp, Hp = blocks.shape[0], blocks.shape[1]
                indptr, indices = _padded_to_csr(blocks)
        if columns is not None:
            if columns.dim() != 3:
                raise PatternError(f"Pattern.from_blocks: columns must be [Bp, Hp, C], got {_shape(columns)}")
            if Bp is not None and (columns.shape[0], columns.shape[1]) != (Bp, Hp):
                raise PatternError(
                    f"Pattern.from_blocks: blocks groups ({Bp}, {Hp}) and columns groups "
                    f"({columns.shape[0]}, {columns.shape[1]}) differ"
                )
            Bp, Hp = columns.shape[0], columns.shape[1]
        if groups is not None:
            if Bp is not None and tuple(groups) != (Bp, Hp):
                raise PatternError(f"Pattern.from_blocks: groups={tuple(groups)} but the tensors have ({Bp}, {Hp})")
            Bp, Hp = groups
        if Bp is None:
            nqb = -(-(shape["nq"] + block_shift) // block_q)
            if indptr is not None and indptr.numel() - 1 != nqb:
                raise PatternError(
                    "Pattern.from_blocks: CSR blocks with more than one group need groups=(Bp, Hp) "
                    f"({indptr.numel() - 1} segments for {nqb} query blocks)"
                )
            Bp, Hp = 1, 1
        pat = cls(q_offset=q_offset, window=window, sink=sink, block_q=block_q, block_k=block_k,
                  block_shift=block_shift, group_batch=Bp, group_heads=Hp, block_indptr=indptr,
                  block_indices=indices, columns=columns, **shape)
        if pat.block_indptr is not None and not sorted_unique:
            pat.block_indptr, pat.block_indices = _canonical_csr(pat.block_indptr, pat.block_indices, pat.n_kblocks)
        pat.canonical = bool(sorted_unique)
        return pat

    # ------------------------------------------------------------------ geometry
    @property
    def groups(self) -> int:
        return self.group_batch * self.group_heads

    @property
    def n_qblocks(self) -> int:
        return -(-(self.nq + self.block_shift) // self.block_q)

    @property
    def n_kblocks(self) -> int:
        return -(-self.nk // self.block_k)

    @property
    def is_band(self) -> bool:
        """No block lists and no columns: the band rule alone (dense, streaming)."""
        return self.block_indptr is None and self.columns is None

    @property
    def is_dense(self) -> bool:
        """Every row sees its whole causal prefix."""
        return self.is_band and self.window >= self.nk

    @property
    def gathered_rows(self) -> bool:
        return self.positions is not None

    def positions_cpu(self) -> Optional[torch.Tensor]:
        """``positions`` on the CPU (kept from construction when given there; else copied once), or None."""
        if self.positions is None:
            return None
        p = self._cache.get("positions_cpu")
        if p is None:
            p = self._cache["positions_cpu"] = self.positions.cpu()
        return p

    def row_positions(self) -> torch.Tensor:
        """(nq,) int64 absolute position of every row."""
        if self.positions is not None:
            return self.positions
        return self.q_offset + torch.arange(self.nq, device=self.device)

    def row_bounds(self) -> torch.Tensor:
        """(n_qblocks + 1,) int64: query block b holds call rows ``[bounds[b], bounds[b+1])``."""
        b = torch.arange(self.n_qblocks + 1, device=self.device) * self.block_q - self.block_shift
        return b.clamp(0, self.nq)

    def block_positions(self):
        """(first, last) position of each query block's rows, (n_qblocks,) int64 each."""
        pos = self.row_positions()
        rb = self.row_bounds()
        return pos[rb[:-1]], pos[rb[1:] - 1]

    def group_of(self, batch_index: int, head: int) -> int:
        """The group read by query head ``head`` of batch item ``batch_index``."""
        bp = batch_index if self.group_batch > 1 else 0
        return bp * self.group_heads + head * self.group_heads // self.q_heads

    def _band_count(self, pos: torch.Tensor) -> torch.Tensor:
        """Keys of the band (sink + window) at or before each position."""
        n = pos + 1
        sink = torch.clamp(n, max=self.sink)
        if self.window == 0:
            return sink
        lo = torch.clamp(pos - self.window + 1, min=self.sink)
        return sink + torch.clamp(n - lo, min=0)

    def _band_has(self, pos: torch.Tensor, j: torch.Tensor) -> torch.Tensor:
        """Band rule for broadcast positions and keys (causality not included)."""
        inside = j < self.sink
        if self.window:
            inside = inside | (j > pos - self.window)
        return inside

    # ------------------------------------------------------------------ the mask
    def _listed_keys(self) -> Optional[torch.Tensor]:
        """Sorted int64 keys ``segment * (n_kblocks + 1) + kblock`` of the listed blocks."""
        if self.block_indptr is None:
            return None
        if "listed" not in self._cache:
            S = self.groups * self.n_qblocks
            cnt = self.block_indptr[1:] - self.block_indptr[:-1]
            seg = torch.repeat_interleave(torch.arange(S, device=self.device), cnt, output_size=self.block_indices.numel())
            self._cache["listed"] = seg * (self.n_kblocks + 1) + self.block_indices.to(torch.int64)
        return self._cache["listed"]

    def keep(self, r0: int, r1: int, key_index: torch.Tensor) -> torch.Tensor:
        """Keep-mask of call rows ``r0..r1-1`` over keys ``key_index``: bool ``[Bp, Hp, r1 - r0, M]``."""
        dev = self.device
        pos = self.row_positions()[r0:r1]
        j = key_index.to(device=dev, dtype=torch.int64)
        causal = j[None, :] <= pos[:, None]
        vis = self._band_has(pos[:, None], j[None, :])  # [R, M]
        Bp, Hp = self.group_batch, self.group_heads
        vis = vis.expand(Bp * Hp, *vis.shape)
        keys = self._listed_keys()
        if keys is not None and keys.numel():
            rows = torch.arange(r0, r1, device=dev)
            qb = (rows + self.block_shift) // self.block_q
            seg = torch.arange(Bp * Hp, device=dev)[:, None] * self.n_qblocks + qb[None, :]  # [G, R]
            want = seg[:, :, None] * (self.n_kblocks + 1) + (j // self.block_k)[None, None, :]  # [G, R, M]
            at = torch.searchsorted(keys, want.reshape(-1)).clamp(max=keys.numel() - 1)
            vis = vis | (keys[at] == want.reshape(-1)).view(want.shape)
        if self.columns is not None:
            cm = torch.zeros(Bp * Hp, self.nk + 1, dtype=torch.bool, device=dev)
            c = self.columns.reshape(Bp * Hp, -1)
            cm.scatter_(1, torch.where(c >= 0, c, torch.full_like(c, self.nk)), True)
            vis = vis | cm[:, j][:, None, :]
        return (vis & causal[None]).view(Bp, Hp, r1 - r0, j.numel())

    def mask(self) -> torch.Tensor:
        """bool ``[Bp, Hp, nq, nk]`` (broadcast it with :meth:`expand`). Small sizes only."""
        return self.keep(0, self.nq, torch.arange(self.nk, device=self.device))

    def expand(self, t: torch.Tensor) -> torch.Tensor:
        """A ``[Bp, Hp, ...]`` tensor broadcast to ``[batch, q_heads, ...]`` (a view where possible)."""
        rep = self.q_heads // self.group_heads
        if rep > 1:
            t = t.repeat_interleave(rep, dim=1)
        return t.expand(self.batch, self.q_heads, *t.shape[2:])

    def candidate_keys(self, r0: int, r1: int) -> torch.Tensor:
        """Sorted keys some row of ``r0..r1-1`` may see (a superset; the reference's key set)."""
        pos = self.row_positions()
        p0, p1 = int(pos[r0]), int(pos[r1 - 1])
        if self.is_band:
            s = min(self.sink, p1 + 1)
            lo = max(s, p0 - self.window + 1) if self.window else p1 + 1
            return torch.cat([torch.arange(s, device=self.device), torch.arange(lo, p1 + 1, device=self.device)])
        return torch.arange(p1 + 1, device=self.device)

    def head(self, n: int) -> "Pattern":
        """The same pattern over the first ``n`` rows only (``1 <= n <= nq``)."""
        if not 1 <= n <= self.nq:
            raise PatternError(f"Pattern.head: n must be in [1, nq={self.nq}], got {n}")
        if n == self.nq:
            return self
        indptr = indices = None
        if self.block_indptr is not None:
            nqb = -(-(n + self.block_shift) // self.block_q)
            NQB = self.n_qblocks
            seg = (torch.arange(self.groups, device=self.device)[:, None] * NQB
                   + torch.arange(nqb, device=self.device)[None, :]).reshape(-1)
            lengths = self.block_indptr[seg + 1] - self.block_indptr[seg]
            idx, _ = _ranges(self.block_indptr[seg], lengths)
            indptr = torch.zeros(seg.numel() + 1, dtype=torch.int64, device=self.device)
            indptr[1:] = lengths.cumsum(0)
            indices = self.block_indices[idx]
        return Pattern(
            batch=self.batch, q_heads=self.q_heads, kv_heads=self.kv_heads, nq=n, nk=self.nk,
            q_offset=self.q_offset, positions=None if self.positions is None else self.positions[:n],
            window=self.window, sink=self.sink, block_q=self.block_q, block_k=self.block_k,
            block_shift=self.block_shift, group_batch=self.group_batch, group_heads=self.group_heads,
            block_indptr=indptr, block_indices=indices, columns=self.columns, device=self.device,
            canonical=self.canonical,
        )

    # ------------------------------------------------------------------ lowering
    def lower(self) -> Lowered:
        """The executable lists (see :class:`Lowered`), built once and cached."""
        if "lowered" not in self._cache:
            self._cache["lowered"] = _lower(self)
        return self._cache["lowered"]

    # ------------------------------------------------------------------ counting
    def pairs(self) -> torch.Tensor:
        """Exact (row, key) pairs per group: int64 ``[Bp, Hp]`` (each query head of the group sees these)."""
        if "pairs" not in self._cache:
            self._cache["pairs"] = _pairs(self)
        return self._cache["pairs"]

    def pairs_per_head(self) -> torch.Tensor:
        """int64 ``[batch, q_heads]``."""
        return self.expand(self.pairs())

    def mean_pairs(self):
        """Pairs per (batch item, query head), averaged: an int when every head sees the same count."""
        p = self.pairs_per_head()
        total = int(p.sum())
        n = p.numel()
        return total // n if total % n == 0 else total / n

    def dense_pairs(self) -> int:
        """Pairs of the same rows under dense causal attention (per batch item and head)."""
        return int((self.row_positions() + 1).sum())

    def density(self) -> float:
        d = self.dense_pairs()
        return self.mean_pairs() / d if d else 0.0

    # ------------------------------------------------------------------ pictures
    def density_map(self, bins: int = 64, *, batch_index: int = 0, head: int = 0, chunk: int = 256) -> torch.Tensor:
        """Fraction of visible pairs per cell of a ``bins x bins`` grid over (rows, keys) of one head.

        Returns float64 ``[min(bins, nq), min(bins, nk)]``: cell (a, b) covers rows
        ``[a*nq/bins, (a+1)*nq/bins)`` and keys ``[b*nk/bins, (b+1)*nk/bins)``.
        """
        g = self.group_of(batch_index, head)
        bq, bk = min(bins, self.nq), min(bins, self.nk)
        out = torch.zeros(bq, bk, dtype=torch.float64)
        cnt = torch.zeros(bq, bk, dtype=torch.float64)
        keys = torch.arange(self.nk, device=self.device)
        kbin = (keys * bk // self.nk).cpu()
        for r0 in range(0, self.nq, chunk):
            r1 = min(self.nq, r0 + chunk)
            m = self.keep(r0, r1, keys).reshape(self.groups, r1 - r0, self.nk)[g].double().cpu()
            rbin = torch.arange(r0, r1) * bq // self.nq
            idx = (rbin[:, None] * bk + kbin[None, :]).reshape(-1)
            out.view(-1).index_add_(0, idx, m.reshape(-1))
            cnt.view(-1).index_add_(0, idx, torch.ones(idx.numel(), dtype=torch.float64))
        return out / cnt.clamp(min=1)

    def ascii(self, width: int = 64, **kw) -> str:
        """The density map as text: ' ' none, '.' < 25%, ':' < 50%, '+' < 75%, '#' more."""
        m = self.density_map(width, **kw)
        chars = []
        for row in m.tolist():
            chars.append("".join(" " if x == 0 else "." if x < 0.25 else ":" if x < 0.5 else "+" if x < 0.75 else "#"
                                 for x in row))
        return "\n".join(chars)

    def save_png(self, path, *, bins: int = 512, title: Optional[str] = None, **kw) -> str:
        """Save a picture of one head's pattern (needs matplotlib: ``pip install "sparsekit-prefill[plot]"``)."""
        try:
            import matplotlib

            matplotlib.use("Agg")
            import matplotlib.pyplot as plt
        except ImportError as exc:
            raise ImportError('Pattern.save_png needs matplotlib: pip install "sparsekit-prefill[plot]"') from exc
        m = self.density_map(bins, **kw)
        fig, ax = plt.subplots(figsize=(6, 6))
        ax.imshow(m.numpy(), cmap="Greys", vmin=0, vmax=1, interpolation="nearest",
                  extent=(0, self.nk, self.row_positions()[-1].item() + 1, self.row_positions()[0].item()))
        ax.set_xlabel("key")
        ax.set_ylabel("query position")
        ax.set_title(title or f"{self.describe()}\ndensity {self.density():.2%}", fontsize=8)
        fig.tight_layout()
        fig.savefig(str(path), dpi=120)
        plt.close(fig)
        return str(path)

    def describe(self) -> str:
        parts = []
        if self.window >= self.nk:
            parts.append("causal")
        elif self.window or self.sink:
            parts.append(f"band(window={self.window}, sink={self.sink})")
        heads = {1: "shared", self.kv_heads: "per KV head", self.q_heads: "per query head"}[self.group_heads]
        if self.block_indptr is not None:
            parts.append(f"{self.block_indices.numel():,} blocks of {self.block_q}x{self.block_k} ({heads})")
        if self.columns is not None:
            parts.append(f"<= {self.columns.shape[-1]} columns ({heads})")
        rows = "gathered rows" if self.positions is not None else f"q_offset={self.q_offset}"
        return f"{' + '.join(parts) or 'empty'}; nq={self.nq}, nk={self.nk}, {rows}"

    def __repr__(self) -> str:
        return f"Pattern({self.describe()})"


# ---------------------------------------------------------------------------- helpers
def _padded_to_csr(blocks: torch.Tensor):
    b = blocks.reshape(-1, blocks.shape[-1]).to(torch.int64)
    valid = b >= 0
    cnt = valid.sum(-1)
    indptr = torch.zeros(b.shape[0] + 1, dtype=torch.int64, device=b.device)
    indptr[1:] = cnt.cumsum(0)
    return indptr, b[valid]


def _canonical_csr(indptr: torch.Tensor, indices: torch.Tensor, nkb: int):
    """Sort each segment ascending and drop repeats and out-of-range ids."""
    S = indptr.numel() - 1
    cnt = indptr[1:] - indptr[:-1]
    seg = torch.repeat_interleave(torch.arange(S, device=indptr.device), cnt, output_size=indices.numel())
    kb = indices.to(torch.int64)
    ok = (kb >= 0) & (kb < nkb)
    key = torch.unique(seg[ok] * (nkb + 1) + kb[ok])  # sorted
    seg2 = key // (nkb + 1)
    new = torch.zeros(S + 1, dtype=torch.int64, device=indptr.device)
    new[1:] = torch.bincount(seg2, minlength=S).cumsum(0)
    return new, (key % (nkb + 1)).to(torch.int32)


def _ranges(starts: torch.Tensor, lengths: torch.Tensor):
    """Concatenated ``arange(s, s + n)`` for each (s, n); returns (values, owner index)."""
    total = int(lengths.sum())
    owner = torch.repeat_interleave(torch.arange(lengths.numel(), device=lengths.device), lengths, output_size=total)
    first = torch.cumsum(lengths, 0) - lengths
    return starts[owner] + torch.arange(total, device=lengths.device) - first[owner], owner


def _band_blocks(p: Pattern):
    """Band key blocks per query block: (qblock owner, kblock, full flag) int64 tensors."""
    if not (p.window or p.sink):
        z = torch.zeros(0, dtype=torch.int64, device=p.device)
        return z, z, z
    bk = p.block_k
    pf, pl = p.block_positions()
    s_end = -(-torch.clamp(pl + 1, max=p.sink) // bk)
    if p.window:
        w_start = torch.maximum(s_end, torch.clamp(pf - p.window + 1, min=0) // bk)
        w_end = pl // bk + 1
    else:
        w_start = w_end = s_end
    n_w = torch.clamp(w_end - w_start, min=0)
    kb_s, own_s = _ranges(torch.zeros_like(s_end), s_end)
    kb_w, own_w = _ranges(w_start, n_w)
    kb = torch.cat([kb_s, kb_w])
    own = torch.cat([own_s, own_w])
    k0 = kb * bk
    k1 = torch.clamp(k0 + bk, max=p.nk)
    full = k1 <= p.sink
    if p.window:
        full = full | (k0 >= pl[own] - p.window + 1)
    return own, kb, full.to(torch.int64)


def _lower(p: Pattern) -> Lowered:
    dev = p.device
    G, NQB, NKB = p.groups, p.n_qblocks, p.n_kblocks
    S = G * NQB
    pf, pl = p.block_positions()
    own_b, kb_b, full_b = _band_blocks(p)
    last_kb = pl // p.block_k  # blocks after the block of the last row are never visible
    parts_seg, parts_kb, parts_full = [], [], []
    if own_b.numel():
        gg = torch.arange(G, device=dev)
        parts_seg.append((gg[:, None] * NQB + own_b[None, :]).reshape(-1))
        parts_kb.append(kb_b.repeat(G))
        parts_full.append(full_b.repeat(G))
    listed_only = own_b.numel() == 0
    if p.block_indptr is not None:
        cnt = p.block_indptr[1:] - p.block_indptr[:-1]
        seg = torch.repeat_interleave(torch.arange(S, device=dev), cnt, output_size=p.block_indices.numel())
        kb = p.block_indices.to(torch.int64)
        if not (p.canonical and listed_only):
            ok = kb <= last_kb[seg % NQB]
            if not bool(ok.all()):
                seg, kb = seg[ok], kb[ok]
                listed_only = False  # counts changed: rebuild indptr below
        parts_seg.append(seg)
        parts_kb.append(kb)
        parts_full.append(torch.full_like(kb, FULL))
    if listed_only and p.block_indptr is not None:
        indptr, kblock = p.block_indptr, p.block_indices
        full = torch.ones(kblock.numel(), dtype=torch.int8, device=dev)
    elif parts_seg:
        seg = torch.cat(parts_seg)
        kb = torch.cat(parts_kb)
        fl = torch.cat(parts_full)
        key = seg * (NKB + 1) + kb
        order = torch.argsort(key, stable=True)
        key, fl = key[order], fl[order]
        ukey, inv = torch.unique_consecutive(key, return_inverse=True)
        full = torch.zeros(ukey.numel(), dtype=torch.int64, device=dev).scatter_reduce(0, inv, fl, "amax")
        useg = ukey // (NKB + 1)
        kblock = (ukey % (NKB + 1)).to(torch.int32)
        indptr = torch.zeros(S + 1, dtype=torch.int64, device=dev)
        indptr[1:] = torch.bincount(useg, minlength=S).cumsum(0)
        full = full.to(torch.int8)
    else:
        indptr = torch.zeros(S + 1, dtype=torch.int64, device=dev)
        kblock = torch.zeros(0, dtype=torch.int32, device=dev)
        full = torch.zeros(0, dtype=torch.int8, device=dev)
    col_indptr = torch.zeros(S + 1, dtype=torch.int64, device=dev)
    col_index = torch.zeros(0, dtype=torch.int64, device=dev)
    if p.columns is not None:
        col_indptr, col_index = _lower_columns(p, indptr, kblock, full, pl)
    return Lowered(indptr, kblock, full, col_indptr, col_index, G, NQB)


def _lower_columns(p: Pattern, indptr, kblock, full, pl):
    """Columns per (group, query block) that the block list does not already hold."""
    dev = p.device
    G, NQB, NKB = p.groups, p.n_qblocks, p.n_kblocks
    cols = p.columns.reshape(G, -1)
    cnt = indptr[1:] - indptr[:-1]
    seg_of = torch.repeat_interleave(torch.arange(G * NQB, device=dev), cnt, output_size=kblock.numel())
    fkeys = (seg_of * (NKB + 1) + kblock.to(torch.int64))[full.bool()]  # sorted: full listed blocks
    chunk = max(1, (1 << 24) // max(1, NQB * cols.shape[1]))
    counts, values = [], []
    for g0 in range(0, G, chunk):
        g1 = min(G, g0 + chunk)
        c = cols[g0:g1][:, None, :]  # [g, 1, C]
        qb = torch.arange(NQB, device=dev)[None, :, None]
        keep = (c >= 0) & (c <= pl[None, :, None]) & (c >= p.sink)
        if p.window:
            keep = keep & (c < pl[None, :, None] - p.window + 1)
        if fkeys.numel():
            seg = torch.arange(g0, g1, device=dev)[:, None, None] * NQB + qb
            want = seg * (NKB + 1) + torch.where(c >= 0, c, torch.zeros_like(c)) // p.block_k
            at = torch.searchsorted(fkeys, want.reshape(-1)).clamp(max=fkeys.numel() - 1)
            keep = keep & (fkeys[at] != want.reshape(-1)).view(want.shape)
        keep = keep.expand(g1 - g0, NQB, c.shape[-1])
        counts.append(keep.sum(-1).reshape(-1))
        values.append(c.expand(g1 - g0, NQB, c.shape[-1])[keep])
    cnt = torch.cat(counts)
    col_indptr = torch.zeros(G * NQB + 1, dtype=torch.int64, device=dev)
    col_indptr[1:] = cnt.cumsum(0)
    return col_indptr, torch.cat(values)


def _pairs(p: Pattern) -> torch.Tensor:
    dev = p.device
    Bp, Hp = p.group_batch, p.group_heads
    pos = p.row_positions()
    if p.is_band:
        total = int(p._band_count(pos).sum())
        return torch.full((Bp, Hp), total, dtype=torch.int64)
    L = p.lower()
    NQB = p.n_qblocks
    rb = p.row_bounds()
    S_pre = torch.zeros(p.nq + 1, dtype=torch.int64, device=dev)
    S_pre[1:] = pos.cumsum(0)
    cnt = L.indptr[1:] - L.indptr[:-1]
    seg = torch.repeat_interleave(torch.arange(L.groups * NQB, device=dev), cnt, output_size=L.kblock.numel())
    qb = seg % NQB
    r0, r1 = rb[qb], rb[qb + 1]
    k0 = L.kblock.to(torch.int64) * p.block_k
    k1 = torch.clamp(k0 + p.block_k, max=p.nk)
    isfull = L.full.bool()

    def causal_sum(r0, r1, k0, k1):
        # sum over rows r in [r0, r1) of clamp(min(k1, pos[r] + 1) - k0, 0); empty blocks give 0
        a = torch.clamp(torch.searchsorted(pos, k0), min=r0, max=r1)
        c = torch.clamp(torch.searchsorted(pos, k1 - 1), min=r0, max=r1)
        c = torch.maximum(c, a)
        s = (r1 - c) * (k1 - k0) + (S_pre[c] - S_pre[a]) + (c - a) * (1 - k0)
        return torch.where(k1 > k0, s, torch.zeros_like(s))

    per_entry = torch.zeros(L.kblock.numel(), dtype=torch.int64, device=dev)
    if isfull.any():
        f = isfull
        per_entry[f] = causal_sum(r0[f], r1[f], k0[f], k1[f])
    band = ~isfull
    if band.any():
        b = band.nonzero().squeeze(1)
        # sink part: a causal block [k0, min(k1, sink))
        sk1 = torch.clamp(k1[b], max=p.sink)
        part = causal_sum(r0[b], r1[b], k0[b], torch.maximum(sk1, k0[b]))
        # window part, row by row: |[max(k0, sink, pos - window + 1), min(k1, pos + 1))|
        if p.window:
            span = p.block_q
            step = max(1, (1 << 22) // span)
            for i in range(0, b.numel(), step):
                bb = b[i : i + step]
                rows = r0[bb][:, None] + torch.arange(span, device=dev)[None, :]
                valid = rows < r1[bb][:, None]
                pr = pos[rows.clamp(max=p.nq - 1)]
                lo = torch.maximum(torch.clamp(k0[bb], min=p.sink)[:, None], pr - p.window + 1)
                hi = torch.minimum(k1[bb][:, None], pr + 1)
                w = torch.clamp(hi - lo, min=0) * valid
                part[i : i + step] += w.sum(-1)
        per_entry[b] = part
    g_of_entry = seg // NQB
    total = torch.zeros(L.groups, dtype=torch.int64, device=dev).scatter_add_(0, g_of_entry, per_entry)
    if L.has_columns:
        ccnt = L.col_indptr[1:] - L.col_indptr[:-1]
        cseg = torch.repeat_interleave(torch.arange(L.groups * NQB, device=dev), ccnt, output_size=L.col_index.numel())
        cq = cseg % NQB
        j = L.col_index
        thr = j + p.window if p.window else j
        first = torch.clamp(torch.searchsorted(pos, thr), min=rb[cq], max=rb[cq + 1])
        total.scatter_add_(0, cseg // NQB, rb[cq + 1] - first)
    return total.view(Bp, Hp).cpu()
