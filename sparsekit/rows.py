"""The anchor/tail row policy of the Δ paper, in one place.

Correctors, cost accounting and tests all read it from here.

For a query block of ``nq`` rows and stride ``gamma``:

* the **dense tail** is the last ``nq % gamma + max(128, gamma)`` rows (the official code's
  ``cut_n``), clamped to ``nq``; ``tail=`` overrides the count (0 allowed);
* the **body** is the rows before the tail; it is cut into blocks of ``gamma`` rows
  (the last block may be shorter when ``tail`` is overridden);
* the **anchors** are the first row of every body block: rows ``0, gamma, 2*gamma, ...``
  (0-based within the query block). Anchor and tail rows are computed key-dense.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from .validate import check_int_option

__all__ = ["RowPlan", "plan_rows", "default_tail", "causal_pairs"]


def causal_pairs(nq: int, q_offset: int, first_row: int = 0) -> int:
    """Pairs seen by rows ``first_row .. first_row + nq - 1`` under dense causal attention
    (row r sees ``q_offset + r + 1`` keys)."""
    return nq * (q_offset + first_row + 1) + nq * (nq - 1) // 2


def default_tail(nq: int, gamma: int) -> int:
    """``nq % gamma + max(128, gamma)`` clamped to ``nq`` (the paper's dense tail)."""
    return min(nq, nq % gamma + max(128, gamma))


@dataclass(frozen=True)
class RowPlan:
    """Which query rows a corrector computes densely."""

    nq: int
    gamma: int
    n_body: int

    @property
    def needs_sparse(self) -> bool:
        """Whether any row keeps the backend's (sparse) result: False when the tail is every row."""
        return self.n_body > 0

    @property
    def n_sparse(self) -> int:
        """Rows ``0..n_sparse-1`` need the backend's values (the body); the tail's are not computed."""
        return self.n_body

    @property
    def n_tail(self) -> int:
        return self.nq - self.n_body

    @property
    def n_blocks(self) -> int:
        """Number of body blocks (= number of anchors)."""
        return -(-self.n_body // self.gamma)

    def anchors(self, device=None) -> torch.Tensor:
        """Anchor rows ``0, gamma, ...`` below ``n_body``, int64 ``[n_blocks]``."""
        return torch.arange(0, self.n_body, self.gamma, device=device)

    def dense_rows(self, device=None) -> torch.Tensor:
        """Anchors followed by the tail rows, int64 ``[n_blocks + n_tail]``, sorted."""
        return torch.cat(
            [self.anchors(device), torch.arange(self.n_body, self.nq, device=device)]
        )

    def block_of_row(self, device=None) -> torch.Tensor:
        """For each body row, the index of its block (``row // gamma``), int64 ``[n_body]``."""
        return torch.arange(self.n_body, device=device) // self.gamma

    def dense_pairs(self, q_offset: int) -> int:
        """(query, key) pairs the dense rows attend: row r sees ``q_offset + r + 1`` keys."""
        g, nb = self.gamma, self.n_blocks
        # anchors r = g*j, j < nb: sum (q_offset + 1 + g*j)
        anchors = nb * (q_offset + 1) + g * nb * (nb - 1) // 2
        return anchors + causal_pairs(self.n_tail, q_offset, first_row=self.n_body)


def plan_rows(nq: int, gamma: int, tail: int | None = None) -> RowPlan:
    """Return the :class:`RowPlan` for ``nq`` query rows, stride ``gamma``, optional tail override."""
    nq = check_int_option("plan_rows", "nq", nq, 0)
    gamma = check_int_option("plan_rows", "gamma", gamma, 1)
    tail = check_int_option("plan_rows", "tail", tail, 0, allow_none=True)
    n_tail = default_tail(nq, gamma) if tail is None else min(nq, tail)
    return RowPlan(nq=nq, gamma=gamma, n_body=nq - n_tail)
