"""``block_threshold`` and ``oracle``: selections against independent float64 references, the
scorers' and rules' contracts, the Triton scorer under the interpreter and on a GPU, option errors."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
from dataclasses import dataclass
from typing import ClassVar

import pytest
import torch
from hypothesis import given, settings, strategies as st

from sparsekit import SparseAttention
from sparsekit.backends.block_threshold import RULES, SCORERS, BlockThreshold, KeepRule, select
from sparsekit.backends.oracle import Oracle

from block_threshold_ref import kept, oracle_global64, oracle_select64, select64, shares64
from strategies import BACKEND_OPTIONS

HERE = os.path.dirname(os.path.abspath(__file__))


@st.composite
def small(draw, max_n=200):
    B = draw(st.integers(1, 2))
    Hkv = draw(st.integers(1, 2))
    G = draw(st.sampled_from([1, 2]))
    nq = draw(st.integers(1, max_n))
    off = draw(st.sampled_from([0, 0, 7, 40]))
    D = draw(st.sampled_from([4, 8]))
    seed = draw(st.integers(0, 2**31 - 1))
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(B, Hkv * G, nq, D, generator=g, dtype=torch.float64) * draw(st.sampled_from([1.0, 3.0]))
    k = torch.randn(B, Hkv, nq + off, D, generator=g, dtype=torch.float64)
    return q, k, off


@settings(max_examples=60, deadline=None)
@given(data=st.data())
def test_selection_matches_float64_reference(data):
    """Every scorer x rule x budget x geometry: the lists hold every block the rule must keep and
    none it may not (blocks within 1e-6 of a decision boundary may go either way)."""
    q, k, off = data.draw(small(), label="problem")
    opts = data.draw(BACKEND_OPTIONS["block_threshold"], label="options")
    opts["min_len"] = 0
    bt = BlockThreshold(**opts)
    scale = 0.7
    pat = bt.pattern(q, k, scale=scale, q_offset=off)
    got = kept(pat)
    must, may = select64(bt, q, k, off, scale)
    assert must <= got, f"missing {sorted(must - got)[:5]}"
    assert got <= may, f"extra {sorted(got - may)[:5]}"


@settings(max_examples=40, deadline=None)
@given(data=st.data())
def test_scorer_shares_match_reference_and_sum_to_one(data):
    q, k, off = data.draw(small(max_n=120), label="problem")
    opts = data.draw(BACKEND_OPTIONS["block_threshold"], label="options")
    bt = BlockThreshold(**dict(opts, min_len=0))
    geo = bt.geometry(q, k, off, 0.7)
    state = bt._scorer.prepare(geo, q, k, use_triton=False)
    P = bt._scorer.scores(state, 0, geo.n_qblocks)
    ref = shares64(bt, q, k, off, 0.7)
    vis = geo.visible(0, geo.n_qblocks)
    assert P.dtype == torch.float32 and P.shape == (q.shape[0], geo.groups, geo.n_qblocks, geo.n_kblocks)
    assert bool((P[..., ~vis] == 0).all()), "shares on invisible blocks"
    assert torch.allclose(P.sum(-1).double(), torch.ones(P.shape[:-1], dtype=torch.float64), atol=1e-5)
    for b in range(P.shape[0]):
        for g in range(P.shape[1]):
            for i in range(P.shape[2]):
                for j, x in ref[b][g][i].items():
                    assert abs(float(P[b, g, i, j]) - x) < 1e-5, (b, g, i, j, float(P[b, g, i, j]), x)


@settings(max_examples=40, deadline=None)
@given(data=st.data())
def test_oracle_matches_float64_reference(data):
    q, k, off = data.draw(small(max_n=150), label="problem")
    orc = Oracle(**dict(data.draw(BACKEND_OPTIONS["oracle"], label="options"), allocate="block"))
    pat = orc.pattern(q, k, scale=0.7, q_offset=off)
    got = kept(pat)
    must, may = oracle_select64(orc, q, k, off, 0.7)
    assert must <= got and got <= may


@settings(max_examples=25, deadline=None)
@given(data=st.data())
def test_oracle_global_allocation_matches_float64_greedy(data):
    """allocate="global": the greedy mass-per-pair selection within the density budget (independent loops)."""
    q, k, off = data.draw(small(max_n=90), label="problem")
    opts = data.draw(BACKEND_OPTIONS["oracle"], label="options")
    opts.update(k=None, density=data.draw(st.sampled_from([0.1, 0.3, 0.6]), label="density"), allocate="global")
    orc = Oracle(**opts)
    pat = orc.pattern(q, k, scale=0.7, q_offset=off)
    got = kept(pat)
    must, may = oracle_global64(orc, q, k, off, 0.7)
    assert must <= got, f"missing {sorted(must - got)[:5]}"
    assert got <= may, f"extra {sorted(got - may)[:5]}"


def test_oracle_at_full_density_is_dense_and_beats_equal_density_backends():
    torch.manual_seed(0)
    q, k, v = (torch.randn(1, 2, 300, 16) for _ in range(3))
    dense = SparseAttention("dense")(q, k, v)
    full = SparseAttention("oracle", density=1.0, block_q=16, block_k=16)(q, k, v)
    assert torch.allclose(full, dense, atol=1e-6)
    # per query block, the oracle's blocks hold at least the attention mass of any selection of as many
    # blocks that keeps the diagonal: here block_threshold's (sink + window + top-4)
    bt = BlockThreshold(min_len=0, block_q=16, block_k=16, sink=16, window=16, rule="topk(k=4)", dense_last=0)
    p_bt = bt.pattern(q, k, scale=0.25, q_offset=0)
    per = (p_bt.block_indptr[1:] - p_bt.block_indptr[:-1])
    n = int(per.mode().values)
    orc = Oracle(k=16 * (n - 1), density=None, block_q=16, block_k=16)  # + the one diagonal block
    p_or = orc.pattern(q, k, scale=0.25, q_offset=0)
    M = orc.mass(q, k, scale=0.25, q_offset=0)
    got_bt, got_or = kept(p_bt), kept(p_or)
    checked = 0
    for i in range(M.shape[2]):
        for g in range(M.shape[1]):
            sel_bt = [j for (_, gg, ii, j) in got_bt if gg == g and ii == i]
            sel_or = [j for (_, gg, ii, j) in got_or if gg == g and ii == i]
            if len(sel_bt) == n:
                assert len(sel_or) == n
                assert float(M[0, g, i, sel_or].sum()) >= float(M[0, g, i, sel_bt].sum()) - 1e-5
                checked += 1
    assert checked >= 10, checked


def test_short_prompts_run_dense_and_forced_blocks_are_kept():
    torch.manual_seed(1)
    q, k, v = (torch.randn(1, 2, 500, 16) for _ in range(3))
    bt = BlockThreshold(min_len=501)
    assert bt.pattern(q, k, scale=0.25, q_offset=0).is_dense
    bt = BlockThreshold(min_len=0, block_q=32, block_k=32, sink=40, window=70, rule="relative(alpha=1.0)", dense_last=1)
    pat = bt.pattern(q, k, scale=0.25, q_offset=0)
    m = pat.expand(pat.mask())[0, 0]
    pos = torch.arange(500)
    assert m[:, :40].logical_or(pos[:, None] < torch.arange(40)[None, :]).all(), "sink"
    for r in range(500):
        lo = max(0, r - 69)
        assert m[r, lo:r + 1].all(), f"window of row {r}"
    last0 = (500 // 32) * 32
    assert m[last0:].sum() == sum(r + 1 for r in range(last0, 500)), "last query block dense"
    assert pat.density() < 0.9  # and not dense


def test_budget_caps_rule_blocks():
    torch.manual_seed(2)
    q, k = torch.randn(1, 1, 600, 8), torch.randn(1, 1, 600, 8)
    base = dict(min_len=0, block_q=16, block_k=16, sink=0, window=1, dense_last=0, rule="relative(alpha=0.01)")
    free = BlockThreshold(**base).pattern(q, k, scale=1.0, q_offset=0)
    capped = BlockThreshold(**base, budget=48).pattern(q, k, scale=1.0, q_offset=0)
    per = (capped.block_indptr[1:] - capped.block_indptr[:-1])
    # at most 3 rule blocks + the window's block(s) (window=1: the diagonal block)
    assert int(per.max()) <= 3 + 1
    assert int((free.block_indptr[1:] - free.block_indptr[:-1]).max()) > 4
    assert kept(capped) <= kept(free)


def test_options_errors_name_the_option():
    with pytest.raises(ValueError, match="alpha"):
        BlockThreshold(rule="relative(alpha=0)")
    with pytest.raises(ValueError, match="tau"):
        BlockThreshold(rule="mass(tau=1.5)")
    with pytest.raises(ValueError, match="unknown keep rule 'nope'"):
        BlockThreshold(rule="nope")
    with pytest.raises(ValueError, match="unknown block scorer"):
        BlockThreshold(scorer="pooledd")
    with pytest.raises(TypeError, match="unknown option.*'beta'.*relative"):
        BlockThreshold(rule="relative(beta=1)")
    with pytest.raises(ValueError, match="stride.*divide"):
        BlockThreshold(scorer="antidiagonal(stride=48)")
    with pytest.raises(ValueError, match="block_q"):
        BlockThreshold(block_q=0)
    with pytest.raises(TypeError, match="share_kv"):
        BlockThreshold(share_kv="yes")
    with pytest.raises(ValueError, match="exactly one of k"):
        Oracle(k=128, density=0.5)
    with pytest.raises(ValueError, match="density"):
        Oracle(density=1.5)
    b = BlockThreshold(scorer="antidiagonal(stride=16)", rule={"name": "mass", "tau": 0.8})
    assert b.rule == "mass(tau=0.8)"
    assert SparseAttention.from_string(str(b)).backend == b  # spec string round trip
    nested = SparseAttention.from_string("block_threshold(scorer=antidiagonal(stride=16),rule=mass(tau=0.8))")
    assert nested.backend == b


def test_third_party_rule_registers_in_process():
    @dataclass
    class EveryOther(KeepRule):
        name: ClassVar[str] = "every_other"

        def keep(self, P, visible):
            j = torch.arange(P.shape[-1], device=P.device)
            return (j % 2 == 0).expand_as(P) & visible

    RULES.register("every_other", EveryOther)
    try:
        bt = BlockThreshold(min_len=0, block_q=16, block_k=16, sink=0, window=1, dense_last=0, rule="every_other")
        q, k = torch.randn(1, 1, 256, 8), torch.randn(1, 1, 256, 8)
        got = kept(bt.pattern(q, k, scale=1.0, q_offset=0))
        for (_, _, i, j) in got:
            assert j % 2 == 0 or j == i, (i, j)  # rule blocks or the window's diagonal block
    finally:
        RULES.unregister("every_other")
    assert "pooled" in SCORERS.names() and {"relative", "mass", "topk"} <= set(RULES.names())


# ------------------------------------------------------------------ Triton under the interpreter
_INTERP = textwrap.dedent(
    """
    import os, sys
    os.environ["TRITON_INTERPRET"] = "1"
    sys.path.insert(0, sys.argv[1])
    import torch
    from sparsekit.backends.block_threshold import BlockThreshold, select
    from block_threshold_ref import kept
    torch.manual_seed(0)
    bad = []
    cases = [  # (B, Hq, Hkv, nq, off, D, share_kv, bq, bk, dtype, scorer)
        (1, 4, 2, 300, 0, 16, True, 32, 16, torch.float32, "pooled"),
        (2, 2, 2, 197, 13, 24, False, 16, 32, torch.float32, "vslash"),
        (1, 8, 1, 128, 5, 32, True, 16, 16, torch.float16, "pooled"),
    ]
    for B, Hq, Hkv, nq, off, D, share, bq, bk, dt, sc in cases:
        q = torch.randn(B, Hq, nq, D).to(dt)
        k = torch.randn(B, Hkv, nq + off, D).to(dt)
        bt = BlockThreshold(scorer=sc, min_len=0, block_q=bq, block_k=bk, sink=8, window=16, share_kv=share,
                            rule="relative(alpha=0.5)")
        geo = bt.geometry(q, k, off, 0.3)
        st_t = bt._scorer.prepare(geo, q, k, use_triton=True)
        st_r = bt._scorer.prepare(geo, q, k, use_triton=False)
        Pt = bt._scorer.scores(st_t, 1, geo.n_qblocks)
        Pr = bt._scorer.scores(st_r, 1, geo.n_qblocks)
        err = (Pt - Pr).abs().max().item()
        if not err <= 1e-6:
            bad.append(f"{sc} {dt} shares differ by {err:.2e}")
        a = select(bt, q, k, off, scale=0.3, scorer_impl="triton")
        b = select(bt, q, k, off, scale=0.3, scorer_impl="torch")
        if not (torch.equal(a[0], b[0]) and torch.equal(a[1], b[1])):
            bad.append(f"{sc} {dt} selections differ")
    print("BAD" if bad else "OK", bad)
    sys.exit(1 if bad else 0)
    """
)


def test_triton_scorer_under_interpreter():
    pytest.importorskip("triton")
    env = dict(os.environ, TRITON_INTERPRET="1")
    r = subprocess.run([sys.executable, "-c", _INTERP, HERE], env=env, capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-4000:]


# ------------------------------------------------------------------ GPU
@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("shape", [(1, 32, 8, 8192, 0, 128), (2, 8, 2, 3001, 77, 64), (1, 4, 4, 1000, 0, 128)])
def test_triton_scorer_on_gpu(shape):
    B, Hq, Hkv, nq, off, D = shape
    torch.manual_seed(0)
    q = torch.randn(B, Hq, nq, D, device="cuda", dtype=torch.bfloat16)
    k = torch.randn(B, Hkv, nq + off, D, device="cuda", dtype=torch.bfloat16)
    for sc in ("pooled", "vslash"):
        bt = BlockThreshold(scorer=sc, min_len=0)
        geo = bt.geometry(q, k, off, D ** -0.5)
        Pt = bt._scorer.scores(bt._scorer.prepare(geo, q, k, use_triton=True), 0, geo.n_qblocks)
        Pr = bt._scorer.scores(bt._scorer.prepare(geo, q, k, use_triton=False), 0, geo.n_qblocks)
        assert (Pt - Pr).abs().max().item() < 1e-5
        a = SparseAttention(bt)(q, k, k)
        ref = SparseAttention(bt)(q, k, k, impl="reference")
        assert (a.float() - ref.float()).abs().max().item() < 2e-2
