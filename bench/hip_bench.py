"""HiP on a GPU: fidelity on structured synthetic data and timing against dense, in one process.

    python bench/hip_bench.py --out DIR [--n 32K,128K,1M] [--fidelity-n 32K]

Writes DIR/hip_bench.json and DIR/hip_bench.md. Timing: B=1, Hq=32, Hkv=8, D=128, bf16, random
inputs (the kernels' work does not depend on the values); dense = FlashInfer fa3 when importable,
else SDPA cuDNN, in the same process. ms = median of CUDA-event timings after a warm-up call
(one timed call at N >= 512K, after the kernels ran at smaller N). ``plan`` = the selection,
``run`` = attention over it, ``hip`` = plan + run as one prefill call, ``hip+Δ`` = the whole
``SparseAttention(HiP(), corrector=Delta(gamma=64))`` call.

Fidelity: structured synthetic q/k/v (topic segments, retrieval queries, RoPE, a sink), Hq=8,
Hkv=2, D=128 bf16. recall@K = fraction of each sampled row's exact top-K keys that its pattern
holds; mass = softmax probability mass of the row's pattern; cos = mean cosine of every output
row to dense attention.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import sys
import time

import torch

from sparsekit import SparseAttention
from sparsekit.backends.hip import HiP
from sparsekit.correctors.delta import Delta
from sparsekit.bench import _ints  # "32K,128K,1M" -> ints


def _label(n):
    return f"{n // (1024 * 1024)}M" if n % (1024 * 1024) == 0 else f"{n // 1024}K"


def cuda_ms(fn, reps):
    """(first_ms, median_ms) with CUDA events."""
    torch.cuda.synchronize()
    t0 = time.perf_counter()
    fn()
    torch.cuda.synchronize()
    first = (time.perf_counter() - t0) * 1e3
    ts = []
    for _ in range(reps):
        a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        a.record()
        fn()
        b.record()
        torch.cuda.synchronize()
        ts.append(a.elapsed_time(b))
    ts.sort()
    return first, (ts[len(ts) // 2] if ts else first)


# ------------------------------------------------------------------------ structured synthetic data
def rope(x, theta=500000.0):
    N, D = x.shape[-2], x.shape[-1]
    inv = theta ** (-torch.arange(0, D, 2, device=x.device, dtype=torch.float32) / D)
    ang = torch.arange(N, device=x.device, dtype=torch.float32)[:, None] * inv[None, :]
    cos, sin = ang.cos(), ang.sin()
    x1, x2 = x[..., : D // 2], x[..., D // 2 :]
    return torch.cat([x1 * cos - x2 * sin, x1 * sin + x2 * cos], dim=-1)


def synthetic(N, Hq=8, Hkv=2, D=128, seed=0, dtype=torch.bfloat16):
    """Topic segments + retrieval queries + RoPE + an attention sink. q [1,Hq,N,D], k/v [1,Hkv,N,D]."""
    g = torch.Generator(device="cuda").manual_seed(seed)
    dev = "cuda"
    G = Hq // Hkv
    n_topics = 256
    topics = torch.randn(Hkv, n_topics, D, device=dev, generator=g)
    topics = topics / topics.norm(dim=-1, keepdim=True) * math.sqrt(D)
    seg_len = torch.randint(64, 1024, (N // 64 + 1,), generator=torch.Generator().manual_seed(seed))
    seg_of = torch.repeat_interleave(torch.arange(len(seg_len)), seg_len)[:N].to(dev)
    topic_of_seg = torch.randint(0, n_topics, (len(seg_len),), device=dev, generator=g)
    z = topic_of_seg[seg_of]  # [N]
    k = 0.5 * torch.randn(Hkv, N, D, device=dev, generator=g) + 0.8 * topics[torch.arange(Hkv, device=dev)[:, None], z[None, :]]
    # queries: in spans of 128 rows (local coherence, as in text), half ask about their own
    # segment's topic, half about the topic of one earlier segment
    span = torch.arange(N, device=dev) // 128
    n_span = int(span[-1]) + 1
    u_back = torch.rand(n_span, device=dev, generator=g)[span]
    back = (u_back * (seg_of.float() + 1)).long().clamp(max=len(seg_len) - 1)
    earlier = (torch.rand(n_span, device=dev, generator=g) < 0.5)[span]
    zq = torch.where(earlier, topic_of_seg[back], z)
    qs = []
    for h in range(Hq):
        kv = h // G
        qs.append(0.5 * torch.randn(N, D, device=dev, generator=g) + 0.8 * topics[kv, zq])
    q = torch.stack(qs)
    k = rope(k)
    q = rope(q)
    k[:, :4] += 0.2 * q.view(Hkv, G, N, D).mean(dim=(1, 2))[:, None]  # sink keys that every query likes
    v = torch.randn(Hkv, N, D, device=dev, generator=g)
    return q[None].to(dtype), k[None].to(dtype), v[None].to(dtype)


def dense_out(q, k, v, scale):
    from torch.nn.attention import SDPBackend, sdpa_kernel

    with sdpa_kernel([SDPBackend.FLASH_ATTENTION, SDPBackend.CUDNN_ATTENTION]):
        G = q.shape[1] // k.shape[1]
        return torch.nn.functional.scaled_dot_product_attention(
            q, k.repeat_interleave(G, 1), v.repeat_interleave(G, 1), is_causal=True, scale=scale)


def fidelity(N, rows=96, seed=0):
    q, k, v = synthetic(N, seed=seed)
    B, Hq, _, D = q.shape
    scale = D ** -0.5
    ref = dense_out(q, k, v, scale).float()
    gen = torch.Generator().manual_seed(seed + 1)
    sample = torch.sort(torch.randint(N // 4, N, (rows,), generator=gen)).values.cuda()
    G = Hq // k.shape[1]
    kr = k.float().repeat_interleave(G, 1)
    s = torch.einsum("bhrd,bhnd->bhrn", q.float()[:, :, sample], kr) * scale  # [1,Hq,R,N]
    causal = torch.arange(N, device="cuda")[None, :] <= sample[:, None]
    s = s.masked_fill(~causal, float("-inf"))
    p = torch.softmax(s, -1)
    tops = {K: s.topk(K, -1).indices for K in (64, 2048)}
    results = []
    configs = [
        ("hip (default: share_kv, 256:16384)", HiP()),
        ("hip share_kv=False", HiP(share_kv=False)),
        ("hip stages=256:32768", HiP(stages="256:32768")),
        ("hip stages='' (exact score of every block)", HiP(stages="")),
    ]
    for label, hip in configs:
        plan = hip.plan(q, k, q_offset=0)
        # pattern rows of the sampled queries
        dev = q.device
        qb = sample // hip.block_q
        table = plan.block_table()  # [B, Hs, NBq, NKb]
        j = torch.arange(N, device=dev)
        W = torch.clamp(plan.win_start[qb], min=plan.sink_end)
        dense_part = (j[None, :] < plan.sink_end) | (j[None, :] >= W[:, None])
        sel = table[:, :, qb][..., j // hip.block_k].repeat_interleave(plan.heads_per_sel, 1)
        keep = causal & (dense_part | sel)
        rec = {K: keep.gather(-1, idx).float().mean().item() for K, idx in tops.items()}
        mass = (p * keep).sum(-1).mean().item()
        outs = {}
        for cname, corr in (("", None), ("+Δ(γ=64)", Delta(gamma=64))):
            o = SparseAttention(hip, corrector=corr)(q, k, v).float()
            outs[cname] = torch.nn.functional.cosine_similarity(o, ref, dim=-1).mean().item()
        results.append(dict(config=label, spec=str(hip), recall64=rec[64], recall2048=rec[2048], mass=mass,
                            cos=outs[""], cos_delta=outs["+Δ(γ=64)"], pairs_per_row=hip.cost(N, N, 0) / N))
        print(f"[fidelity N={N}] {label}: recall@64 {rec[64]:.3f} recall@2048 {rec[2048]:.3f} mass {mass:.3f} "
              f"cos {outs['']:.4f} cos+Δ {outs['+Δ(γ=64)']:.4f}", flush=True)
    from sparsekit.backends.streaming import Streaming

    for corr_label, corr in (("", None), ("+Δ(γ=64)", Delta(gamma=64))):
        o = SparseAttention(Streaming(window=2048, sink=1024), corrector=corr)(q, k, v).float()
        c = torch.nn.functional.cosine_similarity(o, ref, dim=-1).mean().item()
        results.append(dict(config=f"streaming(window=2048,sink=1024){corr_label}", cos=c))
        print(f"[fidelity N={N}] streaming{corr_label}: cos {c:.4f}", flush=True)
    return results


# ------------------------------------------------------------------------ timing
def timing(N, reps):
    torch.manual_seed(0)
    B, Hq, Hkv, D = 1, 32, 8, 128
    q = torch.randn(B, Hq, N, D, device="cuda", dtype=torch.bfloat16)
    k = torch.randn(B, Hkv, N, D, device="cuda", dtype=torch.bfloat16)
    v = torch.randn(B, Hkv, N, D, device="cuda", dtype=torch.bfloat16)
    scale = D ** -0.5
    rows = []

    def rec(name, fn, note=""):
        torch.cuda.empty_cache()
        first, med = cuda_ms(fn, reps)
        rows.append(dict(n=N, name=name, ms=med, first_ms=first, note=note))
        print(f"[N={_label(N)}] {name}: {med:.2f} ms (first {first:.0f} ms)", flush=True)
        return med

    dense_name = None
    try:
        import flashinfer

        qn, kn, vn = (t[0].transpose(0, 1).contiguous() for t in (q, k, v))
        dense_name = "dense FlashInfer fa3"
        rec(dense_name, lambda: flashinfer.single_prefill_with_kv_cache(
            qn, kn, vn, causal=True, sm_scale=scale, backend="fa3", return_lse=True))
        del qn, kn, vn
    except Exception as exc:  # noqa: BLE001
        print(f"fa3 unavailable: {exc}", flush=True)
        from torch.nn.attention import SDPBackend, sdpa_kernel

        def sdpa():
            with sdpa_kernel(SDPBackend.CUDNN_ATTENTION):
                return torch.nn.functional.scaled_dot_product_attention(q, k, v, is_causal=True, scale=scale, enable_gqa=True)

        dense_name = "dense SDPA cuDNN"
        rec(dense_name, sdpa)
    for label, hip in (("hip", HiP()), ("hip share_kv=False", HiP(share_kv=False))):
        plan = hip.plan(q, k, q_offset=0)
        rec(f"{label}: plan", lambda: hip.plan(q, k, q_offset=0))
        rec(f"{label}: run", lambda: hip.run(plan, q, k, v, scale=scale, q_offset=0))
        rec(label, lambda: hip.prefill(q, k, v, scale=scale, q_offset=0))
        attn = SparseAttention(hip, corrector=Delta(gamma=64))
        rec(f"{label} + Δ(γ=64)", lambda: attn.forward(q, k, v))
        if label == "hip":
            trace = {}
            hip.plan(q, k, q_offset=0, trace=trace)
            for step, sec in trace.items():
                rows.append(dict(n=N, name=f"hip plan step: {step}", ms=sec * 1e3, first_ms=None, note="synchronised"))
                print(f"[N={_label(N)}] plan step {step}: {sec * 1e3:.2f} ms", flush=True)
            # Δ pieces alone: anchor rows through the kernels the corrector uses
            d = Delta(gamma=64)
            rp = d.plan(N)
            rec("Δ anchor+tail rows alone", lambda: d.dense_rows(rp, q, k, v, scale=scale, q_offset=0))
        del plan
    dense = rows[0]["ms"]
    for r in rows:
        r["x_dense"] = dense / r["ms"] if r["ms"] else None
        r["dense"] = dense_name
    return rows


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", required=True)
    ap.add_argument("--n", type=_ints, default=_ints("32K,128K,1M"))
    ap.add_argument("--fidelity-n", type=_ints, default=_ints("32K"))
    ap.add_argument("--reps", type=int, default=5)
    args = ap.parse_args()
    os.makedirs(args.out, exist_ok=True)
    env = dict(torch=torch.__version__, device=torch.cuda.get_device_name(), python=platform.python_version())
    try:
        import triton

        env["triton"] = triton.__version__
    except ImportError:
        pass
    fid, tim = [], []
    for n in args.fidelity_n:
        fid += [dict(n=n, **r) for r in fidelity(n)]
        with open(os.path.join(args.out, "hip_bench.json"), "w") as f:
            json.dump(dict(env=env, fidelity=fid, timing=tim), f, indent=1)
    for n in args.n:
        tim += timing(n, args.reps if n < 512 * 1024 else 1)
        with open(os.path.join(args.out, "hip_bench.json"), "w") as f:
            json.dump(dict(env=env, fidelity=fid, timing=tim), f, indent=1)
    lines = [f"# hip on {env['device']}", "", f"torch {env['torch']}, triton {env.get('triton')}; "
             "B=1, Hq=32, Hkv=8, D=128, bf16 for timing.", "", "## Timing", "",
             "| N | what | ms | × dense | first call ms |", "|---|---|---|---|---|"]
    for r in tim:
        fm = "–" if r["first_ms"] is None else f"{r['first_ms']:.0f}"
        lines.append(f"| {_label(r['n'])} | {r['name']} | {r['ms']:.2f} | {r['x_dense']:.2f} | {fm} |")
    lines += ["", "## Fidelity (structured synthetic, Hq=8, Hkv=2, D=128, bf16)", "",
              "| N | config | recall@64 | recall@2048 | attention mass | cos to dense | cos + Δ(γ=64) |",
              "|---|---|---|---|---|---|---|"]
    for r in fid:
        f = lambda key: "–" if r.get(key) is None else f"{r[key]:.4f}"
        lines.append(f"| {_label(r['n'])} | {r['config']} | {f('recall64')} | {f('recall2048')} | {f('mass')} | "
                     f"{f('cos')} | {f('cos_delta')} |")
    with open(os.path.join(args.out, "hip_bench.md"), "w") as f:
        f.write("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
