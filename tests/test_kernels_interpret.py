"""The Triton kernels on CPU under ``TRITON_INTERPRET=1`` at small sizes (fp32 / fp16).

The interpreter must be switched on before triton is imported, so each group of checks runs
this file as a script in a child process with the variable set; the pytest process itself
never imports triton. Skipped cleanly when triton is not installed. (bf16 ``tl.dot`` is wrong
in the interpreter, so bf16 is covered by tests/test_gpu.py on a GPU only.)
"""

from __future__ import annotations

import importlib.util
import os
import subprocess
import sys

import pytest

HERE = os.path.dirname(os.path.abspath(__file__))

pytestmark = pytest.mark.skipif(importlib.util.find_spec("triton") is None, reason="needs triton (pip install sparsekit-prefill[triton])")


def _run(group: str):
    env = dict(os.environ, TRITON_INTERPRET="1", OMP_NUM_THREADS="1")
    proc = subprocess.run(
        [sys.executable, os.path.abspath(__file__), group], env=env, capture_output=True, text=True, timeout=300
    )
    assert proc.returncode == 0, f"{group} failed:\n{proc.stdout}\n{proc.stderr[-4000:]}"
    assert f"OK {group}" in proc.stdout, proc.stdout


def test_streaming_and_dense_interpret():
    _run("streaming")


def test_rows_interpret():
    _run("rows")


def test_delta_apply_interpret():
    _run("delta")


def test_every_backends_patterns_through_the_triton_implementations():
    """Every registered backend (the third-party plug-in included) over drawn shapes: each Triton
    implementation that accepts its pattern agrees with the reference implementation."""
    _run("patterns")


def test_meancorr_kernel_interpret():
    """meancorr's Triton kernel against its torch path on every backend's pattern (the plug-in too):
    fp32 / fp16, batch > 1, GQA, q_offset > 0, block_shift, nk % M != 0, shared / per-head groups,
    mean blocks smaller / larger than the key blocks; and the corrected pipeline picks the kernel."""
    _run("meancorr")


def test_request_split_uses_each_requests_smallest_position():
    import torch

    from sparsekit.kernels.fa3 import request_split

    starts, lengths, p0 = request_split(torch.tensor([5, 3, 9, 1, 7, 2, 8]), 3)
    assert starts.tolist() == [0, 3, 6] and lengths.tolist() == [3, 3, 1] and p0.tolist() == [3, 1, 8]


# ---------------------------------------------------------------- the child process
def _tol(dtype):
    import torch

    return (2e-5, 2e-5) if dtype == torch.float32 else (3e-3, 1e-3)  # (out relative, lse absolute)


def _check(name, out, lse, ref, dtype):
    import torch

    ot, lt = _tol(dtype)
    scale = ref.out.abs().max().clamp(min=1e-6)
    err = ((out.float() - ref.out.float()).abs().max() / scale).item()
    fin = torch.isfinite(ref.lse)
    if not torch.equal(fin, torch.isfinite(lse)):
        raise AssertionError(f"{name}: empty rows differ")
    lerr = (lse[fin] - ref.lse[fin]).abs().max().item() if fin.any() else 0.0
    if not (err <= ot and lerr <= lt):
        raise AssertionError(f"{name}: out rel err {err:.2e} (tol {ot}), lse err {lerr:.2e} (tol {lt})")


def _shapes(rng):
    # (B, Hq, Hkv, Nq, extra keys, D)
    return [
        (1, 1, 1, 1, 0, 16),
        (2, 4, 1, 37, 3, 32),
        (1, 4, 4, 50, 0, 16),
        (2, 8, 2, 23, 11, 16),
    ]


