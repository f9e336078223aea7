"""Time vertical_slash (+ Δ) against dense FlashInfer fa3 on one GPU, one attention layer.

Shape: Llama-3.1-8B (B=1, Hq=32, Hkv=8, D=128, bf16). Two kinds of inputs:

* ``structured``: q/k with a relative-position (RoPE) component shared by a head's queries and
  keys, which gives attention that decays with distance (slash structure), plus a non-rotary
  component that makes ~1% of the keys heavy for every query (vertical structure).
* ``random``: i.i.d. Gaussian q/k/v. The slash scores are then noise, the kept diagonals are
  scattered, each crosses its own pages, and the executed pattern is close to dense: reported
  to show that VS speed depends on the data.

Usage (GPU machine): ``python bench/vertical_slash_bench.py --n 128K,1M --out OUTDIR``.
Writes ``vertical_slash.json`` and ``vertical_slash.md`` after every measurement.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import time
import traceback

import torch

from sparsekit import SparseAttention
from sparsekit.backends.vertical_slash import VerticalSlash
from sparsekit.reference import attend_keys

B, HQ, HKV, D = 1, 32, 8, 128


def structured_qkv(N, seed=0, device="cuda"):
    g = torch.Generator(device=device).manual_seed(seed)
    G = HQ // HKV
    Dr, Dn = 96, 32
    half = Dr // 2
    # rotary frequencies log-spaced from 1/64 to 1/65536 rad/token and a base vector shared by a
    # head's queries and keys: q_i . k_j ~ sum_f |c_f|^2 cos((i - j) theta_f), which is largest
    # near the diagonal and decays with distance (the slash structure of real heads)
    inv = torch.logspace(math.log10(1 / 64), math.log10(1 / 65536), half, device=device)
    base = torch.randn(HKV, Dr, device=device, generator=g) * 1.2
    heavy_dir = torch.nn.functional.normalize(torch.randn(HKV, Dn, device=device, generator=g), dim=-1)
    q = torch.empty(B, HQ, N, D, device=device, dtype=torch.bfloat16)
    k = torch.empty(B, HKV, N, D, device=device, dtype=torch.bfloat16)
    heavy = torch.rand(N, device=device, generator=g) < 0.01
    chunk = 1 << 17
    for s0 in range(0, N, chunk):
        s1 = min(N, s0 + chunk)
        pos = torch.arange(s0, s1, device=device, dtype=torch.float32)
        ang = pos[:, None] * inv[None, :]
        cos, sin = ang.cos(), ang.sin()

        def rope(x):
            x1, x2 = x[..., :half], x[..., half:]
            return torch.cat([x1 * cos - x2 * sin, x1 * sin + x2 * cos], -1)

        n = s1 - s0
        kr = base[:, None, :] + 0.3 * torch.randn(HKV, n, Dr, device=device, generator=g)
        qr = base.repeat_interleave(G, 0)[:, None, :] + 0.3 * torch.randn(HQ, n, Dr, device=device, generator=g)
        kn = 0.5 * torch.randn(HKV, n, Dn, device=device, generator=g) + 6.0 * heavy[s0:s1, None].float() * heavy_dir[:, None, :]
        qn = 1.5 * heavy_dir.repeat_interleave(G, 0)[:, None, :] + 0.5 * torch.randn(HQ, n, Dn, device=device, generator=g)
        k[0, :, s0:s1] = torch.cat([rope(kr), kn], -1).bfloat16()
        q[0, :, s0:s1] = torch.cat([rope(qr), qn], -1).bfloat16()
    v = torch.randn(B, HKV, N, D, device=device, generator=g).bfloat16()
    return q, k, v


def random_qkv(N, seed=0, device="cuda"):
    g = torch.Generator(device=device).manual_seed(seed)
    mk = lambda h: torch.randn(B, h, N, D, device=device, generator=g).bfloat16()
    return mk(HQ), mk(HKV), mk(HKV)


def cuda_time(fn, reps, warmup=True):
    """Median milliseconds of ``reps`` calls (after one warm-up call unless ``warmup=False``)."""
    if warmup:
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
    return ts[len(ts) // 2]


def dense_fa3(q, k, v, scale):
    """FlashInfer fa3 single prefill, causal (the project's adapter: NHD views, no copies)."""
    from sparsekit.kernels.flashinfer_attention import dense

    return dense(q, k, v, scale=scale, q_offset=0)


def sampled_rows_error(plan, res, q, k, v, rows):
    """Max abs error of ``res`` against the float32 reference of the same plan on ``rows``."""
    err = 0.0
    for i in rows:
        kj = torch.arange(plan.q_offset + i + 1, device=q.device)
        keep = plan.keep(i, i + 1, kj)
        o, _ = attend_keys(q[:, :, i : i + 1].float(), k.float(), v.float(), plan.scale, kj, keep)
        err = max(err, (res.out[:, :, i : i + 1].float() - o).abs().max().item())
    return err


def dense_rows_error(out, q, k, v, rows, scale):
    err = 0.0
    for i in rows:
        kj = torch.arange(i + 1, device=q.device)
        o, _ = attend_keys(q[:, :, i : i + 1].float(), k.float(), v.float(), scale, kj, None)
        err = max(err, (out[:, :, i : i + 1].float() - o).abs().max().item())
    return err


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--n", default="128K,1M")
    ap.add_argument("--out", default=os.environ.get("OUT", "bench-out"))
    ap.add_argument("--random-n", default="128K", help="lengths also timed with i.i.d. random inputs")
    ap.add_argument("--blocks", default="64x64", help="block_q x block_k configurations, e.g. 64x64,128x64")
    args = ap.parse_args()
    configs = [tuple(int(x) for x in c.split("x")) for c in args.blocks.split(",") if c]
    parse = lambda s: [int(x[:-1]) * (1024 if x[-1] == "K" else 1 << 20) if x[-1] in "KM" else int(x) for x in s.split(",") if x]
    ns, rns = parse(args.n), parse(args.random_n)
    os.makedirs(args.out, exist_ok=True)
    res = {"device": torch.cuda.get_device_name(), "torch": torch.__version__, "shape": dict(B=B, Hq=HQ, Hkv=HKV, D=D),
           "options": str(VerticalSlash()) + " (block_q/block_k per row)", "runs": []}
    try:
        import flashinfer

        res["flashinfer"] = flashinfer.__version__
    except Exception as exc:  # noqa: BLE001
        res["flashinfer"] = f"missing: {exc}"

    def save():
        with open(os.path.join(args.out, "vertical_slash.json"), "w") as f:
            json.dump(res, f, indent=1)
        lines = [f"# vertical_slash vs dense fa3 ({res['device']}, torch {res['torch']}, flashinfer {res['flashinfer']})", "",
                 f"Shape B={B}, Hq={HQ}, Hkv={HKV}, D={D}, bf16; backend `{res['options']}`; Δ = delta(gamma=64).", "",
                 "| N | data | block | dense fa3 ms | VS density | VS estimate ms | VS select ms | VS index ms | FlashInfer plan ms | VS run ms | VS plan+run ms | speed-up VS | VS+Δ e2e ms | speed-up VS+Δ | VS err vs ref | VS err vs dense | VS+Δ err vs dense |",
                 "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
        for r in res["runs"]:
            g = lambda key, fmt="{:.1f}": fmt.format(r[key]) if isinstance(r.get(key), (int, float)) else str(r.get(key, "–"))
            lines.append(
                f"| {r['n']} | {r['data']} | {r.get('block', '')} | {g('dense_ms')} | {g('density', '{:.2%}')} | {g('estimate_ms')} | {g('select_ms')} | "
                f"{g('index_ms')} | {g('fi_plan_ms')} | {g('run_ms')} | {g('plan_run_ms')} | {g('speedup_vs', '{:.2f}x')} | {g('vs_delta_ms')} | "
                f"{g('speedup_vs_delta', '{:.2f}x')} | {g('vs_err', '{:.2e}')} | {g('vs_err_vs_dense', '{:.2e}')} | {g('vs_delta_err', '{:.2e}')} |"
            )
        for r in res["runs"]:
            for key in [x for x in r if x.endswith("error")]:
                lines.append(f"\n- N={r['n']} {r['data']} {r.get('block', '')} {key}: `{r[key][:400]}`")
        with open(os.path.join(args.out, "vertical_slash.md"), "w") as f:
            f.write("\n".join(lines) + "\n")

    jobs = [(n, "structured") for n in ns] + [(n, "random") for n in rns]
    jobs.sort(key=lambda x: (x[0], x[1] != "structured"))
    for N, data in jobs:
        big = N >= (1 << 19)
        reps = 1 if big else 5
        r = {"n": N, "data": data}
        print(time.strftime("%H:%M:%S"), "start", N, data, flush=True)
        res["runs"].append(r)
        torch.cuda.empty_cache()
        q, k, v = (structured_qkv if data == "structured" else random_qkv)(N)
        scale = D ** -0.5
        rows = [0, 1, N // 3, N // 2 + 7, N - 65, N - 1]
        try:
            if data == "structured" or not any(x["n"] == N and "dense_ms" in x for x in res["runs"][:-1]):
                r["dense_ms"] = cuda_time(lambda: dense_fa3(q, k, v, scale), reps, warmup=not big)
                if not big:  # at 1M one more dense call costs ~18 s
                    o = dense_fa3(q, k, v, scale).out
                    r["dense_err"] = dense_rows_error(o, q, k, v, rows[:3], scale)
                    del o
            else:
                r["dense_ms"] = next(x["dense_ms"] for x in res["runs"] if x["n"] == N and "dense_ms" in x)
        except Exception:  # noqa: BLE001
            r["dense_error"] = traceback.format_exc()
        save()
        print(time.strftime("%H:%M:%S"), "dense done", r.get("dense_ms"), flush=True)
        base_row = r
        for ci, (bq, bk) in enumerate(configs):
            if ci:
                r = {"n": N, "data": data, "dense_ms": base_row.get("dense_ms")}
                res["runs"].append(r)
            r["block"] = f"{bq}x{bk}"
            be = VerticalSlash(block_q=bq, block_k=bk)
            try:
                t0 = time.perf_counter()
                plan = be.plan(q, k, scale=scale, q_offset=0, timings=True)
                torch.cuda.synchronize()
                r["cold_plan_ms"] = (time.perf_counter() - t0) * 1e3
                del plan
                torch.cuda.empty_cache()
                t0 = time.perf_counter()
                plan = be.plan(q, k, scale=scale, q_offset=0, timings=True)
                torch.cuda.synchronize()
                r["plan_ms"] = (time.perf_counter() - t0) * 1e3
                r.update(plan.timings)
                r["impl"] = plan.cache.get("impl")
                st = be.plan_stats(plan)
                r["density"] = st["density"]
                r["pairs_mean"] = st["pairs_mean"]
                r["kept_cols"] = int(plan.n_cols.max())
                r["kept_diagonals"] = int(plan.n_offsets.max())
                cnt, _ = plan.slash_pages()
                r["mean_pages_per_block"] = float(cnt.double().mean())
                r["run_ms"] = cuda_time(lambda: be.run(plan, q, k, v, scale=scale, q_offset=0), reps)
                r["plan_run_ms"] = r["plan_ms"] + r["run_ms"]
                if isinstance(r.get("dense_ms"), float):
                    r["speedup_vs"] = r["dense_ms"] / r["plan_run_ms"]
                    r["speedup_vs_run_only"] = r["dense_ms"] / r["run_ms"]
                out = be.run(plan, q, k, v, scale=scale, q_offset=0)
                r["vs_err"] = sampled_rows_error(plan, out, q, k, v, rows)
                r["vs_err_vs_dense"] = dense_rows_error(out.out, q, k, v, [0, N // 2 + 7, N - 1], scale)
                del out, plan
            except Exception:  # noqa: BLE001
                r["vs_error"] = traceback.format_exc()
            save()
            print(time.strftime("%H:%M:%S"), "vs done", r.get("plan_ms"), r.get("run_ms"), flush=True)
            torch.cuda.empty_cache()
            try:
                attn = SparseAttention(be, corrector={"name": "delta", "gamma": 64})
                r["vs_delta_ms"] = cuda_time(lambda: attn(q, k, v), reps)  # estimation + plan + run + Δ
                if isinstance(r.get("dense_ms"), float):
                    r["speedup_vs_delta"] = r["dense_ms"] / r["vs_delta_ms"]
                out = attn(q, k, v)
                r["vs_delta_err"] = dense_rows_error(out, q, k, v, [0, N // 2 + 7, N - 1], scale)
                r["vs_delta_err_rows"] = "rows 0, N/2+7 (body), N-1 (tail)"
                del out
            except Exception:  # noqa: BLE001
                r["vs_delta_error"] = traceback.format_exc()
            save()
            print(json.dumps({k_: v_ for k_, v_ in r.items() if not k_.endswith("error")}), flush=True)
            for key in [x for x in r if x.endswith("error")]:
                print(key, r[key][-1500:], flush=True)
        del q, k, v


if __name__ == "__main__":
    main()
