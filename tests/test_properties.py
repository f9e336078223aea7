"""Every registered backend x every corrector against an independent float64 reference, and every
backend's pattern: its keep-mask, exact cost and executable lists agree with each other."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given, strategies as st

import sparsekit
from sparsekit import SparseAttention, merge, merge_many
from sparsekit.reference import masked_attention

from pattern_ref import lowered_mask, rule_mask
from ref64 import (attention64, causal_mask, corrected64, corrected_blocks64, mean_block64, meancorr64, paper_rows,
                   tailonly_rows)
from strategies import BACKEND_OPTIONS, PER_HEAD_OPTIONS

CORRECTORS = {
    "none": None,
    "delta": ("delta", "repeat"),
    "delta-linear": ("delta", "linear"),
    "delta-ema": ("delta", "ema"),
    "delta-abg": ("delta", "abg"),
    "recompute": ("recompute", None),
    "meancorr": ("meancorr", None),
}


def _cpu_backends():
    """Registered backends that run on CPU tensors; a GPU-only, missing-package or broken plug-in is
    skipped with its reason (it must never stop the project's own tests from collecting)."""
    params = []
    probe = torch.zeros(1, 1, 4, 8)
    for name in sparsekit.available_backends():
        try:
            cls = sparsekit.registry.BACKENDS.get(name)
            reason = cls().unsupported(probe, probe, probe)
        except Exception as exc:  # a broken third-party plug-in
            reason = f"failed to load or build: {type(exc).__name__}: {exc}"
        marks = [pytest.mark.skip(reason=f"{name}: {reason}")] if reason else []
        params.append(pytest.param(name, marks=marks, id=name))
    return params


BACKENDS = _cpu_backends()


@st.composite
def problems(draw, max_n=600):
    B = draw(st.integers(1, 3))
    Hkv = draw(st.integers(1, 2))
    G = draw(st.sampled_from([1, 2, 4]))
    Nq = draw(st.one_of(st.integers(1, 140), st.integers(1, max_n)))
    off = draw(st.one_of(st.just(0), st.integers(1, 100)))
    extra = draw(st.sampled_from([0, 0, 0, 5]))  # keys past the last query are never seen
    D = draw(st.sampled_from([8, 16, 32, 64, 128]))
    dtype = draw(st.sampled_from([torch.float32, torch.float64]))
    temp = draw(st.sampled_from([0.5, 1.0, 3.0]))
    seed = draw(st.integers(0, 2**31 - 1))
    g = torch.Generator().manual_seed(seed)
    Nk = Nq + off + extra
    # bound the float64 reference's work (it materialises [B, Hq, Nq, Nk] scores): shrink D, then B, then G
    while B * Hkv * G * Nq * Nk * D > 3e7:
        if D > 16:
            D //= 2
        elif B > 1:
            B -= 1
        elif G > 1:
            G //= 2
        else:
            break
    q = (torch.randn(B, Hkv * G, Nq, D, generator=g) * temp).to(dtype)
    k = torch.randn(B, Hkv, Nk, D, generator=g).to(dtype)
    v = torch.randn(B, Hkv, Nk, D, generator=g).to(dtype)
    q_offset = off if (extra or draw(st.booleans())) else None
    return q, k, v, q_offset, off


def _tols(dtype):
    return (1e-9, 1e-9) if dtype == torch.float64 else (2e-5, 2e-5)


def assert_close(actual, expected, dtype, what):
    atol, rtol = _tols(dtype)
    expected = expected.to(torch.float64)
    actual = actual.to(torch.float64)
    err = (actual - expected).abs()
    bound = atol + rtol * expected.abs()
    bad = ~(err <= bound)
    assert not bad.any(), f"{what}: max err {err.max().item():.3e} at {bad.nonzero()[0].tolist()}"


def assert_lse_close(actual, expected, what):
    # lse is float32 by contract: compare at float32 resolution of its magnitude
    err = (actual.double() - expected.double()).abs()
    bound = 1e-5 + 2e-6 * expected.double().abs()
    assert bool((err <= bound).all()), f"{what}: lse max err {err.max().item():.3e}"


def _corrector(kind, data):
    if kind is None:
        return None, None
    name, interp = kind
    gamma = data.draw(st.one_of(st.integers(1, 80), st.sampled_from([16, 64])), label="gamma")
    tail = data.draw(st.one_of(st.none(), st.integers(0, 200)), label="tail")
    spec = {"name": name, "gamma": gamma, "tail": tail}
    params = {}
    if name == "meancorr":
        spec["block"] = data.draw(st.one_of(st.none(), st.integers(1, 80)), label="block")
    if name == "delta":
        if interp == "ema":
            params = {"beta": data.draw(st.sampled_from([0.5, 0.75, 0.95]), label="beta")}
        spec["interpolation"] = {"name": interp, **params}
    return spec, params


@pytest.mark.parametrize("corrector", list(CORRECTORS), ids=list(CORRECTORS))
@pytest.mark.parametrize("backend", BACKENDS)
@given(data=st.data())
def test_backend_x_corrector_matches_float64_reference(backend, corrector, data):
    q, k, v, q_offset, off = data.draw(problems(), label="problem")
    options = data.draw(BACKEND_OPTIONS.get(backend, st.just({})), label="options")
    kind = CORRECTORS[corrector]
    spec, params = _corrector(kind, data)
    attn = SparseAttention(backend, corrector=spec, **options)
    out, lse = attn(q, k, v, q_offset=q_offset, return_lse=True)
    assert out.dtype == q.dtype and out.shape == q.shape
    assert lse.dtype == torch.float32 and lse.shape == q.shape[:3]
    scale = q.shape[-1] ** -0.5
    pat = attn.backend.pattern(q, k, scale=scale, q_offset=off)
    mask = pat.expand(pat.mask())  # attn.backend.mask(q, k, ...), without a second selection
    sp_out, sp_lse = attention64(q, k, v, mask, scale)
    if kind is None:
        exp_out, exp_lse = sp_out, sp_lse
    elif kind[0] == "meancorr":
        _check_meancorr(attn, pat, q, k, v, off, scale, mask, sp_out, sp_lse, out, lse, spec)
        return
    else:
        dn_out, dn_lse = attention64(q, k, v, causal_mask(q.shape[2], k.shape[2], off), scale)
        mode = "recompute" if kind[0] == "recompute" else kind[1]
        exp_out, exp_lse = corrected64(mode, params, sp_out, sp_lse, dn_out, dn_lse, spec["gamma"], spec["tail"])
    assert_close(out, exp_out, q.dtype, str(attn))
    assert_lse_close(lse, exp_lse, str(attn))


def _check_meancorr(attn, pat, q, k, v, off, scale, mask, sp_out, sp_lse, out, lse, spec):
    """meancorr against ref64: tailonly's dense rows, the mean correction merged into the other rows."""
    M = mean_block64(spec["block"], pat.block_k, pat.block_indptr is not None)
    exp_out, exp_lse, fixed = meancorr64(q, k, v, mask, scale, M, off, sp_out, sp_lse)
    n_body, dense_rows = tailonly_rows(q.shape[2], spec["gamma"], spec["tail"])
    if dense_rows:
        dn_out, dn_lse = attention64(q, k, v, causal_mask(q.shape[2], k.shape[2], off), scale)
        exp_out[:, :, dense_rows] = dn_out[:, :, dense_rows]
        exp_lse[:, :, dense_rows] = dn_lse[:, :, dense_rows]
        fixed[:, :, dense_rows] = False
    atol, rtol = _tols(q.dtype)
    bound = atol + rtol * exp_out.abs()
    if q.dtype == torch.float64:
        # the backend hands its lse over as float32 (the contract), and the merge weighs the sparse row by
        # exp(lse_s - lse): out moves by w_s * (out_s - out) per unit of lse_s, times lse_s's rounding
        w_s = torch.exp(sp_lse - torch.where(torch.isfinite(exp_lse), exp_lse, torch.zeros_like(exp_lse)))
        ulp = sp_lse.abs().nan_to_num(0.0, posinf=0.0) * 2.0**-23
        bound = bound + torch.where(fixed, ulp * w_s, torch.zeros_like(w_s))[..., None] * (sp_out - exp_out).abs()
    err = (out.double() - exp_out).abs()
    bad = ~(err <= bound)
    assert not bad.any(), f"{attn}: max err {err.max().item():.3e} at {bad.nonzero()[0].tolist()}"
    assert_lse_close(lse, exp_lse, str(attn))


@pytest.mark.parametrize("backend", BACKENDS)
@given(data=st.data())
def test_pattern_mask_cost_and_lists_agree(backend, data):
    """The derived keep-mask equals the rule written out independently; the exact pair count equals
    the mask's count (per group, per plan, per data-independent cost()); the executable lists count
    every visible pair exactly once; the pattern is causal and keeps each row's own key."""
    q, k, v, q_offset, off = data.draw(problems(max_n=300), label="problem")
    options = data.draw(BACKEND_OPTIONS.get(backend, st.just({})), label="options")
    attn = SparseAttention(backend, **options)
    scale = q.shape[-1] ** -0.5
    pat = attn.backend.pattern(q, k, scale=scale, q_offset=off)
    mask = pat.mask().reshape(pat.groups, q.shape[2], k.shape[2])
    assert torch.equal(mask, rule_mask(pat)), "mask differs from the rule"
    assert torch.equal(pat.pairs().reshape(-1), mask.sum(dim=(-1, -2))), "pairs() differs from the mask"
    counts = lowered_mask(pat)
    assert counts.numel() == 0 or int(counts.max()) <= 1, "the lowered lists count a pair twice"
    assert torch.equal(counts.bool(), mask), "the lowered lists differ from the mask"
    full = pat.expand(pat.mask())
    causal = causal_mask(q.shape[2], k.shape[2], off)
    assert not (full & ~causal).any(), "pattern sees a future key"
    diag = off + torch.arange(q.shape[2])
    if backend != "strided" or options["local"] >= 1:
        assert full[..., torch.arange(q.shape[2]), diag].all(), "pattern misses a query's own key"
    per_head = full.sum(dim=(-1, -2)).double().mean().item()
    assert float(attn.plan(q, k, q_offset=off).cost().backend_pairs) == pytest.approx(per_head, rel=1e-12)
    if not attn.backend.data_dependent:
        assert float(attn.cost(q.shape[2], k.shape[2], off).backend_pairs) == pytest.approx(per_head, rel=1e-12)


@pytest.mark.parametrize("corrector", ["delta", "recompute", "tailonly"])
@given(data=st.data())
def test_plan_cost_counts_what_runs(corrector, data):
    """A corrected plan computes the backend only over the rows it keeps and the dense rows over
    their whole prefix; cost() counts exactly those pairs."""
    q, k, v, q_offset, off = data.draw(problems(max_n=300), label="problem")
    gamma = data.draw(st.integers(1, 80))
    window, sink = data.draw(st.integers(1, 64)), data.draw(st.integers(0, 8))
    attn = SparseAttention("streaming", corrector={"name": corrector, "gamma": gamma}, window=window, sink=sink)
    plan = attn.plan(q, k, q_offset=off)
    rows = attn.corrector.rows(q.shape[2])
    nb = rows.n_sparse
    full = attn.backend.mask(q, k, q_offset=off)[..., :nb, :]
    c = plan.cost()
    assert c.backend_pairs == int(full[0, 0].sum())
    assert c.corrector_pairs == int((rows.dense_rows() + off + 1).sum())
    assert c.dense_pairs == int((off + torch.arange(q.shape[2]) + 1).sum())
    assert c == attn.cost(q.shape[2], k.shape[2], off)


@pytest.mark.parametrize("backend", BACKENDS)
@given(data=st.data())
def test_meancorr_pairs_count_the_corrected_blocks(backend, data):
    """meancorr's complement_pairs equals the (row, corrected block) pairs counted from the keep-mask, for
    the backend's own pattern and for the body rows a corrected plan runs it over; cost() adds them."""
    q, k, v, q_offset, off = data.draw(problems(max_n=300), label="problem")
    options = data.draw(BACKEND_OPTIONS.get(backend, st.just({})), label="options")
    block = data.draw(st.one_of(st.none(), st.integers(1, 80)), label="block")
    gamma = data.draw(st.integers(1, 80), label="gamma")
    tail = data.draw(st.one_of(st.none(), st.integers(0, 200)), label="tail")
    attn = SparseAttention(backend, corrector={"name": "meancorr", "gamma": gamma, "tail": tail, "block": block},
                           **options)
    scale = q.shape[-1] ** -0.5
    pat = attn.backend.pattern(q, k, scale=scale, q_offset=off)
    M = mean_block64(block, pat.block_k, pat.block_indptr is not None)
    assert attn.corrector.mean_block(pat) == M
    keep = pat.expand(pat.mask())
    counted = corrected_blocks64(keep, M, off).sum(dim=(-1, -2)).double().mean().item()
    assert float(attn.corrector.complement_pairs(pat)) == pytest.approx(counted, rel=1e-12, abs=0)
    plan = attn.plan(q, k, q_offset=off)
    rows = attn.corrector.rows(q.shape[2])
    dense_pairs = int((rows.dense_rows() + off + 1).sum())
    if plan.pattern is None:
        assert plan.cost().corrector_pairs == dense_pairs
    else:
        nb = plan.pattern.nq
        body = corrected_blocks64(keep[..., :nb, :], M, off).sum(dim=(-1, -2)).double().mean().item()
        assert float(plan.cost().corrector_pairs) == pytest.approx(dense_pairs + body, rel=1e-12, abs=0)


@given(data=st.data())
def test_streaming_window_covering_everything_is_dense(data):
    q, k, v, q_offset, off = data.draw(problems(), label="problem")
    sink = data.draw(st.integers(0, 50))
    window = k.shape[2] + data.draw(st.integers(0, 10))
    s = SparseAttention("streaming", window=window, sink=sink)(q, k, v, q_offset=q_offset, return_lse=True)
    d = SparseAttention("dense")(q, k, v, q_offset=q_offset, return_lse=True)
    assert_close(s[0], d[0].double(), q.dtype, "streaming(window>=Nk)")
    assert_lse_close(s[1], d[1], "streaming(window>=Nk)")


@pytest.mark.parametrize("corrector", ["delta", "recompute"])
@pytest.mark.parametrize("backend", BACKENDS)
@given(data=st.data())
def test_gamma_one_is_dense(backend, corrector, data):
    q, k, v, q_offset, off = data.draw(problems(max_n=300), label="problem")
    options = data.draw(BACKEND_OPTIONS.get(backend, st.just({})), label="options")
    tail = data.draw(st.one_of(st.none(), st.integers(0, 50)))
    out, lse = SparseAttention(backend, corrector={"name": corrector, "gamma": 1, "tail": tail}, **options)(
        q, k, v, q_offset=q_offset, return_lse=True
    )
    dn_out, dn_lse = attention64(q, k, v, causal_mask(q.shape[2], k.shape[2], off), q.shape[-1] ** -0.5)
    assert_close(out, dn_out, q.dtype, f"{backend}+{corrector}(gamma=1)")
    assert_lse_close(lse, dn_lse, "gamma=1")


@given(data=st.data())
def test_anchor_and_tail_rows_are_dense_and_delta_adds_anchor_delta(data):
    """Spelled out once more on streaming: anchor/tail = dense, recompute leaves others sparse."""
    q, k, v, q_offset, off = data.draw(problems(), label="problem")
    gamma = data.draw(st.integers(2, 70))
    window, sink = data.draw(st.integers(1, 64)), data.draw(st.integers(0, 8))
    scale = q.shape[-1] ** -0.5
    sparse = SparseAttention("streaming", window=window, sink=sink)(q, k, v, q_offset=q_offset)
    delta = SparseAttention("streaming", corrector={"name": "delta", "gamma": gamma}, window=window, sink=sink)(
        q, k, v, q_offset=q_offset
    )
    recomp = SparseAttention("streaming", corrector={"name": "recompute", "gamma": gamma}, window=window, sink=sink)(
        q, k, v, q_offset=q_offset
    )
    dense, _ = attention64(q, k, v, causal_mask(q.shape[2], k.shape[2], off), scale)
    n_body, anchors, tail = paper_rows(q.shape[2], gamma, None)
    exact = anchors + tail
    atol = 1e-9 if q.dtype == torch.float64 else 3e-5
    for r in exact:
        assert torch.allclose(delta[:, :, r].double(), dense[:, :, r], atol=atol)
        assert torch.allclose(recomp[:, :, r].double(), dense[:, :, r], atol=atol)
    others = [i for i in range(q.shape[2]) if i not in set(exact)]
    if others:
        # the corrected call runs the backend over the body rows only (the tail is recomputed), so
        # its row blocks can gather a different key superset: equal up to summation order
        tight = 1e-12 if q.dtype == torch.float64 else 1e-6
        assert torch.allclose(recomp[:, :, others], sparse[:, :, others], rtol=tight, atol=tight)
    for i in range(n_body):
        a = (i // gamma) * gamma
        want = sparse[:, :, i].double() + dense[:, :, a] - sparse[:, :, a].double()
        assert torch.allclose(delta[:, :, i].double(), want, atol=atol), f"row {i}"


@given(data=st.data())
def test_merge_over_any_key_split_equals_attention_over_union(data):
    q, k, v, q_offset, off = data.draw(problems(max_n=200), label="problem")
    scale = q.shape[-1] ** -0.5
    causal = causal_mask(q.shape[2], k.shape[2], off)
    nparts = data.draw(st.integers(2, 4))
    seed = data.draw(st.integers(0, 1000))
    owner = torch.randint(0, nparts, (q.shape[2], k.shape[2]), generator=torch.Generator().manual_seed(seed))
    parts = [masked_attention(q, k, v, causal & (owner == p), scale=scale) for p in range(nparts)]
    whole, whole_lse = attention64(q, k, v, causal, scale)
    merged = merge(parts[0], parts[1]) if nparts == 2 else merge_many(parts)
    # merge weights exp(lse_part - lse) come from float32 lse (the contract), so even float64
    # outputs merge at float32 resolution
    assert_close(merged.out, whole, torch.float32, "merge")
    assert_lse_close(merged.lse, whole_lse, "merge")
    # pairwise merge folds to the same thing
    acc = parts[0]
    for p in parts[1:]:
        acc = merge(acc, p)
    assert_close(acc.out, whole, torch.float32, "merge fold")


def test_merge_with_empty_rows():
    out = torch.randn(1, 1, 3, 4)
    a = sparsekit.AttentionResult(out, torch.tensor([[[0.0, float("-inf"), float("-inf")]]]))
    b = sparsekit.AttentionResult(out * 2, torch.tensor([[[float("-inf"), 1.0, float("-inf")]]]))
    m = merge(a, b)
    assert torch.allclose(m.out[0, 0, 0], out[0, 0, 0]) and torch.allclose(m.out[0, 0, 1], 2 * out[0, 0, 1])
    assert torch.all(m.out[0, 0, 2] == 0) and m.lse[0, 0, 2] == float("-inf")
    with pytest.raises(ValueError, match="shapes differ"):
        merge(a, sparsekit.AttentionResult(out[:, :, :2], a.lse[:, :, :2]))


@pytest.mark.parametrize("backend", BACKENDS)
@given(data=st.data())
def test_gqa_equals_repeated_kv_and_batch_heads_are_independent(backend, data):
    q, k, v, q_offset, off = data.draw(problems(max_n=300), label="problem")
    options = data.draw(BACKEND_OPTIONS.get(backend, st.just({})), label="options")
    options.update(PER_HEAD_OPTIONS.get(backend, {}))
    attn = SparseAttention(backend, corrector={"name": "delta", "gamma": data.draw(st.integers(1, 40))}, **options)
    G = q.shape[1] // k.shape[1]
    out = attn(q, k, v, q_offset=q_offset)
    rep = attn(q, k.repeat_interleave(G, 1), v.repeat_interleave(G, 1), q_offset=q_offset)
    assert_close(out, rep.double(), q.dtype, "GQA vs repeated KV")
    # permuting batch items and KV groups (with their query heads) permutes the output
    pb = torch.randperm(q.shape[0], generator=torch.Generator().manual_seed(1))
    pk = torch.randperm(k.shape[1], generator=torch.Generator().manual_seed(2))
    ph = (pk[:, None] * G + torch.arange(G)).flatten()
    perm = attn(q[pb][:, ph], k[pb][:, pk], v[pb][:, pk], q_offset=q_offset)
    assert_close(perm, out[pb][:, ph].double(), q.dtype, "permutation equivariance")


@pytest.mark.parametrize("backend", BACKENDS)
@given(data=st.data())
def test_huge_logits_stay_finite_and_output_in_hull_of_attended_values(backend, data):
    q, k, v, q_offset, off = data.draw(problems(max_n=300), label="problem")
    options = data.draw(BACKEND_OPTIONS.get(backend, st.just({})), label="options")
    attn = SparseAttention(backend, **options)
    big = q * 1000
    out, lse = attn(big, k, v, q_offset=q_offset, return_lse=True)
    assert torch.isfinite(out).all() and torch.isfinite(lse).all()
    scale = q.shape[-1] ** -0.5
    mask = attn.backend.mask(big, k, scale=scale, q_offset=off)
    rows = torch.randperm(q.shape[2], generator=torch.Generator().manual_seed(0))[:16]  # sampled rows
    G = q.shape[1] // k.shape[1]
    vr = v.double().repeat_interleave(G, 1)[:, :, None]  # [B, Hq, 1, Nk, D]
    m = mask[:, :, rows, :, None]
    out = out[:, :, rows]
    lo = torch.where(m, vr, torch.tensor(float("inf"), dtype=torch.float64)).amin(-2)
    hi = torch.where(m, vr, torch.tensor(float("-inf"), dtype=torch.float64)).amax(-2)
    # rounding: a few ulps per softmax term and per term of the Nk-term sum, plus the error of
    # exp(s - lse) itself, which grows with the score magnitude |s| <= scale * |q| * |k|
    eps = torch.finfo(q.dtype).eps
    smax = scale * big.double().norm(dim=-1).max().item() * k.double().norm(dim=-1).max().item()
    slack = 4 * (k.shape[2] + 16 + smax) * eps * v.abs().max().item()
    below = (lo - out.double()).max().item()
    above = (out.double() - hi).max().item()
    assert below <= slack and above <= slack, f"outside the hull by {max(below, above):.3e} (slack {slack:.3e})"