def _streaming():
    import torch

    from sparsekit.backends.dense import Dense
    from sparsekit.backends.streaming import Streaming
    from sparsekit.kernels.triton_band import interval_attention

    g = torch.Generator().manual_seed(0)
    for dtype in (torch.float32, torch.float16):
        for B, Hq, Hkv, Nq, extra, D in _shapes(None):
            Nk = Nq + extra
            q = torch.randn(B, Hq, Nq, D, generator=g).to(dtype)
            k = torch.randn(B, Hkv, Nk, D, generator=g).to(dtype)
            v = torch.randn(B, Hkv, Nk, D, generator=g).to(dtype)
            s = D**-0.5
            for window, sink in ((1, 0), (7, 3), (5, 0), (64, 2), (3, 40)):
                be = Streaming(window=window, sink=sink)
                ref = be.prefill(q.double(), k.double(), v.double(), scale=s, q_offset=extra)
                out, lse = interval_attention(q, k, v, scale=s, q_offset=extra, window=window, sink=sink)
                _check(f"streaming{(B, Hq, Hkv, Nq, Nk, D, window, sink, dtype)}", out, lse, ref, dtype)
            ref = Dense().prefill(q.double(), k.double(), v.double(), scale=s, q_offset=extra)
            out, lse = interval_attention(q, k, v, scale=s, q_offset=extra)
            _check(f"dense{(B, Hq, Hkv, Nq, Nk, D, dtype)}", out, lse, ref, dtype)


