"""vertical_slash: the pattern against its written definition, selection, execution paths.

The backend x corrector matrix (tests/test_properties.py) runs vertical_slash against a float64
reference of ``backend.pattern``; here the pattern itself is checked against an independent,
loop-by-loop transcription of docs/vertical_slash.md.
"""

from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings, strategies as st

from sparsekit import SparseAttention
from sparsekit.backends.vertical_slash import VerticalSlash, estimate_scores, select_top
from sparsekit.executor import Refused

from fa3_sim import run_paged
from ref64 import attention64, causal_mask


# ------------------------------------------------------------------------------ helpers
@st.composite
def vs_problems(draw, max_n=160):
    B = draw(st.integers(1, 2))
    Hkv = draw(st.integers(1, 2))
    G = draw(st.sampled_from([1, 2]))
    Nq = draw(st.integers(1, max_n))
    off = draw(st.one_of(st.just(0), st.integers(1, 70)))
    extra = draw(st.sampled_from([0, 0, 3]))
    D = draw(st.sampled_from([4, 8, 16]))
    temp = draw(st.sampled_from([0.5, 2.0, 8.0]))
    seed = draw(st.integers(0, 2**31 - 1))
    g = torch.Generator().manual_seed(seed)
    Nk = Nq + off + extra
    q = (torch.randn(B, Hkv * G, Nq, D, generator=g, dtype=torch.float64) * temp)
    k = torch.randn(B, Hkv, Nk, D, generator=g, dtype=torch.float64)
    v = torch.randn(B, Hkv, Nk, D, generator=g, dtype=torch.float64)
    return q, k, v, off


@st.composite
def vs_options(draw):
    bk = draw(st.sampled_from([1, 2, 4, 8, 16]))
    return dict(
        vertical_size=draw(st.integers(0, 24)),
        slash_size=draw(st.integers(0, 24)),
        last_q=draw(st.integers(1, 40)),
        sink=draw(st.integers(0, 6)),
        local=draw(st.integers(1, 12)),
        block_k=bk,
        block_q=bk * draw(st.sampled_from([1, 1, 2, 3])),
    )


def scores64(q, k, scale, q_offset, last_q):
    """Vertical/slash scores written out row by row (float64, K repeated to the query heads)."""
    B, Hq, Nq, D = q.shape
    G = Hq // k.shape[1]
    kr = k.double().repeat_interleave(G, 1)
    P = q_offset + Nq - 1
    L = min(last_q, Nq)
    vert = torch.zeros(B, Hq, P + 1, dtype=torch.float64)
    slash = torch.zeros(B, Hq, P + 1, dtype=torch.float64)
    for r in range(Nq - L, Nq):
        p = q_offset + r
        s = torch.einsum("bhd,bhkd->bhk", q[:, :, r].double(), kr[:, :, : p + 1]) * scale
        a = torch.softmax(s, -1)
        vert[..., : p + 1] += a
        slash[..., : p + 1] += a.flip(-1)  # key j = p - o lies on diagonal o
    return vert, slash


def expected_keep(nscore, forced, budget):
    """Indices kept from one head's scores: forced first, then best, ties to the lower index."""
    W = len(nscore)
    n = min(W, max(budget, forced))
    order = sorted(range(W), key=lambda j: (0 if j < forced else 1, -float(nscore[j]), j))
    return sorted(order[:n])


