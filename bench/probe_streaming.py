"""Pieces of streaming + Δ on one GPU: what each step costs and at what rate (issue 13's probe).

    python bench/probe_streaming.py --n 128K,1M --out DIR

For each N (Llama-3.1-8B layer shape, bf16, structured inputs): the corrector's dense rows through
``fa3_rows`` (the ragged launch alone, the Triton remainder alone, the whole step) with TFLOP/s over
their visible pairs; the sparse pass; Δ's application; and the whole ``streaming + delta`` call with
its steps. Every fast path is checked against float32 on sampled rows. Writes ``probe.json`` and
prints one line per measurement.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch


def _ms(fn, reps):
    fn()
    torch.cuda.synchronize()
    ts = []
    for _ in range(reps):
        a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        a.record()
        fn()
        b.record()
        torch.cuda.synchronize()
        ts.append(a.elapsed_time(b))
    ts.sort()
    return ts[len(ts) // 2], ts


def _n(s):
    s = s.strip().upper()
    return int(s[:-1]) * 1024 if s.endswith("K") else int(s[:-1]) << 20 if s.endswith("M") else int(s)


def main(argv=None):
    ap = argparse.ArgumentParser()
    ap.add_argument("--n", default="128K,1M")
    ap.add_argument("--reps", type=int, default=5)
    ap.add_argument("--dense-max-n", default="128K", help="time dense fa3 up to this N")
    ap.add_argument("--out", required=True)
    a = ap.parse_args(argv)
    from sparsekit import Pattern, SparseAttention
    from sparsekit.bench.inputs import structured_qkv
    from sparsekit.kernels import fa3
    from sparsekit.kernels.triton_band import interval_attention
    from sparsekit.reference import attend_keys

    out = Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    res = dict(device=torch.cuda.get_device_name(), date=time.strftime("%Y-%m-%d"), runs=[])
    B, Hq, Hkv, D = 1, 32, 8, 128
    flop = 4 * D * Hq  # per (row, key) pair, all heads

    def log(**kw):
        print(json.dumps(kw), flush=True)
        res["runs"].append(kw)

    for N in [_n(x) for x in a.n.split(",")]:
        reps = a.reps if N <= (256 << 10) else 2
        q, k, v = structured_qkv(N, q_heads=Hq, kv_heads=Hkv, head_dim=D)
        s = D**-0.5
        if N <= _n(a.dense_max_n):
            ms, ts = _ms(lambda: fa3.dense(q, k, v, scale=s, q_offset=0), reps)
            log(n=N, piece="dense fa3", ms=ms, all=ts, tflops=N * (N + 1) / 2 * flop / ms / 1e9)
        attn = SparseAttention.from_string("streaming(window=2048,sink=1024)+delta(gamma=64)")
        plan = attn.plan(q, k)
        idx = plan.row_index
        qr = q.index_select(2, idx)
        pos = idx
        pairs = float((pos + 1).sum())
        st = plan.dense_choice.state
        log(n=N, piece="rows chosen", impl=plan.dense_choice.impl.name, rows=int(idx.numel()))
        if plan.dense_choice.impl.name == "fa3_rows":
            G, H = st["group"], B * Hkv
            R = idx.numel()
            qp = qr.reshape(B, Hkv, G, R, D).permute(3, 2, 0, 1, 4).reshape(R * G, H, D)
            k_nhd = k.reshape(H, N, D).transpose(0, 1)
            v_nhd = v.reshape(H, N, D).transpose(0, 1)
            o = torch.empty(R * G, H, D, dtype=q.dtype, device=q.device)
            l2 = torch.empty(R * G, H, dtype=torch.float32, device=q.device)
            ms, ts = _ms(lambda: st["wrapper"].run(qp, k_nhd, v_nhd, out=o, lse=l2, return_lse=True), reps)
            lo_cpu = st["lo"][::G].cpu()
            main_pairs = float((lo_cpu).sum())  # keys [0, p0] = lo per row
            log(n=N, piece="rows: ragged fa3 [0,p0]", ms=ms, all=ts, tflops=main_pairs * flop / ms / 1e9)
            o_t = torch.empty_like(o)
            l_t = torch.empty(H, R * G, dtype=torch.float32, device=q.device)
            tri = lambda: interval_attention(  # noqa: E731
                qp.permute(1, 0, 2).unsqueeze(0), k_nhd.permute(1, 0, 2).unsqueeze(0),
                v_nhd.permute(1, 0, 2).unsqueeze(0), scale=s, positions=st["pos"], lo=st["lo"],
                out=o_t.permute(1, 0, 2).unsqueeze(0), lse=l_t.unsqueeze(0))
            ms, ts = _ms(tri, reps)
            log(n=N, piece="rows: triton remainder (p0,pos]", ms=ms, all=ts, pairs=pairs - main_pairs)
        ms, ts = _ms(lambda: fa3.rows(qr, k, v, positions=pos, scale=s, plan=st), reps)
        log(n=N, piece="rows: whole step", ms=ms, all=ts, tflops=pairs * flop / ms / 1e9)
        got = fa3.rows(qr, k, v, positions=pos, scale=s, plan=st)
        pick = torch.linspace(0, idx.numel() - 1, 12).long().to(q.device)
        errs = []
        for r in pick.tolist():
            p = int(pos[r])
            o_ref, l_ref = attend_keys(qr[:, :, r:r + 1].float(), k, v, s, torch.arange(p + 1, device=q.device), None)
            errs.append(float((got.out[:, :, r:r + 1].float() - o_ref).abs().max() / o_ref.abs().max()))
            errs.append(float((got.lse[:, :, r:r + 1] - l_ref).abs().max()))
        log(n=N, piece="rows: check vs float32", max_rel_out=max(errs[0::2]), max_abs_lse=max(errs[1::2]))
        band = attn.backend.pattern(q, k, scale=s, q_offset=0).head(plan.pattern.nq)
        qb = q[:, :, :band.nq]
        bpairs = band.mean_pairs()
        outs = {}
        for fused in (False, True):
            fn = lambda: fa3.streaming(qb, k, v, scale=s, q_offset=0, window=2048, sink=1024, fused=fused)  # noqa
            torch.cuda.reset_peak_memory_stats()
            base = torch.cuda.memory_allocated()
            ms, ts = _ms(fn, reps)
            peak = (torch.cuda.max_memory_allocated() - base) / 2**30
            outs[fused] = fn()
            log(n=N, piece=f"sparse: fa3 streaming, fused={fused}", ms=ms, all=ts, tflops=bpairs * flop / ms / 1e9,
                transient_gib=peak)
        log(n=N, piece="sparse: fused vs not, max |diff|",
            out=float((outs[True].out.float() - outs[False].out.float()).abs().max()),
            lse=float((outs[True].lse - outs[False].lse).abs().max()))
        del outs
        w = fa3.streaming(q, k, v, scale=s, q_offset=0, window=2048, sink=0)
        ms, ts = _ms(lambda: fa3.streaming(q, k, v, scale=s, q_offset=0, window=2048, sink=0), reps)
        wp = sum(min(i + 1, 2048) for i in range(0, N, 1)) if N <= 4096 else (N - 2048) * 2048 + 2048 * 2049 // 2
        log(n=N, piece="sparse: window 2048 only (fa3)", ms=ms, all=ts, tflops=wp * flop / ms / 1e9)
        del w
        for label, fn in (("plan+run", lambda: attn.run(attn.plan(q, k), q, k, v)),
                          ("run (plan reused)", lambda: attn.run(plan, q, k, v))):
            torch.cuda.reset_peak_memory_stats()
            base = torch.cuda.memory_allocated()
            ms, ts = _ms(fn, reps)
            peak = (torch.cuda.max_memory_allocated() - base) / 2**30
            log(n=N, piece=f"streaming+delta {label}", ms=ms, all=ts, transient_gib=peak,
                qkv_gib=(q.numel() + k.numel() + v.numel()) * 2 / 2**30)
        tm: dict = {}
        for _ in range(3):
            attn.run(plan, q, k, v, timings=tm)
        log(n=N, piece="streaming+delta steps (sum of 3)", steps={kk: vv * 1e3 / 3 for kk, vv in tm.items()})
        pt = attn.plan(q, k, timings=True).timings
        log(n=N, piece="plan steps", steps={kk: vv * 1e3 for kk, vv in pt.items()})
        (out / "probe.json").write_text(json.dumps(res, indent=1))
        del q, k, v, qr, plan, attn
        torch.cuda.empty_cache()
    return 0


if __name__ == "__main__":
    sys.exit(main())
