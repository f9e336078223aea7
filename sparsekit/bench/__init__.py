"""``sparsekit bench``: time one prefill attention layer, every backend x corrector, in one run.

Dense baselines (FlashInfer fa3 when installed, SDPA cuDNN, SDPA flash = FlashAttention-2; SDPA on
the CPU) and every registered backend (``--backends all``) with and without each corrector, through
``SparseAttention.plan`` / ``run``, on ``random`` and / or ``structured`` inputs
(:mod:`sparsekit.bench.inputs`), at chosen lengths (default 32K, 128K, 512K, 1M; Llama-3.1-8B
shape: Hq=32, Hkv=8, D=128, bf16). Writes markdown tables, JSON and a log-log plot; speed-ups are
ratios within one run; every row states its density.

Python use::

    from sparsekit.bench import bench
    result = bench(ns=[32768, 131072], inputs=["structured"], out_dir="bench-out")
"""

from __future__ import annotations

import argparse

from .inputs import make_inputs, random_qkv, structured_qkv
from .runner import DEFAULT_CORRECTORS, DEFAULT_NS, bench

__all__ = ["bench", "add_arguments", "run", "make_inputs", "random_qkv", "structured_qkv", "parse_sizes"]


def parse_sizes(text: str):
    """``"32K,128K,1M"`` -> ``[32768, 131072, 1048576]`` (K = 1024, M = 1024**2)."""
    out = []
    for part in text.split(","):
        part = part.strip().upper()
        if not part:
            continue
        mult = 1
        if part.endswith("K"):
            mult, part = 1024, part[:-1]
        elif part.endswith("M"):
            mult, part = 1024 * 1024, part[:-1]
        try:
            val = int(part) * mult
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected sizes like 32K,128K,1M, got {text!r}") from None
        if val < 1:
            raise argparse.ArgumentTypeError(f"sizes must be >= 1, got {text!r}")
        out.append(val)
    return out


_ints = parse_sizes


def _split_top(text: str):
    """Split on commas that are not inside parentheses."""
    parts, depth, cur = [], 0, ""
    for ch in text:
        if ch == "(":
            depth += 1
        elif ch == ")":
            depth -= 1
        if ch == "," and depth == 0:
            parts.append(cur.strip())
            cur = ""
        else:
            cur += ch
    if cur.strip():
        parts.append(cur.strip())
    return parts


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--n", type=_ints, default=DEFAULT_NS, help="sequence lengths, e.g. 32K,128K,512K,1M")
    parser.add_argument("--backends", type=lambda s: [x for x in s.split(",") if x], default=["all"],
                        help="backends to time: 'all' (every registered one except dense; the default) or names")
    parser.add_argument("--specs", nargs="+", default=[],
                        help="backend specs with options, each one argument, e.g. 'block_threshold(rule=mass(tau=0.9))' "
                             "(run instead of --backends unless --backends is given too)")
    parser.add_argument("--inputs", type=lambda s: [x for x in s.split(",") if x], default=["random"],
                        help="random, structured or random,structured (default random); data-dependent backends "
                             "select almost everything on random inputs")
    parser.add_argument("--device", default="cuda", choices=["cuda", "cpu"],
                        help="cuda (default) or cpu (a smoke run at small N: --device cpu --n 1K)")
    parser.add_argument("--correctors", type=_split_top, default=DEFAULT_CORRECTORS,
                        help="correctors, 'none' for the bare backend (default: %(default)s)")
    parser.add_argument("--backend-options", action="append", default=[],
                        help="per-backend options, e.g. streaming:window=2048,sink=1024 (repeatable)")
    parser.add_argument("--baselines", type=lambda s: [x for x in s.split(",") if x], default=["fa3", "cudnn", "flash"],
                        help="dense baselines: fa3, cudnn, flash")
    parser.add_argument("--baseline-max-n", type=_ints, default=None,
                        help="largest N for the cudnn and flash baselines (fa3 always runs)")
    parser.add_argument("--pieces", action="store_true",
                        help="also time the steps of each run (sparse, dense rows, combine), synchronised")
    parser.add_argument("--impls", type=lambda s: [x for x in s.split(",") if x], default=["auto"],
                        help="implementations per config: auto, or families / names (triton, flashinfer, "
                             "fa3_paged, triton_blocks, flex, reference), comma-separated: one row each")
    parser.add_argument("--batch", type=int, default=1)
    parser.add_argument("--heads", type=int, default=32)
    parser.add_argument("--kv-heads", type=int, default=8)
    parser.add_argument("--head-dim", type=int, default=128)
    parser.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float16", "float32"])
    parser.add_argument("--reps", type=int, default=5, help="timed repetitions below --large-n")
    parser.add_argument("--large-n", type=_ints, default=[524288], help="from this N on, --large-reps repetitions")
    parser.add_argument("--large-reps", type=int, default=1)
    parser.add_argument("--sample-rows", type=int, default=32, help="rows checked against float32")
    parser.add_argument("--quality-rows", type=int, default=16, help="sampled rows for mass / recall@64")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--no-isolate", action="store_true", help="run every N in this process (default: a child process per N)")
    parser.add_argument("--out", default="bench-out", help="folder for bench.json, bench.md, bench.png")


def run(args) -> int:
    opts = {}
    for item in args.backend_options:
        if ":" not in item:
            import sys

            print(f"sparsekit bench: --backend-options: expected NAME:key=value,..., got {item!r}", file=sys.stderr)
            return 2
        name, rest = item.split(":", 1)
        opts[name.strip()] = rest.strip()
    import sys

    try:
        result = _bench(args, opts)
    except (RuntimeError, ValueError) as exc:
        print(f"sparsekit bench: {exc}", file=sys.stderr)
        return 2
    print(result["markdown"])
    return 0


def _backends(args):
    """--backends names plus --specs (``--specs`` alone replaces the default 'all')."""
    names = list(args.backends)
    if args.specs:
        names = ([] if names == ["all"] else names) + list(args.specs)
    return names


def _bench(args, opts):
    return bench(
        ns=args.n,
        backends=_backends(args),
        inputs=args.inputs,
        device=args.device,
        correctors=args.correctors,
        backend_options=opts,
        baselines=args.baselines,
        baseline_max_n=args.baseline_max_n[0] if args.baseline_max_n else None,
        pieces=args.pieces,
        impls=args.impls,
        batch=args.batch,
        heads=args.heads,
        kv_heads=args.kv_heads,
        head_dim=args.head_dim,
        dtype=args.dtype,
        reps=args.reps,
        large_n=args.large_n[0],
        large_reps=args.large_reps,
        sample_rows=args.sample_rows,
        quality_rows=args.quality_rows,
        seed=args.seed,
        isolate=not args.no_isolate,
        out_dir=args.out,
    )
