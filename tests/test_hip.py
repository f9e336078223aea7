"""The hip backend: selection properties, CPU semantics, Triton kernels (interpreter and GPU).

The backend x corrector matrix (tests/test_properties.py) already checks hip's output against a
float64 reference of ``pattern`` and ``cost`` against the pattern, with per-head selection.
Here: the properties of the selection itself, the group-shared selection (``share_kv=True``)
through the same float64 reference, the Triton kernels under ``TRITON_INTERPRET=1`` (fp32/fp16,
in a subprocess so the variable is set before triton is imported), and on a GPU the kernels
against the torch reference (same selection, same output within bf16 tolerance).
"""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap

import pytest
import torch
from hypothesis import given, settings, strategies as st

from sparsekit import SparseAttention
from sparsekit.backends.hip import HiP, parse_stages

from ref64 import attention64, causal_mask
from strategies import BACKEND_OPTIONS


@st.composite
def hip_problem(draw, max_n=400):
    opts = draw(BACKEND_OPTIONS["hip"])
    opts["share_kv"] = draw(st.booleans())
    B = draw(st.integers(1, 2))
    Hkv = draw(st.integers(1, 2))
    G = draw(st.sampled_from([1, 2, 4]))
    Nq = draw(st.integers(1, max_n))
    off = draw(st.one_of(st.just(0), st.integers(1, 80)))
    D = draw(st.sampled_from([8, 16, 32]))
    g = torch.Generator().manual_seed(draw(st.integers(0, 2**31 - 1)))
    q = torch.randn(B, Hkv * G, Nq, D, generator=g, dtype=torch.float64)
    k = torch.randn(B, Hkv, Nq + off, D, generator=g, dtype=torch.float64)
    v = torch.randn(B, Hkv, Nq + off, D, generator=g, dtype=torch.float64)
    return HiP(**opts), q, k, v, off


