"""Interval statistics of the eval verdict on constructed inputs with known answers (no transformers)."""

import math
import random

import pytest

from sparsekit.eval.stats import (
    Interval,
    paired_difference,
    perplexity_ratio,
    sign_test,
    token_blocks,
    wilson,
    wins_losses,
    z_value,
)


def test_wilson_known_values():
    lo, hi = wilson(5, 10)
    assert (round(lo, 4), round(hi, 4)) == (0.2366, 0.7634)
    lo, hi = wilson(0, 10)
    assert lo == 0.0 and hi == pytest.approx(1.96**2 / 10 / (1 + 1.96**2 / 10))  # 0.2775
    lo, hi = wilson(10, 10)
    assert hi == 1.0 and lo == pytest.approx(1 - 0.27754, abs=1e-4)
    assert all(math.isnan(x) for x in wilson(0, 0))
    with pytest.raises(ValueError, match="k <= n"):
        wilson(11, 10)


def test_z_value():
    assert z_value(0.95) == pytest.approx(1.959964, abs=1e-6)
    assert z_value(0.90) == pytest.approx(1.644854, abs=1e-6)
    with pytest.raises(ValueError, match="level"):
        z_value(1.0)


def test_normal_interval_known_value():
    # differences 1, 1, 1, 0: mean 0.75, sample sd 0.5, SE 0.25
    iv = paired_difference([1, 1, 1, 0], [0, 0, 0, 0], method="normal")
    assert iv.estimate == 0.75 and iv.n == 4 and iv.clusters == 4
    assert iv.lo == pytest.approx(0.75 - 1.959964 * 0.25, abs=1e-6)
    assert iv.hi == pytest.approx(0.75 + 1.959964 * 0.25, abs=1e-6)


def test_normal_interval_with_clusters_known_value():
    # three clusters of two items with difference sums 2, 0, 2: mean 2/3, cluster-robust SE 1/3
    iv = paired_difference([1, 1, 0, 0, 1, 1], [0] * 6, clusters=[0, 0, 1, 1, 2, 2], method="normal")
    assert iv.estimate == pytest.approx(2 / 3) and iv.clusters == 3
    assert iv.hi - iv.estimate == pytest.approx(1.959964 / 3, abs=1e-6)


def test_bootstrap_degenerate_cases():
    same = paired_difference([1, 0, 1], [1, 0, 1])
    assert (same.estimate, same.lo, same.hi) == (0.0, 0.0, 0.0) and same.compare() == "same"
    shift = paired_difference([0.5, 1.5, 2.5], [0.0, 1.0, 2.0])  # every difference 0.5
    assert (shift.lo, shift.hi) == (0.5, 0.5) and shift.compare() == "above"
    one = paired_difference([1, 0, 1], [0, 0, 0], clusters=["ctx"] * 3)  # one cluster: no interval
    assert one.estimate == pytest.approx(2 / 3) and not one.known and one.compare() == "unknown"
    single = paired_difference([0], [1])  # one item: no interval either, even though it has no spread
    assert single.estimate == -1.0 and single.compare() == "unknown"
    empty = paired_difference([], [])
    assert empty.n == 0 and math.isnan(empty.estimate)
    with pytest.raises(ValueError, match="same length"):
        paired_difference([1, 2], [1])
    with pytest.raises(ValueError, match="clusters"):
        paired_difference([1, 2], [1, 0], clusters=[0])
    with pytest.raises(ValueError, match="method"):
        paired_difference([1, 2], [1, 0], method="exact")


def test_bootstrap_matches_normal_on_many_items_and_is_seeded():
    rng = random.Random(1)
    a = [float(rng.random() < 0.6) for _ in range(600)]
    b = [float(rng.random() < 0.5) for _ in range(600)]
    boot = paired_difference(a, b, seed=0)
    norm = paired_difference(a, b, method="normal")
    assert boot.estimate == norm.estimate
    assert boot.lo == pytest.approx(norm.lo, abs=0.01) and boot.hi == pytest.approx(norm.hi, abs=0.01)
    assert paired_difference(a, b, seed=0) == boot  # same seed, same interval
    assert paired_difference(a, b, seed=1) != boot
    assert boot.compare() == ("above" if boot.lo > 0 else "within")


def test_cluster_bootstrap_accounts_for_correlated_items():
    """Each item duplicated inside its cluster: the clustered interval is about sqrt(2) wider than the naive one."""
    rng = random.Random(2)
    d = [rng.gauss(0.0, 1.0) for _ in range(300)]
    a = [x for x in d for _ in range(2)]
    b = [0.0] * len(a)
    clusters = [i for i in range(len(d)) for _ in range(2)]
    naive = paired_difference(a, b)
    clustered = paired_difference(a, b, clusters=clusters)
    single = paired_difference(d, [0.0] * len(d))
    ratio = (clustered.hi - clustered.lo) / (naive.hi - naive.lo)
    assert 1.25 < ratio < 1.6
    assert clustered.hi - clustered.lo == pytest.approx(single.hi - single.lo, rel=0.15)


def test_perplexity_ratio():
    base = [0.5 + 0.01 * i for i in range(64)]
    shifted = [x + 0.1 for x in base]
    iv = perplexity_ratio(shifted, base, clusters=token_blocks([64], 16))
    assert iv.estimate == pytest.approx(math.exp(0.1)) and iv.lo == pytest.approx(math.exp(0.1))
    assert iv.compare(1.0) == "above"
    rng = random.Random(3)
    noisy = [x + 0.2 + rng.gauss(0, 0.3) for x in base * 8]
    iv = perplexity_ratio(noisy, base * 8, clusters=token_blocks([256, 256], 32))
    assert iv.lo < math.exp(0.2) < iv.hi and iv.lo > 1.0
    assert perplexity_ratio(base, base).compare(1.0) == "same"


def test_token_blocks_and_wins_losses():
    assert token_blocks([3, 2], 2) == [(0, 0), (0, 0), (0, 1), (1, 0), (1, 0)]
    with pytest.raises(ValueError, match="block"):
        token_blocks([3], 0)
    assert wins_losses([1, 0, 1, 1], [0, 0, 1, 0]) == (2, 0, 2)
    assert wins_losses([0.1, 0.5], [0.2, 0.2]) == (1, 1, 0)


def test_sign_test_known_values():
    assert sign_test(0, 10) == pytest.approx(2 / 1024)
    assert sign_test(0, 4) == pytest.approx(0.125)
    assert sign_test(3, 9) == pytest.approx(2 * (1 + 12 + 66 + 220) / 4096)  # 0.146
    assert sign_test(9, 3) == sign_test(3, 9) and sign_test(5, 5) == 1.0 and sign_test(0, 0) == 1.0
    with pytest.raises(ValueError, match="wins and losses"):
        sign_test(-1, 2)


def test_interval_compare():
    assert Interval(0.1, 0.05, 0.2).compare() == "above"
    assert Interval(-0.1, -0.2, -0.01).compare() == "below"
    assert Interval(0.0, -0.1, 0.1).compare() == "within"
    assert Interval(1.2, 1.1, 1.3).compare(1.0) == "above"
