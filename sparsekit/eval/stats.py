"""Interval estimates for the eval verdict: pure functions of plain numbers (no model, no transformers).

* :func:`wilson` - Wilson score interval of a proportion ``k / n`` (accuracy of one config).
* :func:`paired_difference` - mean of per-item differences ``a_i - b_i`` of two configs scored on the
  same items (questions, tokens) with an interval from a paired cluster bootstrap (default) or a normal
  approximation. Items that share a cluster (questions over one context, consecutive tokens of one
  text) are resampled together, because they are not independent.
* :func:`perplexity_ratio` - ``ppl_a / ppl_b = exp(mean(nll_a - nll_b))`` over the same scored tokens,
  with the interval of :func:`paired_difference` over blocks of consecutive tokens, exponentiated.
* :func:`wins_losses` - paired counts of items where ``a`` beats ``b`` and the reverse;
  :func:`sign_test` - the exact two-sided sign (McNemar) test of such counts, a small-sample guard.

The bootstrap is seeded (``seed``, default 0): the same inputs give the same interval.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from statistics import NormalDist
from typing import Hashable, Optional, Sequence

__all__ = [
    "Interval",
    "wilson",
    "z_value",
    "paired_difference",
    "perplexity_ratio",
    "token_blocks",
    "sign_test",
    "wins_losses",
]


@dataclass(frozen=True)
class Interval:
    """A point estimate with a two-sided interval.

    estimate : float
    lo, hi : float
        Interval bounds (NaN when it cannot be estimated, e.g. a single cluster).
    level : float
        Coverage, e.g. 0.95.
    n : int
        Number of paired items.
    clusters : int
        Number of independent units resampled (items when there are no clusters).
    """

    estimate: float
    lo: float
    hi: float
    level: float = 0.95
    n: int = 0
    clusters: int = 0

    @property
    def known(self) -> bool:
        """False when the bounds are NaN (too few clusters)."""
        return not (math.isnan(self.lo) or math.isnan(self.hi))

    def compare(self, null: float = 0.0) -> str:
        """``"above"`` / ``"below"`` when the whole interval lies above / below ``null``; ``"same"`` when the
        estimate and both bounds equal ``null`` (no item differs); ``"within"`` when ``null`` is inside;
        ``"unknown"`` when the bounds are NaN."""
        if self.estimate == null and self.lo == null and self.hi == null:
            return "same"
        if not self.known:
            return "unknown"
        if self.lo > null:
            return "above"
        if self.hi < null:
            return "below"
        return "within"


def z_value(level: float) -> float:
    """Two-sided standard-normal quantile for coverage ``level`` (1.959964 for 0.95)."""
    if not 0.0 < level < 1.0:
        raise ValueError(f"level must be in (0, 1), got {level!r}")
    return NormalDist().inv_cdf(0.5 + level / 2)


def wilson(k: int, n: int, z: float = 1.96) -> tuple:
    """Wilson score interval ``(lo, hi)`` of the proportion ``k / n``; ``(nan, nan)`` when ``n == 0``.

    >>> [round(x, 4) for x in wilson(5, 10)]
    [0.2366, 0.7634]
    """
    if n < 0 or k < 0 or k > n:
        raise ValueError(f"wilson: need 0 <= k <= n, got k={k}, n={n}")
    if n == 0:
        return (float("nan"), float("nan"))
    p = k / n
    d = 1 + z * z / n
    c = (p + z * z / (2 * n)) / d
    h = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / d
    return (max(0.0, c - h), min(1.0, c + h))


def _cluster_totals(diffs: Sequence[float], clusters: Optional[Sequence[Hashable]]) -> tuple:
    """Per-cluster sums and item counts, clusters in first-seen order."""
    if clusters is None:
        return [float(d) for d in diffs], [1] * len(diffs)
    if len(clusters) != len(diffs):
        raise ValueError(f"clusters has {len(clusters)} entries, the paired items are {len(diffs)}")
    index: dict = {}
    sums: list = []
    counts: list = []
    for d, c in zip(diffs, clusters):
        j = index.setdefault(c, len(sums))
        if j == len(sums):
            sums.append(0.0)
            counts.append(0)
        sums[j] += float(d)
        counts[j] += 1
    return sums, counts


def paired_difference(
    a: Sequence[float],
    b: Sequence[float],
    *,
    clusters: Optional[Sequence[Hashable]] = None,
    method: str = "bootstrap",
    level: float = 0.95,
    n_boot: int = 2000,
    seed: int = 0,
) -> Interval:
    """Mean of ``a_i - b_i`` over paired items, with an interval.

    Parameters
    ----------
    a, b : sequences of float, length ``n``
        Per-item scores of two configs on the same items (e.g. 1.0/0.0 correctness per question, or NLL
        per token), in the same order.
    clusters : sequence of hashables, length ``n``, optional
        Cluster of each item (e.g. the context a question was asked over). Whole clusters are resampled;
        the estimate is ``sum(d) / n`` either way. Default: every item is its own cluster.
    method : ``"bootstrap"`` or ``"normal"``
        ``"bootstrap"``: percentile interval of the mean over ``n_boot`` resamples of the clusters with
        replacement (seeded by ``seed``). ``"normal"``: estimate ± z · SE with the cluster-robust
        standard error of a ratio mean, ``SE² = k/(k-1) · Σ_c (D_c - d̄·n_c)² / n²`` (``k`` clusters with
        difference sums ``D_c`` and sizes ``n_c``; with one item per cluster this is ``s² / n``).
    level : float
        Coverage of the interval (default 0.95).

    Returns
    -------
    Interval
        ``estimate`` the mean difference; ``lo``/``hi`` NaN when there are fewer than two clusters.
    """
    if len(a) != len(b):
        raise ValueError(f"paired_difference: a and b must have the same length, got {len(a)} and {len(b)}")
    if method not in ("bootstrap", "normal"):
        raise ValueError(f"paired_difference: method must be 'bootstrap' or 'normal', got {method!r}")
    if n_boot < 1:
        raise ValueError(f"paired_difference: n_boot must be >= 1, got {n_boot}")
    z = z_value(level)
    diffs = [float(x) - float(y) for x, y in zip(a, b)]
    n = len(diffs)
    if n == 0:
        nan = float("nan")
        return Interval(nan, nan, nan, level, 0, 0)
    sums, counts = _cluster_totals(diffs, clusters)
    k = len(sums)
    est = sum(sums) / n
    if all(d == 0.0 for d in diffs):  # no item differs
        return Interval(est, est, est, level, n, k)
    if k < 2:
        return Interval(est, float("nan"), float("nan"), level, n, k)
    if all(d == diffs[0] for d in diffs):  # no spread at all: every resample gives the same mean
        return Interval(est, est, est, level, n, k)
    if method == "normal":
        var = k / (k - 1) * sum((s - est * c) ** 2 for s, c in zip(sums, counts)) / (n * n)
        half = z * math.sqrt(var)
        return Interval(est, est - half, est + half, level, n, k)
    import torch

    g = torch.Generator().manual_seed(int(seed))
    idx = torch.randint(k, (n_boot, k), generator=g)
    s = torch.tensor(sums, dtype=torch.float64)[idx].sum(1)
    c = torch.tensor(counts, dtype=torch.float64)[idx].sum(1)
    q = torch.tensor([(1 - level) / 2, (1 + level) / 2], dtype=torch.float64)
    lo, hi = torch.quantile(s / c, q).tolist()
    # the percentile interval of a discrete statistic can miss the estimate by rounding only
    return Interval(est, min(lo, est), max(hi, est), level, n, k)


def token_blocks(lengths: Sequence[int], block: int) -> list:
    """Cluster ids ``(text, position // block)`` for consecutive tokens of texts of the given lengths.

    >>> token_blocks([3, 2], 2)
    [(0, 0), (0, 0), (0, 1), (1, 0), (1, 0)]
    """
    if block < 1:
        raise ValueError(f"token_blocks: block must be >= 1, got {block}")
    return [(t, i // block) for t, n in enumerate(lengths) for i in range(n)]


def perplexity_ratio(
    nll_a: Sequence[float],
    nll_b: Sequence[float],
    *,
    clusters: Optional[Sequence[Hashable]] = None,
    level: float = 0.95,
    n_boot: int = 2000,
    seed: int = 0,
) -> Interval:
    """``exp(mean(nll_a - nll_b))``: perplexity of ``a`` relative to ``b`` on the same scored tokens.

    Parameters
    ----------
    nll_a, nll_b : sequences of float, length ``n``
        Per-token negative log-likelihoods (nats) of two configs on the same tokens, same order
        (several texts concatenated).
    clusters : sequence of hashables, optional
        Resampling units, typically :func:`token_blocks` (blocks of consecutive tokens within a text:
        neighbouring tokens' losses are correlated). Default: every token on its own.

    Returns
    -------
    Interval
        Ratio and its interval (the bootstrap interval of the mean NLL difference, exponentiated);
        above 1: ``a`` has the higher (worse) perplexity.
    """
    d = paired_difference(nll_a, nll_b, clusters=clusters, level=level, n_boot=n_boot, seed=seed)

    def exp(x):
        return x if math.isnan(x) else math.exp(x)

    return Interval(exp(d.estimate), exp(d.lo), exp(d.hi), level, d.n, d.clusters)


def sign_test(wins: int, losses: int) -> float:
    """Two-sided exact sign test (McNemar's exact test) of ``wins`` vs ``losses`` among discordant pairs.

    The probability, under "either side is equally likely to win a discordant pair", of a split at
    least as uneven as the one seen; 1.0 when there are no discordant pairs.

    >>> round(sign_test(0, 10), 6)
    0.001953
    """
    if wins < 0 or losses < 0:
        raise ValueError(f"sign_test: wins and losses must be >= 0, got {wins}, {losses}")
    n = wins + losses
    if n == 0:
        return 1.0
    tail = sum(math.comb(n, i) for i in range(min(wins, losses) + 1)) / 2**n
    return min(1.0, 2 * tail)


def wins_losses(a: Sequence[float], b: Sequence[float]) -> tuple:
    """``(wins, losses, ties)``: items where ``a > b``, where ``a < b``, and equal (paired, same order)."""
    if len(a) != len(b):
        raise ValueError(f"wins_losses: a and b must have the same length, got {len(a)} and {len(b)}")
    wins = sum(x > y for x, y in zip(a, b))
    losses = sum(x < y for x, y in zip(a, b))
    return wins, losses, len(a) - wins - losses
