"""The hip backend: its selection against an independent reference, pattern properties, Triton paths.

The backend x corrector matrix (tests/test_properties.py) already checks hip's output against a
float64 reference of its keep-mask and its cost against the mask. Here: the selection against an
independent loop-by-loop re-implementation (tests/hip_ref.py) for the torch scorer and, under
``TRITON_INTERPRET=1`` and on a GPU, for the Triton scorer; the pattern's properties; the
group-shared selection (``share_kv=True``) through the float64 reference.
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
from sparsekit.backends.hip import HiP, parse_stages, select

from hip_ref import hip_select64
from ref64 import attention64, causal_mask
from strategies import BACKEND_OPTIONS


def as_lists(sel):
    """Selection blocks -> list [B][head][qblock] of ascending ids."""
    b = sel.blocks.cpu().tolist()
    return [[[[x for x in row if x >= 0] for row in head] for head in bb] for bb in b]


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
@given(p=hip_problem(max_n=200))
def test_selection_equals_the_independent_reference(p):
    """The torch scorer selects exactly the blocks of the loop-by-loop reference (float64, ties to the
    earlier chunk / block), for every stage layout, sharing mode, offset and GQA ratio drawn."""
    hip, q, k, v, off = p
    got = as_lists(select(hip, q, k, off, scorer="torch"))
    assert got == hip_select64(hip, q, k, off)


@settings(max_examples=40)
@given(p=hip_problem())
def test_pattern_is_causal_and_holds_sink_window_and_diagonal(p):
    hip, q, k, v, off = p
    Nq, Nk = q.shape[2], k.shape[2]
    mask = hip.mask(q, k, q_offset=off)
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
    # the budget is always filled when the candidates allow: the plan's exact cost equals the bound
    per_head = mask.sum(dim=(-1, -2)).double().mean().item()
    assert float(SparseAttention(hip).plan(q, k, q_offset=off).cost().backend_pairs) == per_head
    assert hip.cost_bound(Nq, Nk, off) == per_head
    # selected blocks: ascending, distinct, inside [sink, window)
    sel = select(hip, q, k, off)
    blocks = sel.blocks.long()
    valid = blocks >= 0
    assert (valid.sum(-1) <= hip.n_select).all()
    lo = sel.sink_end // hip.block_k
    hi = (sel.win_start // hip.block_k)[None, None, :, None]
    assert ((blocks >= lo) & (blocks < hi))[valid].all(), "a selected block outside [sink, window)"
    srt = torch.where(valid, blocks, torch.full_like(blocks, 1 << 40))
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
    assert torch.equal(full.mask(q, k, q_offset=off), causal_mask(q.shape[2], Nk, off).expand(q.shape[:2] + (-1, -1)))
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
    mask = hip.mask(q, k, q_offset=off)
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
    sel = select(hip, q, k, 0)
    checked = 0
    for qb in range(sel.blocks.shape[2]):
        if sel.win_start[qb] > 352:  # the block holding key 333 is a candidate
            assert (sel.blocks[0, :, qb] == 20).any(dim=-1).all(), f"query block {qb} missed the planted key"
            checked += 1
    assert checked >= 15, f"only {checked} query blocks had the planted key as a candidate"  # 18 of 32


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
    sys.path.insert(0, sys.argv[1])
    import torch
    from sparsekit.backends.hip import HiP, select
    from sparsekit.executor import execute
    from hip_ref import hip_select64
    torch.manual_seed(0)
    bad = []
    for dt, share, stages, off in [(torch.float32, True, "64:128", 24), (torch.float16, False, "", 0)]:
        hip = HiP(k=32, block_q=16, block_k=16, stages=stages, q_stride=4, sink=20, window=24, share_kv=share)
        q = torch.randn(1, 2, 112, 16).to(dt)
        k = torch.randn(1, 1, 112 + off, 16).to(dt)
        v = torch.randn_like(k)
        st = select(hip, q, k, off, scorer="triton")
        got = [[[[x for x in r if x >= 0] for r in h] for h in b] for b in st.blocks.tolist()]
        if got != hip_select64(hip, q, k, off):
            bad.append(f"{dt} Triton selection differs from the independent reference")
        pat = hip.pattern_from(select(hip, q, k, off, scorer="torch"), q, k, off)
        rt = execute(pat, q, k, v, scale=0.25, impl="triton_blocks")
        rr = execute(pat, q, k, v, scale=0.25, impl="reference")
        tol = 1e-5 if dt == torch.float32 else 2e-3
        err = (rt.out.float() - rr.out.float()).abs().max().item()
        lerr = (rt.lse - rr.lse).abs().max().item()
        if not (err <= tol and lerr <= 1e-4) or rt.out.dtype != dt:
            bad.append(f"{dt} out err {err:.2e} lse err {lerr:.2e}")
    print("BAD" if bad else "OK", bad)
    sys.exit(1 if bad else 0)
    """
)