def _rows():
    import torch

    from sparsekit.contract import AttentionResult
    from sparsekit.kernels.triton_band import interval_attention
    from sparsekit.reference import attend_keys, causal_rows_attention

    g = torch.Generator().manual_seed(1)
    for dtype in (torch.float32, torch.float16):
        for B, Hq, Hkv, Nq, extra, D in _shapes(None):
            Nk = Nq + extra
            R = max(1, Nq // 3)
            pos = torch.sort(torch.randperm(Nk, generator=g)[:R]).values
            q = torch.randn(B, Hq, R, D, generator=g).to(dtype)
            k = torch.randn(B, Hkv, Nk, D, generator=g).to(dtype)
            v = torch.randn(B, Hkv, Nk, D, generator=g).to(dtype)
            s = D**-0.5
            ref = causal_rows_attention(q.double(), k.double(), v.double(), positions=pos, scale=s)
            out, lse = interval_attention(q, k, v, scale=s, positions=pos)
            _check(f"rows{(B, Hq, Hkv, R, Nk, D, dtype)}", out, lse, ref, dtype)
            # per-row lower bound (the paged path's triangle), some rows empty
            lo = torch.clamp(pos - torch.randint(-2, 6, (R,), generator=g), min=0)
            key = torch.arange(Nk)
            keep = (key[None, :] <= pos[:, None]) & (key[None, :] >= lo[:, None])
            o_ref, l_ref = attend_keys(q.double(), k.double(), v.double(), s, key, keep)
            out, lse = interval_attention(q, k, v, scale=s, positions=pos, lo=lo)
            _check(f"rows-lo{(B, Hq, Hkv, R, Nk, D, dtype)}", out, lse, AttentionResult(o_ref, l_ref), dtype)


def _delta():
    import torch

    from sparsekit.contract import AttentionResult
    from sparsekit.correctors.delta import Delta
    from sparsekit.kernels.triton_delta import delta_apply

    g = torch.Generator().manual_seed(2)
    for dtype in (torch.float32, torch.float16):
        for N, gamma, tail in ((200, 16, None), (50, 64, None), (77, 8, 5), (33, 4, 0), (130, 16, 3)):
            for interp in ("repeat", "linear"):
                corr = Delta(gamma=gamma, tail=tail, interpolation=interp)
                plan = corr.rows(N)
                rows = plan.dense_rows()
                B, H, D = 2, 3, 16
                sparse = AttentionResult(
                    torch.randn(B, H, N, D, generator=g).to(dtype), torch.randn(B, H, N, generator=g)
                )
                dense = AttentionResult(
                    torch.randn(B, H, rows.numel(), D, generator=g).to(dtype),
                    torch.randn(B, H, rows.numel(), generator=g),
                )
                if plan.n_body == 0:
                    continue
                if plan.n_blocks > 1 and interp == "repeat":  # a non-finite anchor: its Δ counts as zero
                    sparse.out[0, 1, gamma] = float("nan")
                ref = corr.combine(plan, sparse, dense)
                if not torch.isfinite(ref.out).all():
                    raise AssertionError("delta: a NaN anchor spread in the torch path")
                out, lse = delta_apply(
                    sparse.out, sparse.lse, dense.out, dense.lse, gamma=gamma, n_body=plan.n_body,
                    linear=interp == "linear",
                )
                _check(f"delta{(N, gamma, tail, interp, dtype)}", out, lse, ref, dtype)
                # anchors and tail are the dense rows exactly
                if not torch.equal(out[:, :, rows], dense.out):
                    raise AssertionError("delta: anchor / tail rows are not the dense rows")
                # in place on the sparse buffers gives the same result
                so, sl = sparse.out.clone(), sparse.lse.clone()
                delta_apply(so, sl, dense.out, dense.lse, gamma=gamma, n_body=plan.n_body,
                            linear=interp == "linear", out=so, out_lse=sl)
                if not (torch.equal(so, out) and torch.equal(sl, lse)):
                    raise AssertionError("delta: in-place result differs")


def _patterns():
    import random

    import torch

    import sparsekit
    from sparsekit import SparseAttention
    from sparsekit.executor import choose, execute

    sys.path.insert(0, os.path.join(HERE, "plugin_pkg"))
    from sparsekit_toy import Strided

    sparsekit.register_backend("strided", Strided)
    options = {
        "dense": [{}],
        "streaming": [{"window": 7, "sink": 3}, {"window": 40, "sink": 0}, {"window": 1, "sink": 9}],
        "hip": [dict(k=32, block_q=16, block_k=16, stages="", q_stride=2, sink=16, window=16, share_kv=s)
                for s in (True, False)] + [dict(k=16, block_q=16, block_k=8, stages="32:64", q_stride=4, sink=5,
                                               window=9, share_kv=True)],
        "vertical_slash": [dict(vertical_size=9, slash_size=6, last_q=16, sink=2, local=3, block_q=16, block_k=16),
                           dict(vertical_size=4, slash_size=3, last_q=8, sink=0, local=1, block_q=32, block_k=16)],
        "strided": [dict(block_q=16, block_k=16, local=2, stride=3), dict(block_q=32, block_k=16, local=1, stride=5)],
    }
    rng = random.Random(0)
    g = torch.Generator().manual_seed(3)
    ran = {}
    for name in sparsekit.available_backends():
        for opts in options.get(name, [{}]):
            for dtype in (torch.float32, torch.float16):
                B, Hkv, G = rng.choice([1, 2]), rng.choice([1, 2]), rng.choice([1, 2, 4])
                Nq, off = rng.randint(20, 90), rng.choice([0, 0, 13])
                q = torch.randn(B, Hkv * G, Nq, 16, generator=g).to(dtype)
                k = torch.randn(B, Hkv, Nq + off, 16, generator=g).to(dtype)
                v = torch.randn(B, Hkv, Nq + off, 16, generator=g).to(dtype)
                attn = SparseAttention(name, **opts)
                pat = attn.backend.pattern(q, k, scale=0.25, q_offset=off)
                ref = execute(pat, q.double(), k.double(), v.double(), scale=0.25, impl="reference")
                for impl in ("triton_band", "triton_blocks"):
                    try:
                        choose(pat, q, k, scale=0.25, impl=impl)
                    except RuntimeError:
                        continue  # this implementation refuses the pattern (e.g. the band kernel and block lists)
                    res = execute(pat, q, k, v, scale=0.25, impl=impl)
                    _check(f"{name}{opts}{(B, Hkv, G, Nq, off, dtype)} {impl}", res.out, res.lse, ref, dtype)
                    ran[impl] = ran.get(impl, 0) + 1
    if ran.get("triton_blocks", 0) < 20 or ran.get("triton_band", 0) < 6:
        raise AssertionError(f"too few checks ran: {ran}")


def _meancorr():
    import random
    import time

    import torch

    import sparsekit
    from sparsekit import SparseAttention, kernels
    from sparsekit.contract import AttentionResult
    from sparsekit.correctors.meancorr import MeanCorr, complement_torch, corrected_blocks
    from sparsekit.kernels.triton_meancorr import mean_complement

    sys.path.insert(0, os.path.join(HERE, "plugin_pkg"))
    from sparsekit_toy import Strided

    sparsekit.register_backend("strided", Strided)
    options = {
        "dense": [{}],
        "streaming": [{"window": 7, "sink": 3}, {"window": 40, "sink": 0}, {"window": 1, "sink": 9}],
        "hip": [dict(k=16, block_q=16, block_k=8, stages="", q_stride=2, sink=5, window=9, share_kv=s)
                for s in (True, False)],
        # block_q 16 with q_offset 13 / 21: a shifted query-block grid (block_shift = q_offset % 16)
        "vertical_slash": [dict(vertical_size=9, slash_size=6, last_q=16, sink=2, local=3, block_q=16, block_k=8),
                           dict(vertical_size=4, slash_size=3, last_q=8, sink=0, local=1, block_q=32, block_k=16)],
        "strided": [dict(block_q=16, block_k=8, local=1, stride=3), dict(block_q=32, block_k=16, local=2, stride=5)],
    }
    blocks = [None, 5, 12, 24]  # the pattern's block_k, odd sizes (rounded up for block lists), larger
    rng = random.Random(0)
    g = torch.Generator().manual_seed(5)
    ran = fixed = untouched = shifted = 0
    t0 = time.perf_counter()
    for name in sparsekit.available_backends():
        if name not in options:
            continue
        for opts in options[name]:
            for dtype in (torch.float32, torch.float16):
                B, Hkv, G = rng.choice([1, 2]), rng.choice([1, 2]), rng.choice([1, 2, 4])
                Nq, off = rng.randint(20, 90), rng.choice([0, 13, 21])
                q = torch.randn(B, Hkv * G, Nq, 16, generator=g).to(dtype)
                k = torch.randn(B, Hkv, Nq + off, 16, generator=g).to(dtype)
                v = torch.randn(B, Hkv, Nq + off, 16, generator=g).to(dtype)
                attn = SparseAttention(name, **opts)
                pat = attn.backend.pattern(q, k, scale=0.25, q_offset=off)
                shifted += pat.block_shift > 0
                base = attn.backend.prefill(q, k, v, scale=0.25, q_offset=off)
                for block in rng.sample(blocks, 2):
                    corr = MeanCorr(block=block)
                    M = corr.mean_block(pat)
                    ref = AttentionResult(base.out.clone(), base.lse.clone())
                    got = AttentionResult(base.out.clone(), base.lse.clone())
                    if corr.path(pat, got, q, k)[0] != "triton":
                        raise AssertionError(f"meancorr: no Triton path: {corr.path(pat, got, q, k)}")
                    complement_torch(pat, ref, q, k, v, scale=0.25, block=M)
                    mean_complement(pat, got.out, got.lse, q, k, v, scale=0.25, block=M)
                    label = f"meancorr {name}{opts} block={block} M={M}{(B, Hkv, G, Nq, off, dtype)}"
                    _check(label, got.out, got.lse, ref, dtype)
                    changed = pat.expand(corrected_blocks(pat, M, 0, Nq)).any(-1)  # rows with a corrected block
                    # rows without a corrected block are untouched, bit for bit
                    if not (torch.equal(got.out[~changed], base.out[~changed])
                            and torch.equal(got.lse[~changed], base.lse[~changed])):
                        raise AssertionError(f"{label}: a row without a corrected block changed")
                    ran += 1
                    fixed += int(changed.sum())
                    untouched += int((~changed).sum())
    t_short = time.perf_counter() - t0
    # longer rows: several summary-key tiles per program and list segments longer than one pointer chunk
    for name, opts, block in (("strided", dict(block_q=64, block_k=4, local=2, stride=3), None),
                              ("strided", dict(block_q=32, block_k=4, local=1, stride=2), 8),
                              ("vertical_slash", dict(vertical_size=30, slash_size=20, last_q=16, sink=3, local=2,
                                                      block_q=32, block_k=4), 4)):
        q = torch.randn(1, 2, 200, 16, generator=g)
        k = torch.randn(1, 1, 207, 16, generator=g)
        v = torch.randn(1, 1, 207, 16, generator=g)
        attn = SparseAttention(name, **opts)
        pat = attn.backend.pattern(q, k, scale=0.25, q_offset=7)
        seg_len = int((pat.block_indptr[1:] - pat.block_indptr[:-1]).max())
        base = attn.backend.prefill(q, k, v, scale=0.25, q_offset=7)
        corr = MeanCorr(block=block)
        M = corr.mean_block(pat)
        ref = AttentionResult(base.out.clone(), base.lse.clone())
        got = AttentionResult(base.out.clone(), base.lse.clone())
        complement_torch(pat, ref, q, k, v, scale=0.25, block=M)
        mean_complement(pat, got.out, got.lse, q, k, v, scale=0.25, block=M)
        _check(f"meancorr long {name}{opts} M={M} (longest list {seg_len})", got.out, got.lse, ref, torch.float32)
        if seg_len <= 16 or 207 // M <= 16:  # BLOCK_J and BLOCK_L are 16 under the interpreter
            raise AssertionError(f"meancorr long {name}: lists of {seg_len}, {207 // M} mean blocks: too short")
        fixed += int(pat.expand(corrected_blocks(pat, M, 0, 200)).any(-1).sum())
    t_long = time.perf_counter() - t0 - t_short
    # the whole pipeline picks the kernel on CPU under the interpreter; torch when triton is excluded
    q = torch.randn(2, 4, 150, 16, generator=g)
    k = torch.randn(2, 2, 157, 16, generator=g)
    v = torch.randn(2, 2, 157, 16, generator=g)
    for spec in ("streaming(window=16,sink=4)+meancorr(gamma=16,block=8)",
                 "strided(block_q=16,block_k=8,local=1,stride=4)+meancorr(gamma=8,tail=20)"):
        attn = SparseAttention.from_string(spec)
        plan = attn.plan(q, k)
        if attn.corrector.path(plan.pattern, AttentionResult(q, q[..., 0]), q, k)[0] != "triton":
            raise AssertionError(f"{spec}: the pipeline does not pick the Triton path")
        got = attn.run(plan, q, k, v)
        with kernels.use("reference"):
            ref = attn.forward(q, k, v)
        _check(spec, got.out, got.lse, ref, torch.float32)
    print(f"meancorr: {ran} runs, {fixed} corrected rows, {untouched} untouched, {shifted} shifted grids "
          f"({t_short:.1f} s, {t_long:.1f} s, {time.perf_counter() - t0 - t_short - t_long:.1f} s)")
    if ran < 40 or fixed < 2000 or untouched < 2000 or shifted < 2:
        raise AssertionError(f"too few checks ran: {ran} runs, {fixed} corrected rows, {untouched} untouched, "
                             f"{shifted} shifted grids")


if __name__ == "__main__":
    group = sys.argv[1]
    import torch

    torch.set_num_threads(1)
    {"streaming": _streaming, "rows": _rows, "delta": _delta, "patterns": _patterns, "meancorr": _meancorr}[group]()
    print(f"OK {group}")
