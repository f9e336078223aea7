"""``sparsekit demo``: a synthetic long-context attention problem on CPU.

The problem has the structure that makes sparse prefill go wrong, not i.i.d. noise:

* **drift**: keys and queries follow a slowly moving direction, so attention is mostly
  local and a sliding window gets the bulk of it, but the window's normaliser misses the
  mass spread over the far past (the "distribution shift" Δ corrects);
* **attention sinks**: the first keys share a component every query matches;
* **needles**: a few early keys carry distinct directions and values; queries in the last
  rows (and a sprinkling elsewhere) match one needle strongly, far outside any window.

It runs dense, streaming, streaming + tail-only control, streaming + recompute, streaming
+ Δ and streaming + linear Δ, and prints error against dense over the last 128 rows and
over all rows, attended-pair density and wall time.
"""

from __future__ import annotations

import argparse
import json
import time

import torch

from . import SparseAttention
from .rows import default_tail

__all__ = ["make_problem", "run_demo", "DEFAULT_CONFIGS"]


def make_problem(n=8192, batch=1, q_heads=8, kv_heads=2, head_dim=64, needles=16, seed=0, dtype=torch.float32):
    """Structured q, k, v of shapes [B, Hq, n, D] and [B, Hkv, n, D] (see module docstring)."""
    g = torch.Generator().manual_seed(seed)
    B, Hq, Hkv, D = batch, q_heads, kv_heads, head_dim
    G = Hq // Hkv

    def drift():  # a slow random walk on the unit sphere, one per KV head: [B, Hkv, n, D]
        walk = torch.randn(B, Hkv, 1, D, generator=g) + 0.05 * torch.randn(B, Hkv, n, D, generator=g).cumsum(2)
        return walk / walk.norm(dim=-1, keepdim=True)

    base = drift()
    k = 4.0 * base + 0.3 * torch.randn(B, Hkv, n, D, generator=g)
    q = 4.0 * base.repeat_interleave(G, dim=1) + 0.3 * torch.randn(B, Hq, n, D, generator=g)
    v = 4.0 * drift() + torch.randn(B, Hkv, n, D, generator=g)  # values drift too
    # attention sinks: keys 0..3 share a direction that every query carries
    sink_dir = torch.randn(D, generator=g)
    sink_dir /= sink_dir.norm()
    k[:, :, :4] += 6.0 * sink_dir
    q += 3.0 * sink_dir
    # needles: early keys with their own direction and value; later queries look them up
    pos = torch.randperm(n // 2 - 64, generator=g)[:needles] + 32
    dirs = torch.randn(needles, D, generator=g)
    dirs /= dirs.norm(dim=-1, keepdim=True)
    for m in range(needles):
        k[:, :, pos[m]] += 8.0 * dirs[m]
        v[:, :, pos[m]] = 4.0 * torch.randn(D, generator=g)
    askers = torch.cat([torch.arange(n - 128, n), torch.randint(n // 2, n - 128, (n // 256,), generator=g)])
    which = torch.randint(0, needles, (askers.numel(),), generator=g)
    q[:, :, askers] += 8.0 * dirs[which][None, None]
    return q.to(dtype), k.to(dtype), v.to(dtype)


def DEFAULT_CONFIGS(n: int, window: int, sink: int, gamma: int) -> list[tuple[str, str]]:
    s = f"streaming(window={window},sink={sink})"
    # control: the same dense tail as the corrected configs, and no anchors past row 0
    return [
        ("dense", "dense"),
        ("streaming", s),
        ("streaming + dense tail only", f"{s}+tailonly(gamma={gamma})"),
        ("streaming + recompute", f"{s}+recompute(gamma={gamma})"),
        ("streaming + delta", f"{s}+delta(gamma={gamma})"),
        ("streaming + linear delta", f"{s}+delta(gamma={gamma},interpolation=linear)"),
    ]


def _errors(out, ref):
    o, r = out.double(), ref.double()
    rel = ((o - r).norm() / r.norm()).item()
    cos = torch.nn.functional.cosine_similarity(o, r, dim=-1).mean().item()
    return rel, cos


def run_demo(n=8192, window=256, sink=64, gamma=64, seed=0, configs=None, progress=print):
    """Run every config on one problem; returns a list of result dicts (one per config)."""
    q, k, v = make_problem(n=n, seed=seed)
    configs = configs or DEFAULT_CONFIGS(n, window, sink, gamma)
    body = slice(0, n - default_tail(n, gamma))  # rows no corrector computes densely
    results, ref = [], None
    for i, (label, spec) in enumerate(configs, 1):
        attn = SparseAttention.from_string(spec)
        progress(f"[{i}/{len(configs)}] {label:<30} {spec} ...")
        t0 = time.perf_counter()
        out = attn(q, k, v)
        dt = time.perf_counter() - t0
        if ref is None:
            ref = out if spec == "dense" else SparseAttention("dense")(q, k, v)
        rel_last, cos_last = _errors(out[:, :, -128:], ref[:, :, -128:])
        rel_all, cos_all = _errors(out, ref)
        rel_body, cos_body = _errors(out[:, :, body], ref[:, :, body])
        cost = attn.cost(n)
        results.append(dict(config=label, spec=str(attn), rel_err_last128=rel_last, cos_last128=cos_last,
                            rel_err_all=rel_all, cos_all=cos_all, rel_err_body=rel_body, cos_body=cos_body,
                            density=cost.density, seconds=dt))
        progress(f"      done in {dt:.2f} s: rel. error last 128 rows {rel_last:.4f}, all rows {rel_all:.4f}")
    return results


def format_table(results) -> str:
    head = ("| config | rel. err last 128 | cosine last 128 | rel. err all rows | cosine all rows "
            "| rel. err body rows | density | time (s) |\n|---|---|---|---|---|---|---|---|")
    rows = [
        f"| {r['config']} | {r['rel_err_last128']:.4f} | {r['cos_last128']:.4f} | {r['rel_err_all']:.4f} | "
        f"{r['cos_all']:.4f} | {r['rel_err_body']:.4f} | {r['density']:.2%} | {r['seconds']:.2f} |"
        for r in results
    ]
    return "\n".join([head, *rows])


MIN_N = 256  # needles sit in the first half and the last 128 rows ask for them


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--n", type=int, default=8192, help="sequence length (default 8192)")
    p.add_argument("--window", type=int, default=256, help="streaming window (default 256)")
    p.add_argument("--sink", type=int, default=64, help="streaming sink tokens (default 64)")
    p.add_argument("--gamma", type=int, default=64, help="corrector stride (default 64)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--json", help="also write the results to this JSON file")


def _check_args(args):
    """A message for the first bad argument, or None."""
    if args.n < MIN_N:
        return f"--n must be >= {MIN_N} (needles sit in the first half, the last 128 rows ask for them), got {args.n}"
    if args.n > 1 << 17:
        return f"--n {args.n} is too long for the CPU demo (at most {1 << 17})"
    if args.window < 1:
        return f"--window must be >= 1, got {args.window}"
    if args.sink < 0:
        return f"--sink must be >= 0, got {args.sink}"
    if args.gamma < 1:
        return f"--gamma must be >= 1, got {args.gamma}"
    return None


def run(args) -> int:
    import sys
    from pathlib import Path

    why = _check_args(args)
    if why:
        print(f"sparsekit demo: {why}", file=sys.stderr)
        return 2
    if args.json:
        try:
            Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            print(f"sparsekit demo: cannot write --json {args.json}: {exc}", file=sys.stderr)
            return 2
    torch.set_num_threads(max(1, torch.get_num_threads()))
    print(f"sparsekit demo: N={args.n}, B=1, Hq=8, Hkv=2, D=64, float32, on {torch.device('cpu')}; "
          f"window={args.window}, sink={args.sink}, gamma={args.gamma}", flush=True)
    results = run_demo(args.n, args.window, args.sink, args.gamma, args.seed,
                       progress=lambda s: print(s, flush=True))
    print()
    print(format_table(results))
    print("\nbody rows = rows before the dense tail (the rows a corrector does not recompute, anchors aside); "
          "errors are against dense attention; density = pairs computed / dense causal pairs (a corrector's anchor "
          "rows are computed twice, sparse and dense, so a config whose window already covers everything can pass 100%)")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(results, f, indent=2)
    return 0
