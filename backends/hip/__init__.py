"""HiP: hierarchically pruned attention, our own implementation (a package: selection, pattern, kernels).

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

Files: ``selection.py`` (the scan, top-k and exact block scores, torch reference and Triton scorers),
``triton_scoring.py`` (the scoring kernels), this file (options and the pattern). The attention itself
runs through sparsekit's executor like every backend's pattern.

Defaults follow the Δ paper's HiP setting (sink 1024, window 1024, top-k 2048 keys, query
blocks of 64, four-fold query sampling in the scan); see ``docs/hip.md`` for what differs
from the official package and why.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import ClassVar

import torch

from sparsekit.base import Backend
from sparsekit.pattern import Pattern
from sparsekit.validate import MAX_TOKENS, check_int_option

from .selection import Selection, select

__all__ = ["HiP", "Selection", "select", "parse_stages"]


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


def _up(x: float, m: int) -> int:
    """``x`` rounded up to a positive multiple of ``m``."""
    return max(m, int(math.ceil(x / m)) * m)


def _near(x: float, m: int) -> int:
    """``x`` rounded to the nearest positive multiple of ``m``."""
    return max(m, int(round(x / m)) * m)


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
    data_dependent: ClassVar[bool] = True
    k: int = 2048
    block_q: int = 64
    block_k: int = 64
    stages: str = "256:16384"
    q_stride: int = 4
    sink: int = 1024
    window: int = 1024
    share_kv: bool = True

    def __post_init__(self):
        self.k = check_int_option("hip", "k", self.k, 1, maximum=MAX_TOKENS)
        self.block_q = check_int_option("hip", "block_q", self.block_q, 1, maximum=MAX_TOKENS)
        self.block_k = check_int_option("hip", "block_k", self.block_k, 1, maximum=MAX_TOKENS)
        self.q_stride = check_int_option("hip", "q_stride", self.q_stride, 1, maximum=MAX_TOKENS)
        self.sink = check_int_option("hip", "sink", self.sink, 0, maximum=MAX_TOKENS)
        self.window = check_int_option("hip", "window", self.window, 1, maximum=MAX_TOKENS)
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

    @classmethod
    def sweep(cls, n: int) -> list:
        """``sparsekit sweep``'s settings: sink = window = ``n / 256`` (whole 64-key blocks), ``k`` from
        ``n / 256`` to ``n / 4``, one coarse stage of 256-key chunks keeping ``8 k`` (none once that covers ``n``)."""
        bk = 64
        sw = _up(n / 256, bk)
        out = []
        for f in (1 / 256, 1 / 128, 1 / 64, 1 / 32, 1 / 16, 1 / 8, 1 / 4):
            k = _near(f * n, bk)
            keep = _up(max(8 * k, k + 256), 256)
            stages = f"256:{keep}" if keep < n else ""
            out.append(dict(series=cls.name, label=f"k={k}", options=dict(k=k, sink=sw, window=sw, stages=stages)))
        return out

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

    # ------------------------------------------------------------------ the pattern
    def pattern(self, q, k, *, scale: float, q_offset: int) -> Pattern:
        """Selection (the data-dependent part), then sink + selected blocks + window as block lists."""
        return self.pattern_from(select(self, q, k, q_offset), q, k, q_offset)

    def pattern_from(self, sel: Selection, q, k, q_offset: int) -> Pattern:
        """The :class:`~sparsekit.pattern.Pattern` of a :class:`Selection` (one group per selection head)."""
        B, Hs, NBq, n = sel.blocks.shape
        bk, nq, dev = self.block_k, q.shape[2], q.device
        p_last = q_offset + torch.clamp(torch.arange(NBq, device=dev) * self.block_q + self.block_q, max=nq) - 1
        last_blk = p_last // bk  # [NBq]
        n_sink = sel.sink_end // bk
        sink = torch.arange(n_sink, device=dev)[None, :].expand(NBq, n_sink)
        sink = torch.where(sink <= last_blk[:, None], sink, torch.full_like(sink, -1))
        w0 = torch.clamp(sel.win_start.to(dev), min=sel.sink_end) // bk
        n_win = int((last_blk - w0).max()) + 1 if NBq else 0
        win = w0[:, None] + torch.arange(max(n_win, 0), device=dev)[None, :]
        win = torch.where(win <= last_blk[:, None], win, torch.full_like(win, -1))
        lists = torch.cat([sink.expand(B, Hs, NBq, n_sink), sel.blocks.to(torch.int64),
                           win.expand(B, Hs, NBq, win.shape[-1])], dim=-1)  # ascending, -1 gaps
        return Pattern.from_blocks(q, k, q_offset=q_offset, block_q=self.block_q, block_k=bk, blocks=lists,
                                   groups=(B, Hs), sorted_unique=True)

    def cost_bound(self, nq: int, nk: int, q_offset: int) -> int:
        """Pairs per (batch, head) when every budget is filled (the selection fills it whenever the
        candidates allow, so this is exact for a dense enough prefix; a plan's cost is always exact)."""
        S = self.sink_end()
        pos = q_offset + torch.arange(nq, dtype=torch.int64)
        W = self.win_starts(nq, q_offset)[torch.arange(nq) // self.block_q]
        sink = torch.clamp(pos + 1, max=S)
        window = torch.clamp(pos + 1 - torch.clamp(W, min=S), min=0)
        ncand = torch.clamp((W - S) // self.block_k, min=0)
        sel = torch.clamp(ncand, max=self.n_select) * self.block_k
        return int((sink + window + sel).sum())
