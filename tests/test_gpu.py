"""Every CUDA implementation of the executor against the reference of the same pattern (needs CUDA).

For each implementation that runs on the machine (Triton always; FlashInfer where installed and built
for the dtype / head_dim; FlexAttention), for every first-party backend and the third-party plug-in of
tests/plugin_pkg, on random inputs over odd N, Hq/Hkv in {1, 4, 8}, D in {64, 128}, bf16 and fp16,
q_offset > 0 and batch > 1: the implementation's output on the backend's pattern against the
float32 reference implementation of the same pattern (relative error <= 1e-2, lse error <= 1e-3
relative to its magnitude), plus the whole corrected pipeline per kernel family.
"""

from __future__ import annotations

import pytest
import torch

from sparsekit import SparseAttention, kernels
from sparsekit.executor import choose, execute

pytestmark = pytest.mark.gpu

# (B, Hq, Hkv, Nq, q_offset, D, dtype)
CASES = [
    (1, 8, 8, 1, 0, 64, torch.bfloat16),
    (2, 4, 1, 37, 5, 128, torch.float16),
    (1, 8, 4, 63, 0, 64, torch.bfloat16),
    (2, 8, 8, 257, 100, 128, torch.float16),
    (1, 32, 8, 1001, 0, 128, torch.bfloat16),
    (1, 4, 4, 4096, 0, 128, torch.bfloat16),
    (1, 8, 1, 3000, 333, 64, torch.float16),
]
IMPLS = ["fa3_band", "fa3_rows", "fa3_paged", "triton_band", "triton_blocks"]
BACKENDS = {
    "dense": {},
    "streaming(64,16)": dict(name="streaming", window=64, sink=16),
    "streaming(2048,1024)": dict(name="streaming", window=2048, sink=1024),
    "streaming(7,0)": dict(name="streaming", window=7, sink=0),
    "hip": dict(name="hip", k=512, block_q=64, block_k=64, stages="256:1024", q_stride=4, sink=128, window=256),
    "hip(per head)": dict(name="hip", k=256, block_q=64, block_k=64, stages="", q_stride=4, sink=64, window=128,
                          share_kv=False),
    "vertical_slash": dict(name="vertical_slash", vertical_size=40, slash_size=50, sink=5, local=20, last_q=64),
    "strided (plug-in)": dict(name="strided", block_q=128, block_k=64, local=2, stride=5),
}


def _inputs(B, Hq, Hkv, Nq, q_offset, D, dtype, seed):
    g = torch.Generator(device="cuda").manual_seed(seed)
    Nk = Nq + q_offset
    q = torch.randn(B, Hq, Nq, D, device="cuda", generator=g).to(dtype)
    k = torch.randn(B, Hkv, Nk, D, device="cuda", generator=g).to(dtype)
    v = torch.randn(B, Hkv, Nk, D, device="cuda", generator=g).to(dtype)
    return q, k, v


def _close(name, got, ref, *, out_tol=1e-2, lse_tol=1e-3):
    o, l = got
    ro, rl = ref
    assert o.shape == ro.shape and l.shape == rl.shape, name
    assert l.dtype == torch.float32, name
    rel = ((o.float() - ro.float()).abs().max() / ro.float().abs().max().clamp(min=1e-6)).item()
    fin = torch.isfinite(rl)
    assert torch.equal(fin, torch.isfinite(l)), f"{name}: empty rows differ"
    lerr = (l[fin] - rl[fin]).abs().max().item() if fin.any() else 0.0
    assert rel <= out_tol and lerr <= lse_tol * max(1.0, rl[fin].abs().max().item() if fin.any() else 1.0), \
        f"{name}: rel {rel:.2e}, lse {lerr:.2e}"


def _backend(spec):
    spec = dict(spec)
    name = spec.pop("name", "dense")
    return SparseAttention(name, **spec).backend


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("case", CASES, ids=lambda c: "x".join(map(str, c[:6])) + str(c[6])[-4:])
def test_every_implementation_on_every_backend(impl, case):
    shape, dtype = case[:6], case[6]
    B, Hq, Hkv, Nq, q_offset, D = shape
    q, k, v = _inputs(*shape, dtype, seed=hash(shape) % 1000)
    s = D**-0.5
    ran, why = 0, {}
    for label, spec in BACKENDS.items():
        be = _backend(spec)
        pat = be.pattern(q, k, scale=s, q_offset=q_offset)
        if impl == "fa3_rows":  # gathered rows over their prefix: the corrector's dense rows
            rows = torch.unique(torch.cat([torch.arange(0, Nq, 64), torch.arange(max(0, Nq - 130), Nq)])).cuda()
            qr = q.index_select(2, rows)
            pat = type(pat).gathered(qr, k, positions=rows + q_offset)
            qq = qr
        else:
            qq = q
        try:
            choose(pat, qq, k, scale=s, impl=impl)
        except RuntimeError as exc:
            why[label] = str(exc)[-160:]
            continue
        got = execute(pat, qq, k, v, scale=s, impl=impl)
        ref = execute(pat, qq.float(), k.float(), v.float(), scale=s, impl="reference")
        _close(f"{label} {impl} {shape} {dtype}", got, ref)
        ran += 1
        if impl == "fa3_rows":
            break
    if ran == 0:
        pytest.skip(f"{impl} ran no backend here: {why}")


