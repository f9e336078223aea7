"""Vertical-slash sparse prefill (MInference's dynamic pattern): a package (estimation, pattern).

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

Files: ``estimate.py`` (scores from the last queries and the top-k selection), ``pattern.py`` (the
kept diagonals' pages as block lists, the kept columns as columns). The pattern runs through
sparsekit's executor: on Hopper with FlashInfer as two fa3 paged-prefill passes (the diagonal pages,
causal; the columns as one-key pages, non-causal) merged through the lse (``fa3_paged``), else in
the Triton pattern kernel or FlexAttention, on CPU in the reference.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar, Optional

from sparsekit.base import Backend
from sparsekit.pattern import Pattern
from sparsekit.validate import MAX_TOKENS, check_int_option

from .estimate import Budget, estimate_scores, per_head, select_top, split_budget
from .pattern import slash_lists, vs_pattern

__all__ = ["VerticalSlash", "estimate_scores", "select_top", "slash_lists", "vs_pattern"]


@dataclass
class VerticalSlash(Backend):
    """MInference vertical-slash pattern (https://arxiv.org/abs/2407.02490).

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
    """

    name: ClassVar[str] = "vertical_slash"
    data_dependent: ClassVar[bool] = True
    vertical_size: Budget = 1000
    slash_size: Budget = 6096
    last_q: int = 64
    sink: int = 30
    local: int = 100
    block_q: int = 128
    block_k: int = 64

    def __post_init__(self):
        for what in ("vertical_size", "slash_size"):
            val = getattr(self, what)
            if isinstance(val, (list, tuple, str)):
                parts = split_budget(val)
                if not parts:
                    raise ValueError(f"vertical_slash: {what} needs at least one budget")
                parts = [check_int_option("vertical_slash", what, x, 0, maximum=MAX_TOKENS) for x in parts]
                # stored as "a/b/c" so the spec string round-trips
                setattr(self, what, "/".join(str(x) for x in parts))
            else:
                setattr(self, what, check_int_option("vertical_slash", what, val, 0, maximum=MAX_TOKENS))
        self.last_q = check_int_option("vertical_slash", "last_q", self.last_q, 1, maximum=MAX_TOKENS)
        self.sink = check_int_option("vertical_slash", "sink", self.sink, 0, maximum=MAX_TOKENS)
        self.local = check_int_option("vertical_slash", "local", self.local, 1, maximum=MAX_TOKENS)
        self.block_q = check_int_option("vertical_slash", "block_q", self.block_q, 1, maximum=MAX_TOKENS)
        self.block_k = check_int_option("vertical_slash", "block_k", self.block_k, 1, maximum=MAX_TOKENS)
        if self.block_q % self.block_k:
            raise ValueError(
                f"vertical_slash: block_q ({self.block_q}) must be a multiple of block_k ({self.block_k})"
            )

    @classmethod
    def sweep(cls, n: int) -> list:
        """``sparsekit sweep``'s settings: slash budgets from ``n / 1024`` to ``n / 4`` (at least 16), vertical =
        slash / 6 (MInference's ratio, at least 30), ``local = min(100, slash)``."""
        out = []
        for f in (1 / 1024, 1 / 512, 1 / 256, 1 / 128, 1 / 64, 1 / 32, 1 / 16, 1 / 8, 1 / 4):
            sl = max(16, int(f * n))
            v = max(30, sl // 6)
            loc = min(100, sl)  # the default local=100 unless the slash budget is smaller
            out.append(dict(series=cls.name, label=f"vertical={v},slash={sl}",
                            options=dict(vertical_size=v, slash_size=sl, local=loc)))
        return out

    def unsupported(self, q, k, v) -> Optional[str]:
        Hq = q.shape[1]
        for what in ("vertical_size", "slash_size"):
            val = getattr(self, what)
            if isinstance(val, str) and len(split_budget(val)) != Hq:
                return f"{what} has {len(split_budget(val))} per-head budgets but q has {Hq} heads"
        return None

    def select(self, q, k, *, scale: float, q_offset: int):
        """Estimation and selection: ``(cols, offsets)``, (B, Hq, K) int64 each, ascending, padded with
        ``W = q_offset + q_len``; plus the scores ``(vertical, slash)`` (B, Hq, W)."""
        Hq = q.shape[1]
        vert, slash = estimate_scores(q, k, scale=scale, q_offset=q_offset, last_q=self.last_q)
        cols, _ = select_top(vert, self.sink, per_head(self.vertical_size, Hq, "vertical_size"))
        offs, _ = select_top(slash, self.local, per_head(self.slash_size, Hq, "slash_size"))
        return cols, offs, (vert, slash)

    def pattern(self, q, k, *, scale: float, q_offset: int) -> Pattern:
        cols, offs, _ = self.select(q, k, scale=scale, q_offset=q_offset)
        return vs_pattern(q, k, q_offset=q_offset, cols=cols, offsets=offs, block_q=self.block_q,
                          block_k=self.block_k)