def test_triton_paths_under_interpreter():
    """The Triton scorer against the independent reference, and the attention of the resulting
    pattern through the executor's Triton kernel against the reference implementation."""
    pytest.importorskip("triton")
    env = dict(os.environ, TRITON_INTERPRET="1")
    here = os.path.dirname(os.path.abspath(__file__))
    r = subprocess.run([sys.executable, "-c", _INTERP, here], env=env, capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-4000:]


def test_fa3_paged_requests_reproduce_hip_patterns():
    """HiP's lists through the float64 model of FlashInfer's paged prefill (tests/fa3_sim.py): the
    packed GQA request layout (shared selection) and the per-head layout give attention over exactly
    the pattern."""
    from fa3_sim import run_paged

    torch.manual_seed(3)
    for share, (B, Hq, Hkv, Nq, off) in [(True, (1, 4, 2, 150, 0)), (False, (2, 4, 2, 97, 13)), (True, (1, 2, 2, 70, 5))]:
        hip = HiP(k=32, block_q=16, block_k=8, stages="", q_stride=2, sink=12, window=20, share_kv=share)
        q = torch.randn(B, Hq, Nq, 8, dtype=torch.float64)
        k = torch.randn(B, Hkv, Nq + off, 8, dtype=torch.float64)
        v = torch.randn(B, Hkv, Nq + off, 8, dtype=torch.float64)
        pat = hip.pattern(q, k, scale=0.3, q_offset=off)
        out, lse = run_paged(pat, q, k, v, 0.3)
        eo, el = attention64(q, k, v, pat.expand(pat.mask()), 0.3)
        assert torch.allclose(out, eo, atol=1e-10) and torch.allclose(lse, el, atol=1e-6)


# ------------------------------------------------------------------ GPU: Triton scorer and kernels
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
    """fp32 inputs: the Triton scorer selects the blocks the torch reference selects."""
    q, k, v = _gpu_inputs(*shape, torch.float32)
    off = shape[4]
    hip = _small_hip(share)
    sg = select(hip, q, k, off, scorer="triton")
    dev = "cpu" if shape[3] <= 3000 else "cuda"  # the same torch code; large shapes stay on the GPU
    sc = select(hip, q.to(dev), k.to(dev), off, scorer="torch")
    assert sg.blocks.shape == sc.blocks.shape
    assert torch.equal((sg.blocks >= 0).sum(-1).cpu(), (sc.blocks >= 0).sum(-1).cpu())
    if sg.blocks.numel():
        same = (sg.blocks.cpu() == sc.blocks.cpu()).float().mean().item()
        assert same >= 0.999, f"only {same:.4f} of the selected blocks agree"


@pytest.mark.gpu
@pytest.mark.parametrize("impl", ["fa3_paged", "triton_blocks"])
@pytest.mark.parametrize("dtype", [torch.bfloat16])
@pytest.mark.parametrize("share", [True, False])
@pytest.mark.parametrize("shape", GPU_SHAPES)
def test_gpu_attention_matches_reference(shape, share, dtype, impl):
    """Same pattern: each CUDA implementation vs the reference in float32 of the same inputs."""
    from sparsekit.executor import execute

    if impl == "fa3_paged":
        pytest.importorskip("flashinfer")
    q, k, v = _gpu_inputs(*shape, dtype, seed=1)
    off = shape[4]
    hip = _small_hip(share)
    scale = shape[5] ** -0.5
    if impl == "fa3_paged":  # fa3_paged refuses 64-row query blocks (Triton is faster there): use 128
        hip = HiP(**{**hip.options(), "block_q": 128})
    pat = hip.pattern(q, k, scale=scale, q_offset=off)
    try:
        got = execute(pat, q, k, v, scale=scale, impl=impl)
    except RuntimeError as exc:  # e.g. an fa3 module not built for this dtype / head_dim
        pytest.skip(str(exc)[:200])
    ref = execute(pat, q.float(), k.float(), v.float(), scale=scale, impl="reference")
    assert got.out.dtype == dtype and got.lse.dtype == torch.float32
    rel = ((got.out.float() - ref.out).abs().max() / ref.out.abs().max()).item()
    assert rel <= 1e-2, f"relative error {rel:.2e}"
    assert (got.lse - ref.lse).abs().max().item() <= 1e-3 * max(1.0, ref.lse.abs().max().item())