@pytest.mark.parametrize("shape", [(2, 4, 1, 200, 5, 128), (1, 8, 4, 1001, 0, 64)])
def test_flex_on_every_backend(shape):
    """FlexAttention compiles per pattern: a smaller matrix than the other implementations."""
    dtype = torch.bfloat16
    q, k, v = _inputs(*shape, dtype, seed=5)
    s = shape[-1] ** -0.5
    ran = 0
    for label, spec in BACKENDS.items():
        be = _backend(spec)
        pat = be.pattern(q, k, scale=s, q_offset=shape[4])
        try:
            choose(pat, q, k, scale=s, impl="flex")
        except RuntimeError:
            continue
        got = execute(pat, q, k, v, scale=s, impl="flex")
        ref = execute(pat, q.float(), k.float(), v.float(), scale=s, impl="reference")
        _close(f"{label} flex {shape}", got, ref)
        ran += 1
    assert ran == len(BACKENDS)


@pytest.mark.parametrize("family", ["triton", "flashinfer"])
@pytest.mark.parametrize("corrector", ["delta(gamma=64)", "delta(gamma=16,interpolation=linear)", "recompute(gamma=64)",
                                       "tailonly(gamma=64)", "meancorr(gamma=64)"])
@pytest.mark.parametrize("backend", ["streaming(window=128,sink=32)",
                                     "hip(k=256,block_q=64,block_k=64,stages='',sink=64,window=128)",
                                     "vertical_slash(vertical_size=40,slash_size=50)"])
@pytest.mark.parametrize("shape", [(2, 8, 4, 999, 7, 128), (1, 32, 8, 4096, 0, 128)])
def test_corrected_pipeline(family, corrector, backend, shape):
    dtype = torch.bfloat16
    q, k, v = _inputs(*shape, dtype, seed=7)
    q_offset = shape[4]
    spec = f"{backend}+{corrector}"
    attn = SparseAttention.from_string(spec)
    try:
        with kernels.use(family):
            plan = attn.plan(q, k, q_offset=q_offset)
            out, lse = attn.run(plan, q, k, v)
    except RuntimeError as exc:
        pytest.skip(f"{family} cannot run {spec} here: {str(exc)[-200:]}")
    # the reference of the same patterns: float32 inputs, reference implementation, torch Δ
    pat_q = q.float()
    with kernels.use("reference"):
        rplan = attn.plan(pat_q, k.float(), q_offset=q_offset)
        if plan.pattern is not None:  # the same (data-dependent) selection as the bf16 run
            rplan.pattern = plan.pattern
        ref = attn.run(rplan, pat_q, k.float(), v.float())
    _close(f"{spec} {family} {shape}", (out, lse), ref)


MEANCORR_CASES = [
    (1, 8, 8, 1, 0, 64),
    (2, 4, 1, 37, 5, 128),
    (2, 8, 2, 1001, 77, 128),
    (1, 32, 8, 4099, 0, 128),
    (1, 8, 1, 3000, 333, 64),
]


@pytest.mark.parametrize("block", [None, 96, 200])
@pytest.mark.parametrize("case", MEANCORR_CASES, ids=lambda c: "x".join(map(str, c)))
def test_meancorr_triton_matches_torch(case, block):
    """meancorr's Triton kernel against its torch path (float32 math) on CUDA bf16, every backend's pattern."""
    from sparsekit.contract import AttentionResult
    from sparsekit.correctors.meancorr import MeanCorr, complement_torch, corrected_blocks
    from sparsekit.kernels.triton_meancorr import mean_complement

    B, Hq, Hkv, Nq, q_offset, D = case
    q, k, v = _inputs(B, Hq, Hkv, Nq, q_offset, D, torch.bfloat16, seed=13)
    s = D**-0.5
    changed = 0
    for label, spec in BACKENDS.items():
        be = _backend(spec)
        pat = be.pattern(q, k, scale=s, q_offset=q_offset)
        base = execute(pat, q, k, v, scale=s)
        corr = MeanCorr(block=block)
        M = corr.mean_block(pat)
        ref = AttentionResult(base.out.clone(), base.lse.clone())
        got = AttentionResult(base.out.clone(), base.lse.clone())
        assert corr.path(pat, got, q, k) == ("triton", None)
        complement_torch(pat, ref, q, k, v, scale=s, block=M)
        mean_complement(pat, got.out, got.lse, q, k, v, scale=s, block=M)
        _close(f"meancorr {label} M={M} {case}", got, ref)
        fixed = torch.cat([pat.expand(corrected_blocks(pat, M, r0, min(Nq, r0 + 256))).any(-1)
                           for r0 in range(0, Nq, 256)], dim=2)
        assert torch.equal(got.out[~fixed], base.out[~fixed]) and torch.equal(got.lse[~fixed], base.lse[~fixed]), \
            f"{label}: a row without a corrected block changed"
        changed += int(fixed.sum())
    # a short call (37 rows over 42 keys) has no fully visible block outside the patterns' windows
    assert changed > 0 or Nq < 256


