"""The two small plug-in kinds of ``block_threshold``: block scorers and keep rules.

A **scorer** estimates, for every (group, query block, key block), the share of the query block's
attention that falls on the key block: a float32 map ``P`` ``[B, G, R, n_kblocks]``, ``>= 0``,
zero on key blocks the query block cannot see, each row summing to 1 (up to rounding). A **keep
rule** reads ``P`` and says which blocks are kept. Both are dataclasses; their fields are their
options. They register like every sparsekit plug-in, through entry points (groups
``sparsekit.block_scorers`` and ``sparsekit.block_rules``; first-party ones too), and are named in
a backend spec as nested calls: ``block_threshold(scorer=antidiagonal(stride=8),rule=mass(tau=0.9))``.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar, Optional

import torch

from sparsekit.registry import Registry
from sparsekit.spec import SpecError, format_spec, instantiate, parse_spec

__all__ = ["Geometry", "BlockScorer", "KeepRule", "SCORERS", "RULES", "build_piece"]

SCORERS = Registry("block scorer", "sparsekit.block_scorers")
RULES = Registry("keep rule", "sparsekit.block_rules")


@dataclass
class Geometry:
    """The block grid of one call (built by the backend, read by scorers and rules).

    Query block ``b`` holds call rows ``[b*block_q, min((b+1)*block_q, nq))`` (absolute positions
    ``q_offset + row``); key block ``j`` holds keys ``[j*block_k, min((j+1)*block_k, nk))``.
    Groups: ``G = kv_heads`` (the query heads of one KV head share a selection) or ``G = q_heads``.
    """

    batch: int
    q_heads: int
    kv_heads: int
    groups: int
    nq: int
    nk: int
    q_offset: int
    block_q: int
    block_k: int
    scale: float
    device: torch.device

    @property
    def heads_per_group(self) -> int:
        return self.q_heads // self.groups

    @property
    def n_qblocks(self) -> int:
        return -(-self.nq // self.block_q)

    @property
    def n_kblocks(self) -> int:
        return -(-self.nk // self.block_k)

    def last_pos(self, qb0: int = 0, qb1: Optional[int] = None) -> torch.Tensor:
        """(qb1 - qb0,) int64: absolute position of the last row of each query block."""
        qb1 = self.n_qblocks if qb1 is None else qb1
        b = torch.arange(qb0, qb1, device=self.device, dtype=torch.int64)
        return self.q_offset + torch.clamp((b + 1) * self.block_q, max=self.nq) - 1

    def first_pos(self, qb0: int = 0, qb1: Optional[int] = None) -> torch.Tensor:
        qb1 = self.n_qblocks if qb1 is None else qb1
        b = torch.arange(qb0, qb1, device=self.device, dtype=torch.int64)
        return self.q_offset + b * self.block_q

    def visible(self, qb0: int, qb1: int) -> torch.Tensor:
        """bool ``[qb1 - qb0, n_kblocks]``: key blocks holding a key some row of the query block sees."""
        kb = torch.arange(self.n_kblocks, device=self.device, dtype=torch.int64)
        return (kb[None, :] * self.block_k) <= self.last_pos(qb0, qb1)[:, None]

    def kv_head_of_group(self) -> torch.Tensor:
        """(G,) int64: the KV head read by each group."""
        g = torch.arange(self.groups, device=self.device)
        return g // (self.groups // self.kv_heads)


class BlockScorer:
    """Estimates the attention share of each key block (module docstring).

    Subclasses (dataclasses) implement :meth:`prepare` (whatever a call needs once: pooled means,
    global statistics) and :meth:`scores`.
    """

    name: ClassVar[str] = ""
    kind: ClassVar[str] = "block scorer"
    #: query blocks scored per :meth:`scores` call (bounds the memory of the map)
    chunk_cells: ClassVar[int] = 1 << 27

    def prepare(self, geo: Geometry, q: torch.Tensor, k: torch.Tensor, *, use_triton: bool):
        """State for :meth:`scores`. q (B, Hq, nq, D), k (B, Hkv, nk, D)."""
        raise NotImplementedError(f"block scorer {self.name!r} must implement prepare(geo, q, k, use_triton=)")

    def scores(self, state, qb0: int, qb1: int) -> torch.Tensor:
        """float32 ``[B, G, qb1 - qb0, n_kblocks]`` (module docstring)."""
        raise NotImplementedError(f"block scorer {self.name!r} must implement scores(state, qb0, qb1)")

    def check(self, block_q: int, block_k: int) -> None:
        """Raise ValueError when this scorer cannot work on the backend's block sizes."""

    def __str__(self) -> str:
        return _format(self)


class KeepRule:
    """Which scored key blocks a query block keeps."""

    name: ClassVar[str] = ""
    kind: ClassVar[str] = "keep rule"

    def keep(self, P: torch.Tensor, visible: torch.Tensor) -> torch.Tensor:
        """bool like ``P`` ``[B, G, R, n_kblocks]``; ``visible`` bool ``[R, n_kblocks]``.

        Only visible blocks may be kept (the backend also intersects with ``visible``).
        """
        raise NotImplementedError(f"keep rule {self.name!r} must implement keep(P, visible)")

    def __str__(self) -> str:
        return _format(self)


def _format(obj) -> str:
    return format_spec(obj)


def build_piece(registry: Registry, base: type, spec, owner: str, option: str):
    """A scorer / rule instance from a name, a spec string ``"mass(tau=0.9)"``, a dict or an instance."""
    if isinstance(spec, base):
        return spec
    if isinstance(spec, str):
        try:
            parts = parse_spec(spec)
        except SpecError as e:
            raise ValueError(f"{owner}: {option} {spec!r} is not a valid spec: {e}") from None
        if len(parts) != 1:
            raise ValueError(f"{owner}: {option} must name one {registry.kind}, got {spec!r}")
        spec = parts[0]
    if not isinstance(spec, dict) or "name" not in spec:
        raise TypeError(
            f"{owner}: {option} must be a {registry.kind} name, a spec string such as 'name(x=1)', a dict with "
            f"'name', or a {base.__name__} instance; got {spec!r}"
        )
    opts = dict(spec)
    cls = registry.get(opts.pop("name"))
    if not (isinstance(cls, type) and issubclass(cls, base)):
        raise TypeError(f"{owner}: the {registry.kind} {cls!r} must subclass {base.__module__}.{base.__name__}")
    try:
        return instantiate(cls, opts)
    except TypeError as e:
        raise TypeError(f"{owner}: {e}") from None
