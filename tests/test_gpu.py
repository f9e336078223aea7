"""Every GPU fast path against the reference semantics in float32 (needs CUDA; skipped without).

For each implementation available on the machine (Triton always, FlashInfer where installed
and built for the dtype / head_dim), on random inputs over odd N, N < gamma, Hq/Hkv in
{1, 4, 8}, D in {64, 128}, bf16 and fp16, q_offset > 0 and batch > 1:
dense, streaming and key-dense rows, and the whole streaming + corrector pipeline
(Δ repeat / linear, recompute). bf16/fp16 relative error <= 1e-2 against float32 of the same
inputs, lse error <= 1e-3.
"""

from __future__ import annotations

import pytest
import torch

from sparsekit import SparseAttention, kernels
from sparsekit.backends.streaming import Streaming

pytestmark = pytest.mark.gpu

# (B, Hq, Hkv, Nq, q_offset, D)
SHAPES = [
    (1, 8, 8, 1, 0, 64),
    (2, 4, 1, 37, 5, 128),
    (1, 8, 4, 63, 0, 64),
    (2, 8, 8, 257, 100, 128),
    (1, 32, 8, 1001, 0, 128),
    (1, 4, 4, 4096, 0, 128),
    (1, 8, 1, 3000, 333, 64),
]
DTYPES = [torch.bfloat16, torch.float16]


def _impls():
    out = ["triton"]
    try:
        import flashinfer  # noqa: F401

        out.append("flashinfer")
    except ImportError:
        pass
    return out


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
    assert rel <= out_tol and lerr <= lse_tol, f"{name}: rel {rel:.2e}, lse {lerr:.2e}"


def _maybe(impl, piece, q, k, v):
    with kernels.use(impl):
        try:
            return kernels.implementation(piece, q, k, v)
        except RuntimeError:
            return None


@pytest.mark.parametrize("impl", _impls())
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", SHAPES)
def test_dense_streaming_rows(impl, dtype, shape):
    B, Hq, Hkv, Nq, q_offset, D = shape
    q, k, v = _inputs(*shape, dtype, seed=hash(shape) % 1000)
    s = D**-0.5
    q32, k32, v32 = q.float(), k.float(), v.float()
    ran = 0
    if _maybe(impl, "dense", q, k, v) == impl:
        with kernels.use(impl):
            got = kernels.dense_attention(q, k, v, scale=s, q_offset=q_offset)
        from sparsekit.backends.dense import Dense

        with kernels.use("reference"):
            ref = Dense().prefill(q32, k32, v32, scale=s, q_offset=q_offset)
        _close(f"dense {impl} {shape} {dtype}", got, ref)
        ran += 1
    for window, sink in ((64, 16), (2048, 1024), (7, 0), (1, 3)):
        if _maybe(impl, "streaming", q, k, v) != impl:
            break
        with kernels.use(impl):
            got = kernels.streaming_attention(q, k, v, scale=s, q_offset=q_offset, window=window, sink=sink)
        with kernels.use("reference"):
            ref = Streaming(window=window, sink=sink).prefill(q32, k32, v32, scale=s, q_offset=q_offset)
        _close(f"streaming({window},{sink}) {impl} {shape} {dtype}", got, ref)
        ran += 1
    for gamma in (16, 64):
        rows = torch.cat([torch.arange(0, Nq, gamma, device="cuda"), torch.arange(max(0, Nq - 130), Nq, device="cuda")])
        rows = torch.unique(rows)
        pos = rows + q_offset
        qr = q.index_select(2, rows)
        if _maybe(impl, "rows", qr, k, v) != impl:
            break
        with kernels.use(impl):
            got = kernels.rows_attention(qr, k, v, positions=pos, scale=s)
        with kernels.use("reference"):
            ref = kernels.rows_attention(qr.float(), k32, v32, positions=pos, scale=s)
        _close(f"rows(gamma={gamma}) {impl} {shape} {dtype}", got, ref)
        ran += 1
    if ran == 0:
        pytest.skip(f"{impl} does not run {dtype} / head_dim {D} here")


@pytest.mark.parametrize("impl", _impls())
@pytest.mark.parametrize("corrector", ["delta(gamma=64)", "delta(gamma=16,interpolation=linear)", "recompute(gamma=64)",
                                       "delta(gamma=16,interpolation=ema)"])
@pytest.mark.parametrize("shape", [(2, 8, 4, 999, 7, 128), (1, 4, 1, 40, 0, 64), (1, 32, 8, 4096, 0, 128)])
@pytest.mark.parametrize("dtype", DTYPES)
def test_corrected_pipeline(impl, corrector, shape, dtype):
    q, k, v = _inputs(*shape, dtype, seed=7)
    q_offset = shape[4]
    spec = f"streaming(window=128,sink=32)+{corrector}"
    attn = SparseAttention.from_string(spec)
    if _maybe(impl, "streaming", q, k, v) != impl:
        pytest.skip(f"{impl} does not run {dtype} / head_dim {shape[-1]} here")
    with kernels.use(impl):
        out, lse = attn(q, k, v, q_offset=q_offset, return_lse=True)
    with kernels.use("reference"):
        ref = attn(q.float(), k.float(), v.float(), q_offset=q_offset, return_lse=True)
    _close(f"{spec} {impl} {shape} {dtype}", (out, lse), ref)


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


@pytest.mark.parametrize("impl", _impls())
def test_rows_any_order(impl):
    """Key-dense rows in any order and over several 128-row requests match the reference."""
    B, Hq, Hkv, N, D = 1, 8, 2, 32768, 128
    q, k, v = _inputs(B, Hq, Hkv, N, 0, D, torch.bfloat16, seed=11)
    s = D**-0.5
    g = torch.Generator().manual_seed(4)
    for rows in (torch.arange(0, N, 64), torch.randperm(N, generator=g)[:300], torch.sort(torch.randperm(N, generator=g)[:16]).values):
        rows = rows.cuda()
        qr = q.index_select(2, rows)
        if _maybe(impl, "rows", qr, k, v) != impl:
            pytest.skip(f"{impl} does not run here")
        with kernels.use(impl):
            got = kernels.rows_attention(qr, k, v, positions=rows, scale=s)
        pick = torch.randperm(rows.numel(), generator=g)[:24].cuda()
        with kernels.use("reference"):
            ref = kernels.rows_attention(qr.index_select(2, pick).float(), k.float(), v.float(), positions=rows[pick], scale=s)
        _close(f"rows any order {impl} R={rows.numel()}", (got.out.index_select(2, pick), got.lse.index_select(2, pick)), ref)