def test_explain_names_the_fast_path():
    q, k, v = _inputs(1, 32, 8, 8192, 0, 128, torch.bfloat16, seed=1)
    text = SparseAttention.from_string("streaming(window=2048,sink=1024)+delta(gamma=64)").explain(q, k)
    try:
        import flashinfer  # noqa: F401

        assert "runs on fa3_band" in text and "runs on fa3_rows" in text, text
    except ImportError:
        assert "runs on triton_band" in text and "not fa3_band: flashinfer is not installed" in text, text


def test_no_mask_or_expansion_memory():
    """Peak memory of streaming + Δ stays near q/k/v/out (no [N, N] mask, no K/V expansion)."""
    B, Hq, Hkv, N, D = 1, 32, 8, 32768, 128
    q, k, v = _inputs(B, Hq, Hkv, N, 0, D, torch.bfloat16, seed=3)
    attn = SparseAttention.from_string("streaming(window=2048,sink=1024)+delta(gamma=64)")
    attn(q, k, v)
    torch.cuda.synchronize()
    base = torch.cuda.memory_allocated()
    torch.cuda.reset_peak_memory_stats()
    out = attn(q, k, v)
    torch.cuda.synchronize()
    extra = torch.cuda.max_memory_allocated() - base
    qkv_out = q.numel() * 2 * 2 + k.numel() * 2 * 2  # q + out, k + v
    assert extra <= 0.5 * qkv_out + (300 << 20), f"extra peak {extra / 2**20:.0f} MiB"
    del out


def test_rows_over_many_requests():
    """Gathered rows (sorted, several 128-row requests, a few scattered) against the reference."""
    B, Hq, Hkv, N, D = 1, 8, 2, 32768, 128
    q, k, v = _inputs(B, Hq, Hkv, N, 0, D, torch.bfloat16, seed=11)
    s = D**-0.5
    g = torch.Generator().manual_seed(4)
    from sparsekit import Pattern

    for rows in (torch.arange(0, N, 64), torch.sort(torch.randperm(N, generator=g)[:300]).values,
                 torch.sort(torch.randperm(N, generator=g)[:16]).values):
        rows = rows.cuda()
        qr = q.index_select(2, rows)
        pat = Pattern.gathered(qr, k, positions=rows)
        for impl in ("fa3_rows", "triton_band", "triton_blocks"):
            try:
                got = execute(pat, qr, k, v, scale=s, impl=impl)
            except RuntimeError:
                continue
            pick = torch.randperm(rows.numel(), generator=g)[:24].sort().values.cuda()
            sub = Pattern.gathered(qr.index_select(2, pick), k, positions=rows[pick])
            ref = execute(sub, qr.index_select(2, pick).float(), k.float(), v.float(), scale=s, impl="reference")
            _close(f"rows {impl} R={rows.numel()}", (got.out.index_select(2, pick), got.lse.index_select(2, pick)), ref)


@pytest.mark.parametrize("window,sink,q_offset", [(512, 64, 0), (512, 64, 333), (700, 1, 50)])
def test_fa3_streaming_fused_sinks_and_window(window, sink, q_offset):
    """fa3 streaming with ``fused=True`` (sinks and window in one call per chunk of ``window`` rows): several
    full chunks, a short last chunk, chunked prefill and batch 2, against the reference of the same
    pattern, as the default path is."""
    from sparsekit import Pattern
    from sparsekit.kernels import fa3

    q, k, v = _inputs(2, 8, 2, 3000, q_offset, 128, torch.bfloat16, seed=window + sink)
    s = 128**-0.5
    pat = Pattern.band(q, k, q_offset=q_offset, window=window, sink=sink)
    try:
        choose(pat, q, k, scale=s, impl="fa3_band")
    except RuntimeError as exc:
        pytest.skip(f"fa3_band cannot run here: {str(exc)[-120:]}")
    ref = execute(pat, q.float(), k.float(), v.float(), scale=s, impl="reference")
    for fused in (True, False):
        got = fa3.streaming(q, k, v, scale=s, q_offset=q_offset, window=window, sink=sink, fused=fused)
        _close(f"band w={window} s={sink} off={q_offset} fused={fused}", got, ref)
