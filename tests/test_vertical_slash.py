"""vertical_slash: the pattern against its written definition, selection, decomposition, GPU paths.

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


def definition_mask(plan, cols, offs):
    """The executed pattern from its definition: row blocks, pages crossed, columns, causal."""
    B, Hq, Nq, Nk = plan.B, plan.Hq, plan.Nq, plan.Nk
    bq, bk, q0, P = plan.block_q, plan.block_k, plan.q_offset, plan.P
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
@settings(max_examples=30)
@given(prob=vs_problems(), opts=vs_options())
def test_pattern_equals_its_definition_and_selection_is_top_k(prob, opts):
    q, k, v, off = prob
    be = VerticalSlash(**opts)
    scale = q.shape[-1] ** -0.5
    plan = be.plan(q, k, scale=scale, q_offset=off)
    W = plan.W
    vert, slash = scores64(q, k, scale, off, opts["last_q"])
    assert torch.allclose(plan.vertical_scores, vert, atol=1e-12, rtol=1e-10)
    assert torch.allclose(plan.slash_scores, slash, atol=1e-12, rtol=1e-10)
    cols, offs = [], []
    for b in range(q.shape[0]):
        cols.append([]), offs.append([])
        for h in range(q.shape[1]):
            # selection is checked on the plan's own scores, so ties are decided exactly
            ec = expected_keep(plan.vertical_scores[b, h], opts["sink"], opts["vertical_size"])
            eo = expected_keep(plan.slash_scores[b, h], opts["local"], opts["slash_size"])
            got_c = [int(x) for x in plan.cols[b, h] if x < W]
            got_o = [int(x) for x in plan.offsets[b, h] if x < W]
            assert got_c == ec, (b, h, got_c, ec)
            assert got_o == eo, (b, h, got_o, eo)
            cols[-1].append(set(ec)), offs[-1].append(set(eo))
    mask = plan.mask()
    assert torch.equal(mask, definition_mask(plan, cols, offs))
    assert torch.equal(be.pattern(q, k, scale=scale, q_offset=off), mask)


@settings(max_examples=20)
@given(prob=vs_problems(max_n=120), opts=vs_options())
def test_kernel_decomposition_is_disjoint_and_covers_the_pattern(prob, opts):
    """What the GPU executes: slash pages (causal) + columns outside them, no key twice."""
    q, k, v, off = prob
    plan = VerticalSlash(**opts).plan(q, k, scale=1.0, q_offset=off)
    B, Hq, Nq, Nk, bk = plan.B, plan.Hq, plan.Nq, plan.Nk, plan.block_k
    p_first, p_last, _ = plan.block_rows()
    cnt, pages = plan.slash_pages()
    vcnt, vcols = plan.vertical_columns()
    slash_m = torch.zeros(B * Hq, Nq, Nk, dtype=torch.bool)
    vert_m = torch.zeros(B * Hq, Nq, Nk, dtype=torch.bool)
    ps, vs = 0, 0
    j = torch.arange(Nk)
    for bh in range(B * Hq):
        for b in range(plan.n_blocks):
            r0, r1 = int(p_first[b]) - off, int(p_last[b]) - off
            pg = pages[ps : ps + int(cnt[bh, b])].tolist()
            ps += int(cnt[bh, b])
            assert pg == sorted(set(pg)) and pg[-1] == int(p_last[b]) // bk, "pages ascending, diagonal last"
            pr = off + torch.arange(r0, r1 + 1)
            inpg = torch.isin(j // bk, torch.tensor(pg, dtype=torch.long))
            slash_m[bh, r0 : r1 + 1] = inpg[None, :] & (j[None, :] <= pr[:, None])
            cl = vcols[vs : vs + int(vcnt[bh, b])].tolist()
            vs += int(vcnt[bh, b])
            assert cl == sorted(set(cl)) and all(c < int(p_first[b]) for c in cl), "columns precede the block"
            vert_m[bh, r0 : r1 + 1, cl] = True
    assert ps == pages.numel() and vs == vcols.numel()
    assert not (slash_m & vert_m).any(), "a key is counted twice"
    assert torch.equal((slash_m | vert_m).view(B, Hq, Nq, Nk), plan.mask())
    assert torch.equal(plan.pairs_per_head(), plan.mask().sum((-1, -2)))


def _emulate_paged_prefill(qf, kpages, vpages, qo_indptr, kv_indptr, kv_indices, last_len, causal, scale):
    """FlashInfer's documented paged-prefill semantics, request by request, in float64:
    the request's keys are its pages in order, the last one cut to ``last_len``; with
    ``causal`` row t of a request with qo_len rows sees key index <= kv_len - qo_len + t."""
    n = qf.shape[0]
    out = torch.zeros(n, qf.shape[-1], dtype=torch.float64)
    lse = torch.full((n,), float("-inf"), dtype=torch.float64)
    for r in range(len(qo_indptr) - 1):
        q0, q1 = int(qo_indptr[r]), int(qo_indptr[r + 1])
        pg = kv_indices[int(kv_indptr[r]) : int(kv_indptr[r + 1])].long()
        kk = kpages[pg].reshape(-1, qf.shape[-1])
        vv = vpages[pg].reshape(-1, qf.shape[-1])
        kv_len = (len(pg) - 1) * kpages.shape[1] + int(last_len[r])
        kk, vv = kk[:kv_len].double(), vv[:kv_len].double()
        s = qf[q0:q1].double() @ kk.T * scale
        if causal:
            t = torch.arange(q1 - q0)[:, None]
            s = s.masked_fill(torch.arange(kv_len)[None, :] > kv_len - (q1 - q0) + t, float("-inf"))
        lse[q0:q1] = torch.logsumexp(s, -1)
        out[q0:q1] = torch.softmax(s, -1) @ vv
    return out, lse


@settings(max_examples=12)
@given(prob=vs_problems(max_n=90), opts=vs_options())
def test_flashinfer_request_arrays_reproduce_the_pattern(prob, opts):
    """The arrays handed to FlashInfer, run through an emulation of its paged prefill, give the
    reference result: page tables, bottom-right causal in the diagonal page, dummy columns."""
    from sparsekit.contract import AttentionResult, merge
    from sparsekit.kernels.vs_flashinfer import build_indices

    q, k, v, off = prob
    be = VerticalSlash(**opts)
    scale = q.shape[-1] ** -0.5
    plan = be.plan(q, k, scale=scale, q_offset=off, impl="torch")
    ix = build_indices(plan)
    B, Hq, Nq, D = q.shape
    Hkv, Nk, bk = k.shape[1], k.shape[2], plan.block_k
    npg = ix["pages_per_head"]
    kp = torch.zeros(B, Hkv, npg * bk, D, dtype=k.dtype)
    vp = torch.zeros_like(kp)
    kp[:, :, :Nk], vp[:, :, :Nk] = k, v
    qf = q.reshape(-1, D)
    so, sl = _emulate_paged_prefill(qf, kp.reshape(-1, bk, D), vp.reshape(-1, bk, D), ix["qo_indptr"],
                                    ix["s_indptr"], ix["s_indices"], ix["s_last"], True, scale)
    got = AttentionResult(so.view(B, Hq, Nq, D), sl.view(B, Hq, Nq).float())
    if ix["v_indices"] is not None:
        n_req = ix["n_requests"]
        vo, vl = _emulate_paged_prefill(qf, k.reshape(-1, 1, D), v.reshape(-1, 1, D), ix["qo_indptr"],
                                        ix["v_indptr"], ix["v_indices"], torch.ones(n_req), False, scale)
        if ix["empty_rows"] is not None:
            vl = vl.masked_fill(ix["empty_rows"], float("-inf"))
        got = merge(got, AttentionResult(vo.view(B, Hq, Nq, D), vl.view(B, Hq, Nq).float()))
    eo, el = attention64(q, k, v, plan.mask(), scale)
    assert torch.allclose(got.out, eo, atol=1e-6), (got.out - eo).abs().max()
    assert torch.allclose(got.lse.double(), el, atol=1e-5)


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
    mask = be.pattern(q, k, scale=scale, q_offset=off)
    eo, el = attention64(q, k, v, mask, scale)
    assert torch.allclose(res.out, eo, atol=1e-10) and torch.allclose(res.lse.double(), el, atol=1e-5)
    assert be.cost(q.shape[2], k.shape[2], off) == pytest.approx(mask.sum((-1, -2)).double().mean().item())


def test_per_head_budgets_and_gqa_shares_nothing_but_kv():
    torch.manual_seed(0)
    q, k, v = torch.randn(1, 4, 64, 8), torch.randn(1, 2, 64, 8), torch.randn(1, 2, 64, 8)
    be = VerticalSlash(vertical_size=(1, 5, 9, 13), slash_size=(2, 2, 7, 7), sink=1, local=2, block_q=8, block_k=8)
    plan = be.plan(q, k, scale=0.3, q_offset=0)
    assert (plan.cols[0] < plan.W).sum(-1).tolist() == [1, 5, 9, 13]
    assert (plan.offsets[0] < plan.W).sum(-1).tolist() == [2, 2, 7, 7]
    with pytest.raises(ValueError, match="per-head budgets"):
        SparseAttention(be)(torch.randn(1, 2, 8, 8), torch.randn(1, 2, 8, 8), torch.randn(1, 2, 8, 8))
    spec = SparseAttention(be, corrector="delta")
    assert str(be).startswith("vertical_slash(vertical_size='1/5/9/13',slash_size='2/2/7/7',")
    assert SparseAttention.from_string(str(spec)) == spec


def test_chunked_prefill_estimates_from_the_chunk_and_sees_the_prefix():
    torch.manual_seed(1)
    q, k = torch.randn(1, 2, 30, 8, dtype=torch.float64), torch.randn(1, 2, 100, 8, dtype=torch.float64)
    plan = VerticalSlash(vertical_size=4, slash_size=3, sink=0, local=1, last_q=5, block_q=4, block_k=4).plan(
        q, k, scale=1.0, q_offset=70
    )
    assert plan.W == 100 and plan.b_first == 17 and plan.n_blocks == 8
    v, s = scores64(q, k, 1.0, 70, 5)
    assert torch.allclose(plan.vertical_scores, v) and torch.allclose(plan.slash_scores, s)
    m = plan.mask()
    assert m[..., torch.arange(30), 70 + torch.arange(30)].all()


@pytest.mark.parametrize(
    "kw, err",
    [
        (dict(block_q=6, block_k=4), "multiple of block_k"),
        (dict(local=0), "local must be >= 1"),
        (dict(last_q=0), "last_q must be >= 1"),
        (dict(vertical_size=-1), "vertical_size must be >= 0"),
        (dict(slash_size=(3, "a")), "slash_size must be an int"),
        (dict(impl="cuda"), "impl must be one of"),
    ],
)
def test_option_errors_name_the_option(kw, err):
    with pytest.raises((ValueError, TypeError), match=err):
        VerticalSlash(**kw)


def test_forced_gpu_impl_on_cpu_is_refused():
    q = torch.randn(1, 1, 8, 4)
    with pytest.raises(ValueError, match="needs CUDA"):
        VerticalSlash(impl="flashinfer").prefill(q, q, q, scale=1.0, q_offset=0)


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


def _gpu_case(case, impl, seed=0):
    B, Hq, Hkv, Nq, Nk, off, bq, bk = case
    g = torch.Generator(device="cuda").manual_seed(seed)
    q = torch.randn(B, Hq, Nq, 128, device="cuda", generator=g).bfloat16()
    k = torch.randn(B, Hkv, Nk, 128, device="cuda", generator=g).bfloat16()
    v = torch.randn(B, Hkv, Nk, 128, device="cuda", generator=g).bfloat16()
    be = VerticalSlash(vertical_size=40, slash_size=50, sink=5, local=20, last_q=64, block_q=bq, block_k=bk, impl=impl)
    scale = 128 ** -0.5
    plan = be.plan(q, k, scale=scale, q_offset=off)
    res = be.run(plan, q, k, v, scale=scale, q_offset=off)
    ref = be._reference(plan, q.float(), k.float(), v.float())  # same plan, float32 exact
    return res, ref, plan


@pytest.mark.gpu
@pytest.mark.parametrize(
    "case, impl",
    [(c, "flashinfer") for c in GPU_CASES] + [(c, "flex") for c in GPU_CASES[1:3]],  # flex compiles per shape
    ids=[f"flashinfer-{c}" for c in GPU_CASES] + [f"flex-{c}" for c in GPU_CASES[1:3]],
)
def test_gpu_equals_cpu_reference_pattern(case, impl):
    if impl == "flashinfer":
        pytest.importorskip("flashinfer")
    res, ref, plan = _gpu_case(case, impl)
    err = (res.out.float() - ref.out).abs().max().item()
    lerr = (res.lse - ref.lse).abs().max().item()
    assert err < 2e-2 and lerr < 2e-2, (err, lerr)
    assert plan.pairs_per_head().sum() < plan.B * plan.Hq * (plan.Nq * plan.Nk), "not sparse"