def definition_mask(q, k, q_offset, block_q, block_k, cols, offs):
    """The executed pattern from its definition: row blocks, pages crossed, columns, causal."""
    B, Hq, Nq, Nk = q.shape[0], q.shape[1], q.shape[2], k.shape[2]
    bq, bk, q0, P = block_q, block_k, q_offset, q_offset + q.shape[2] - 1
    keep = torch.zeros(B, Hq, Nq, Nk, dtype=torch.bool)
    j = torch.arange(Nk)
    for b in range(B):
        for h in range(Hq):
            colm = torch.zeros(Nk, dtype=torch.bool)
            colm[sorted(cols[b][h])] = True
            for blk in range(q0 // bq, P // bq + 1):
                rows = [p for p in range(blk * bq, blk * bq + bq) if q0 <= p <= P]
                pages = sorted({(p - d) // bk for p in rows for d in offs[b][h] if p - d >= 0})
                pm = torch.zeros(Nk, dtype=torch.bool)
                pm[torch.isin(j // bk, torch.tensor(pages, dtype=torch.long))] = True
                pr = torch.tensor(rows)
                keep[b, h, pr - q0] = (j[None, :] <= pr[:, None]) & (colm | pm)[None, :]
    return keep


# ------------------------------------------------------------------------------ the pattern
@settings(max_examples=40)
@given(prob=vs_problems(), opts=vs_options())
def test_pattern_equals_its_definition_and_selection_is_top_k(prob, opts):
    q, k, v, off = prob
    be = VerticalSlash(**opts)
    scale = q.shape[-1] ** -0.5
    cols, offsets, (vs, ss) = be.select(q, k, scale=scale, q_offset=off)
    W = off + q.shape[2]
    vert, slash = scores64(q, k, scale, off, opts["last_q"])
    assert torch.allclose(vs, vert, atol=1e-12, rtol=1e-10)
    assert torch.allclose(ss, slash, atol=1e-12, rtol=1e-10)
    c_list, o_list = [], []
    for b in range(q.shape[0]):
        c_list.append([])
        o_list.append([])
        for h in range(q.shape[1]):
            # selection is checked on the backend's own scores, so ties are decided exactly
            ec = expected_keep(vs[b, h], opts["sink"], opts["vertical_size"])
            eo = expected_keep(ss[b, h], opts["local"], opts["slash_size"])
            got_c = [int(x) for x in cols[b, h] if x < W]
            got_o = [int(x) for x in offsets[b, h] if x < W]
            assert got_c == ec and got_o == eo
            c_list[-1].append(got_c)
            o_list[-1].append(got_o)
    pat = be.pattern(q, k, scale=scale, q_offset=off)
    assert pat.group_heads == q.shape[1] and pat.block_shift == off % opts["block_q"]
    mask = definition_mask(q, k, off, opts["block_q"], opts["block_k"], c_list, o_list)
    assert torch.equal(pat.mask(), mask)
    assert torch.equal(be.mask(q, k, scale=scale, q_offset=off), mask)
    assert torch.equal(pat.pairs_per_head(), mask.sum((-1, -2)))


@settings(max_examples=30)
@given(prob=vs_problems(), opts=vs_options())
def test_fa3_paged_requests_reproduce_the_pattern(prob, opts):
    """The fa3_paged request arrays, run through a float64 model of FlashInfer's paged prefill
    (tests/fa3_sim.py: bottom-right causal per request, pages trimmed by last_page_len, columns as
    one-key pages merged through the lse), give attention over exactly the pattern."""
    q, k, v, off = prob
    be = VerticalSlash(**opts)
    scale = q.shape[-1] ** -0.5
    pat = be.pattern(q, k, scale=scale, q_offset=off)
    out, lse = run_paged(pat, q, k, v, scale)  # vertical-slash lists the diagonal pages (offset 0): never refused
    eo, el = attention64(q, k, v, pat.mask(), scale)
    assert torch.allclose(out, eo, atol=1e-10)
    fin = torch.isfinite(el)
    assert torch.equal(torch.isfinite(lse), fin) and torch.allclose(lse[fin], el[fin], atol=1e-6)


def test_exact_ties_keep_lower_indices():
    """Equal scores keep the lower index; forced candidates come first whatever their score."""
    score = torch.tensor([[[0.5, 0.1, 0.5, 0.9, 0.5, 0.9, 0.0, 0.5]]], dtype=torch.float64)
    idx, n = select_top(score, forced=1, budgets=[4])
    assert idx[0, 0].tolist() == [0, 2, 3, 5]  # forced 0, then 0.9 (3, 5), then the first 0.5 left (2)
    idx, n = select_top(score, forced=0, budgets=[5])
    assert idx[0, 0].tolist() == [0, 2, 3, 4, 5]
    idx, n = select_top(score, forced=3, budgets=[2])  # the forced ones exceed the budget
    assert idx[0, 0].tolist() == [0, 1, 2] and n.tolist() == [3]
    idx, n = select_top(score, forced=0, budgets=[50])  # capped at the candidates
    assert idx[0, 0].tolist() == list(range(8))
    idx, n = select_top(score.expand(1, 2, 8), forced=0, budgets=[1, 3])  # per head, padded with W
    assert idx[0].tolist() == [[3, 8, 8], [0, 3, 5]]


@settings(max_examples=20)
@given(prob=vs_problems(), opts=vs_options(), which=st.sampled_from(["vertical", "slash"]))
def test_budgets_covering_everything_is_dense(prob, opts, which):
    q, k, v, off = prob
    opts["vertical_size" if which == "vertical" else "slash_size"] = k.shape[2]
    attn = SparseAttention("vertical_slash", **opts)
    out, lse = attn(q, k, v, q_offset=off, return_lse=True)
    dn, dl = attention64(q, k, v, causal_mask(q.shape[2], k.shape[2], off), q.shape[-1] ** -0.5)
    assert torch.allclose(out, dn, atol=1e-10) and torch.allclose(lse.double(), dl, atol=1e-5)


@settings(max_examples=20)
@given(prob=vs_problems(), opts=vs_options())
def test_prefill_is_attention_over_the_pattern_and_cost_counts_it(prob, opts):
    q, k, v, off = prob
    be = VerticalSlash(**opts)
    scale = q.shape[-1] ** -0.5
    res = be.prefill(q, k, v, scale=scale, q_offset=off)
    mask = be.mask(q, k, scale=scale, q_offset=off)
    eo, el = attention64(q, k, v, mask, scale)
    assert torch.allclose(res.out, eo, atol=1e-10) and torch.allclose(res.lse.double(), el, atol=1e-5)
    plan = SparseAttention(be).plan(q, k, scale=scale, q_offset=off)
    assert float(plan.cost().backend_pairs) == pytest.approx(mask.sum((-1, -2)).double().mean().item(), rel=1e-12)
    with pytest.raises(ValueError, match="depends on the data"):
        be.cost(q.shape[2], k.shape[2], off)


def test_per_head_budgets_and_gqa_shares_nothing_but_kv():
    torch.manual_seed(0)
    q, k, v = torch.randn(1, 4, 64, 8), torch.randn(1, 2, 64, 8), torch.randn(1, 2, 64, 8)
    be = VerticalSlash(vertical_size=(1, 5, 9, 13), slash_size=(2, 2, 7, 7), sink=1, local=2, block_q=8, block_k=8)
    cols, offs, _ = be.select(q, k, scale=0.3, q_offset=0)
    assert (cols[0] < 64).sum(-1).tolist() == [1, 5, 9, 13]
    assert (offs[0] < 64).sum(-1).tolist() == [2, 2, 7, 7]
    with pytest.raises(ValueError, match="per-head budgets"):
        SparseAttention(be)(torch.randn(1, 2, 8, 8), torch.randn(1, 2, 8, 8), torch.randn(1, 2, 8, 8))
    spec = SparseAttention(be, corrector="delta")
    assert str(be).startswith("vertical_slash(vertical_size='1/5/9/13',slash_size='2/2/7/7',")
    assert SparseAttention.from_string(str(spec)) == spec


def test_chunked_prefill_estimates_from_the_chunk_and_sees_the_prefix():
    torch.manual_seed(1)
    q, k = torch.randn(1, 2, 30, 8, dtype=torch.float64), torch.randn(1, 2, 100, 8, dtype=torch.float64)
    be = VerticalSlash(vertical_size=4, slash_size=3, sink=0, local=1, last_q=5, block_q=4, block_k=4)
    _, _, (vs, ss) = be.select(q, k, scale=1.0, q_offset=70)
    pat = be.pattern(q, k, scale=1.0, q_offset=70)
    assert vs.shape[-1] == 100 and pat.block_shift == 70 % 4 and pat.n_qblocks == 8
    v, s = scores64(q, k, 1.0, 70, 5)
    assert torch.allclose(vs, v) and torch.allclose(ss, s)
    m = pat.mask()
    assert m[..., torch.arange(30), 70 + torch.arange(30)].all()


@pytest.mark.parametrize(
    "kw, err",
    [
        (dict(block_q=6, block_k=4), "multiple of block_k"),
        (dict(local=0), "local must be >= 1"),
        (dict(last_q=0), "last_q must be >= 1"),
        (dict(vertical_size=-1), "vertical_size must be >= 0"),
        (dict(slash_size=(3, "a")), "slash_size must be an int"),
        (dict(impl="cuda"), "unexpected keyword"),
    ],
)
def test_option_errors_name_the_option(kw, err):
    with pytest.raises((ValueError, TypeError), match=err):
        VerticalSlash(**kw)


def test_forced_gpu_impl_on_cpu_is_refused():
    q = torch.randn(1, 1, 8, 4)
    with pytest.raises(RuntimeError, match="fa3_paged: needs CUDA"):
        SparseAttention("vertical_slash")(q, q, q, impl="fa3_paged")


def test_estimation_uses_only_the_last_rows():
    torch.manual_seed(2)
    q, k = torch.randn(1, 1, 50, 8, dtype=torch.float64), torch.randn(1, 1, 50, 8, dtype=torch.float64)
    v1, s1 = estimate_scores(q, k, scale=1.0, q_offset=0, last_q=10)
    q2 = q.clone()
    q2[:, :, :40] = torch.randn(1, 1, 40, 8, dtype=torch.float64)
    v2, s2 = estimate_scores(q2, k, scale=1.0, q_offset=0, last_q=10)
    assert torch.equal(v1, v2) and torch.equal(s1, s2)
    assert torch.allclose(v1.sum(-1), torch.tensor(10.0, dtype=torch.float64))
    assert torch.allclose(s1.sum(-1), torch.tensor(10.0, dtype=torch.float64))


# ------------------------------------------------------------------------------ GPU
GPU_CASES = [  # (B, Hq, Hkv, Nq, Nk, q_offset, block_q, block_k)
    (1, 4, 4, 1000, 1000, 0, 64, 64),
    (2, 8, 2, 777, 777, 0, 64, 64),
    (2, 4, 1, 513, 1300, 700, 64, 64),
    (1, 8, 4, 999, 1555, 501, 128, 64),
    (3, 2, 2, 130, 133, 3, 64, 64),
]


@pytest.mark.gpu
@pytest.mark.parametrize("impl", ["fa3_paged", "triton_blocks"])
@pytest.mark.parametrize("case", GPU_CASES)
def test_gpu_equals_cpu_reference_pattern(case, impl):
    """Each CUDA implementation on the same vertical-slash pattern as the float32 reference."""
    from sparsekit.executor import execute

    if impl == "fa3_paged":
        pytest.importorskip("flashinfer")
    B, Hq, Hkv, Nq, Nk, off, bq, bk = case
    if impl == "fa3_paged":
        bq = 128  # fa3_paged refuses 64-row query blocks (the Triton kernel is faster there)
    g = torch.Generator(device="cuda").manual_seed(0)
    D = 128  # the head_dim FlashInfer's prebuilt fa3 modules cover
    q = (torch.randn(B, Hq, Nq, D, device="cuda", generator=g) * 2).to(torch.bfloat16)
    k = torch.randn(B, Hkv, Nk, D, device="cuda", generator=g).to(torch.bfloat16)
    v = torch.randn(B, Hkv, Nk, D, device="cuda", generator=g).to(torch.bfloat16)
    scale = D ** -0.5
    be = VerticalSlash(vertical_size=40, slash_size=50, sink=5, local=20, last_q=64, block_q=bq, block_k=bk)
    pat = be.pattern(q, k, scale=scale, q_offset=off)
    try:
        res = execute(pat, q, k, v, scale=scale, impl=impl)
    except RuntimeError as exc:
        pytest.skip(str(exc)[-200:])
    ref = execute(pat, q.float(), k.float(), v.float(), scale=scale, impl="reference")
    rel = ((res.out.float() - ref.out).abs().max() / ref.out.abs().max()).item()
    assert rel < 2e-2, rel
    assert (res.lse - ref.lse).abs().max().item() < 2e-2
    assert pat.pairs_per_head().sum() < B * Hq * Nq * Nk, "not sparse"