@settings(max_examples=40)
@given(p=hip_problem())
def test_selection_is_causal_and_holds_sink_window_and_diagonal(p):
    hip, q, k, v, off = p
    Nq, Nk = q.shape[2], k.shape[2]
    mask = hip.pattern(q, k, q_offset=off)
    causal = causal_mask(Nq, Nk, off)
    assert mask.shape == (q.shape[0], q.shape[1], Nq, Nk)
    assert not (mask & ~causal).any(), "selects a future key"
    pos = off + torch.arange(Nq)
    j = torch.arange(Nk)
    sink = (j[None, :] < hip.sink) & causal
    window = (j[None, :] > pos[:, None] - hip.window) & causal
    assert (mask | ~sink).all(), "misses a sink key"
    assert (mask | ~window).all(), "misses a window key"
    assert mask[..., torch.arange(Nq), pos].all(), "misses the diagonal"
    # the budget: every row sees sink + window + min(k, candidates); cost counts it exactly
    per_head = mask.sum(dim=(-1, -2)).double().mean().item()
    assert hip.cost(Nq, Nk, off) == per_head
    # rows of one query block share the selected blocks (beyond their own window)
    plan = hip.plan(q, k, q_offset=off)
    assert (plan.counts <= hip.n_select).all()
    sel = plan.blocks.long()
    valid = sel >= 0
    lo = plan.sink_end // hip.block_k
    hi = (plan.win_start // hip.block_k)[None, None, :, None]
    assert ((sel >= lo) & (sel < hi))[valid].all(), "a selected block outside [sink, window)"
    srt = torch.where(valid, sel, torch.full_like(sel, 1 << 40))
    assert torch.equal(srt, srt.sort(-1).values), "blocks not ascending"
    assert (srt[..., 1:] != srt[..., :-1])[valid[..., 1:]].all(), "a block selected twice"


@settings(max_examples=30)
@given(p=hip_problem(max_n=300), extra=st.integers(0, 3))
def test_budget_covering_every_key_is_dense(p, extra):
    hip, q, k, v, off = p
    Nk = k.shape[2]
    full = HiP(k=(Nk // hip.block_k + 1 + extra) * hip.block_k, block_q=hip.block_q, block_k=hip.block_k,
               stages="", q_stride=hip.q_stride, sink=hip.sink, window=hip.window, share_kv=hip.share_kv)
    attn = SparseAttention(full)
    out, lse = attn(q, k, v, q_offset=off, return_lse=True)
    dense_out, dense_lse = SparseAttention("dense")(q, k, v, q_offset=off, return_lse=True)
    assert torch.equal(full.pattern(q, k, q_offset=off), causal_mask(q.shape[2], Nk, off).expand(q.shape[:2] + (-1, -1)))
    torch.testing.assert_close(out, dense_out, rtol=1e-9, atol=1e-9)
    torch.testing.assert_close(lse, dense_lse, rtol=2e-6, atol=1e-5)


@settings(max_examples=25)
@given(p=hip_problem(max_n=300), corrector=st.sampled_from([None, {"name": "delta", "gamma": 16}, "recompute"]))
def test_shared_group_selection_matches_float64_reference(p, corrector):
    """share_kv=True through the same float64 check as the matrix (which runs per-head selection)."""
    hip, q, k, v, off = p
    hip = HiP(**{**hip.options(), "share_kv": True})
    attn = SparseAttention(hip, corrector=corrector)
    out, lse = attn(q, k, v, q_offset=off, return_lse=True)
    scale = q.shape[-1] ** -0.5
    mask = hip.pattern(q, k, q_offset=off)
    # heads of one KV group share the blocks they select
    G = q.shape[1] // k.shape[1]
    m = mask.view(mask.shape[0], k.shape[1], G, *mask.shape[2:])
    assert (m == m[:, :, :1]).all(), "query heads of one group select different keys"
    if corrector is None:
        ref_out, ref_lse = attention64(q, k, v, mask, scale)
        torch.testing.assert_close(out, ref_out, rtol=1e-9, atol=1e-9)
        torch.testing.assert_close(lse.double(), ref_lse, rtol=2e-6, atol=1e-5)
    else:  # anchors and tail rows are dense whatever the backend selected
        dn_out, _ = attention64(q, k, v, causal_mask(q.shape[2], k.shape[2], off), scale)
        gamma = 16 if isinstance(corrector, dict) else 64
        n_tail = min(q.shape[2], q.shape[2] % gamma + max(128, gamma))
        rows = list(range(0, q.shape[2] - n_tail, gamma)) + list(range(q.shape[2] - n_tail, q.shape[2]))
        torch.testing.assert_close(out[:, :, rows], dn_out[:, :, rows], rtol=1e-9, atol=1e-9)


def test_selection_picks_the_heaviest_blocks():
    """A planted key that every query likes is found through the coarse stage."""
    torch.manual_seed(0)
    B, H, N, D = 1, 2, 1024, 32
    q = torch.randn(B, H, N, D) * 0.1
    k = torch.randn(B, H, N, D) * 0.1
    u = torch.randn(D)
    q += u
    k[:, :, 333] += 4 * u  # block 333 // 16 = 20, chunk (333 - 32) // 64 = 4
    hip = HiP(k=32, block_q=32, block_k=16, stages="64:128", q_stride=4, sink=32, window=64)
    plan = hip.plan(q, k, q_offset=0)
    starts = plan.win_start
    for qb in range(plan.n_qblocks):
        if starts[qb] > 352:  # the block holding key 333 is a candidate
            assert (plan.blocks[0, :, qb] == 20).any(dim=-1).all(), f"query block {qb} missed the planted key"


def test_options_are_validated():
    with pytest.raises(ValueError, match="multiple of block_k"):
        HiP(k=100, block_k=64)
    with pytest.raises(ValueError, match="at least"):
        HiP(k=2048, stages="256:2048")
    with pytest.raises(ValueError, match="divide"):
        HiP(stages="256:32768/192:8192", block_k=64)
    with pytest.raises(ValueError, match="chunk:keep"):
        HiP(stages="256")
    with pytest.raises(TypeError, match="share_kv"):
        HiP(share_kv=1)
    assert parse_stages("1024:65536/256:16384") == [(1024, 65536), (256, 16384)]
    assert parse_stages("") == []
    h = HiP()
    assert SparseAttention.from_string(str(h)).backend == h  # spec string round trip


# ------------------------------------------------------------------ Triton under the interpreter
_INTERP = textwrap.dedent(
    """
    import os, sys
    os.environ["TRITON_INTERPRET"] = "1"
    import torch
    from sparsekit.backends.hip import HiP
    torch.manual_seed(0)
    bad = []
    for dt, share, stages, off in [(torch.float32, True, "64:128", 24), (torch.float16, False, "", 0)]:
        hip = HiP(k=32, block_q=16, block_k=16, stages=stages, q_stride=4, sink=20, window=24, share_kv=share)
        q = torch.randn(1, 2, 112, 16).to(dt)
        k = torch.randn(1, 1, 112 + off, 16).to(dt)
        v = torch.randn_like(k)
        pt = hip.plan(q, k, q_offset=off, impl="triton")
        pr = hip.plan(q, k, q_offset=off, impl="torch")
        if not torch.equal(pt.blocks, pr.blocks) or not torch.equal(pt.counts, pr.counts):
            bad.append(f"{dt} selection differs")
        rt = hip.run(pr, q, k, v, scale=0.25, q_offset=off, impl="triton")
        rr = hip.run(pr, q, k, v, scale=0.25, q_offset=off, impl="torch")
        tol = 1e-5 if dt == torch.float32 else 2e-3
        err = (rt.out.float() - rr.out.float()).abs().max().item()
        lerr = (rt.lse - rr.lse).abs().max().item()
        if not (err <= tol and lerr <= 1e-4) or rt.out.dtype != dt:
            bad.append(f"{dt} out err {err:.2e} lse err {lerr:.2e}")
    print("BAD" if bad else "OK", bad)
    sys.exit(1 if bad else 0)
    """
)


def test_triton_kernels_under_interpreter():
    pytest.importorskip("triton")
    env = dict(os.environ, TRITON_INTERPRET="1")
    r = subprocess.run([sys.executable, "-c", _INTERP], env=env, capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-4000:]


# ------------------------------------------------------------------ GPU: kernels vs reference
GPU_SHAPES = [  # (B, Hq, Hkv, Nq, q_offset, D)
    (1, 4, 1, 37, 5, 64),
    (2, 8, 2, 1001, 0, 128),
    (1, 8, 8, 3000, 333, 64),
    (1, 32, 8, 8192, 0, 128),
]


def _gpu_inputs(B, Hq, Hkv, Nq, off, D, dtype, seed=0):
    g = torch.Generator(device="cuda").manual_seed(seed)
    q = torch.randn(B, Hq, Nq, D, device="cuda", generator=g).to(dtype)
    k = torch.randn(B, Hkv, Nq + off, D, device="cuda", generator=g).to(dtype)
    v = torch.randn(B, Hkv, Nq + off, D, device="cuda", generator=g).to(dtype)
    return q, k, v


def _small_hip(share):
    return HiP(k=512, block_q=64, block_k=64, stages="256:1024", q_stride=4, sink=128, window=256, share_kv=share)


@pytest.mark.gpu
@pytest.mark.parametrize("share", [True, False])
@pytest.mark.parametrize("shape", GPU_SHAPES)
def test_gpu_selection_matches_reference(shape, share):
    """fp32 inputs: the Triton scoring selects the blocks the CPU reference selects."""
    q, k, v = _gpu_inputs(*shape, torch.float32)
    off = shape[4]
    hip = _small_hip(share)
    pg = hip.plan(q, k, q_offset=off, impl="triton")
    dev = "cpu" if shape[3] <= 3000 else "cuda"  # the same torch code; large shapes stay on the GPU
    pc = hip.plan(q.to(dev), k.to(dev), q_offset=off, impl="torch")
    assert pg.blocks.shape == pc.blocks.shape
    assert torch.equal(pg.counts.cpu(), pc.counts.cpu())
    if pg.blocks.numel():
        same = (pg.blocks.cpu() == pc.blocks.cpu()).float().mean().item()
        assert same >= 0.999, f"only {same:.4f} of the selected blocks agree"


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("share", [True, False])
@pytest.mark.parametrize("shape", GPU_SHAPES)
def test_gpu_attention_matches_reference(shape, share, dtype):
    """Same plan, Triton block-sparse attention vs the reference in float32 of the same inputs."""
    q, k, v = _gpu_inputs(*shape, dtype, seed=1)
    off = shape[4]
    hip = _small_hip(share)
    plan = hip.plan(q, k, q_offset=off)
    scale = shape[5] ** -0.5
    got = hip.run(plan, q, k, v, scale=scale, q_offset=off)
    ref = hip.run(plan, q.float(), k.float(), v.float(), scale=scale, q_offset=off, impl="torch")
    assert got.out.dtype == dtype and got.lse.dtype == torch.float32
    rel = ((got.out.float() - ref.out).abs().max() / ref.out.abs().max()).item()
    assert rel <= 1e-2, f"relative error {rel:.2e}"
    assert (got.lse - ref.lse).abs().max().item() <= 1e-3 * max(1.0, ref.lse.abs().max().item())
