"""``sparsekit show SPEC``: the pattern of a spec as a picture (text, and a PNG with ``--out``).

    sparsekit show "streaming(window=512,sink=64)" --n 4096
    sparsekit show "hip(k=512)" --n 4096 --inputs structured --out hip.png

A data-dependent backend (HiP, vertical-slash) selects from the data: ``--inputs structured`` (the
default) builds the bench's structured synthetic q/k (:mod:`sparsekit.bench.inputs`), ``random``
i.i.d. ones. Prints the pattern's description, its exact cost and density, and a text picture of
one head (``#`` dense, ``+`` ``:`` ``.`` sparser, blank none).
"""

from __future__ import annotations

import argparse
import sys

__all__ = ["add_arguments", "run", "show"]


def show(spec: str, n: int, *, inputs: str = "structured", heads: int = 4, kv_heads: int = 2, head_dim: int = 64,
         head: int = 0, width: int = 64, out=None, seed: int = 0) -> str:
    """The text report of :func:`run` (and the PNG at ``out``); returns the text."""
    import torch

    from . import SparseAttention
    from .bench.inputs import make_inputs

    attn = SparseAttention.from_string(spec)
    q, k, _ = make_inputs(inputs, n, q_heads=heads, kv_heads=kv_heads, head_dim=head_dim, dtype=torch.float32,
                          device="cpu", seed=seed)
    pat = attn.backend.pattern(q, k, scale=head_dim ** -0.5, q_offset=0)
    plan = attn.plan(q, k)
    lines = [f"{attn}", f"pattern: {pat!r}", f"cost: {plan.cost()}",
             f"head {head}, rows 0..{n - 1} (down) x keys 0..{n - 1} (right):", pat.ascii(width, head=head)]
    if out:
        pat.save_png(out, head=head, title=f"{attn}\nN={n}, head {head}, density {pat.density():.2%}")
        lines.append(f"saved {out}")
    return "\n".join(lines)


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("spec", help='a spec string, e.g. "hip(k=512)+delta(gamma=64)"')
    p.add_argument("--n", type=int, default=4096, help="sequence length (default 4096)")
    p.add_argument("--inputs", default="structured", choices=["structured", "random"],
                   help="data for data-dependent backends (default structured)")
    p.add_argument("--heads", type=int, default=4, help="query heads (default 4)")
    p.add_argument("--kv-heads", type=int, default=2, help="KV heads (default 2)")
    p.add_argument("--head-dim", type=int, default=64, help="head dim (default 64)")
    p.add_argument("--head", type=int, default=0, help="which query head to draw (default 0)")
    p.add_argument("--width", type=int, default=64, help="characters per row of the text picture (default 64)")
    p.add_argument("--out", default=None, help="also save a PNG here (needs matplotlib)")
    p.add_argument("--seed", type=int, default=0)


def run(args) -> int:
    for name in ("n", "heads", "kv_heads", "head_dim", "width"):
        if getattr(args, name) < 1:
            print(f"sparsekit show: --{name.replace('_', '-')} must be >= 1, got {getattr(args, name)}", file=sys.stderr)
            return 2
    if args.n > 65536:
        print(f"sparsekit show: --n {args.n} is too long for a CPU picture (at most 65536)", file=sys.stderr)
        return 2
    if not 0 <= args.head < args.heads:
        print(f"sparsekit show: --head must be in [0, {args.heads}), got {args.head}", file=sys.stderr)
        return 2
    try:
        text = show(args.spec, args.n, inputs=args.inputs, heads=args.heads, kv_heads=args.kv_heads,
                    head_dim=args.head_dim, head=args.head, width=args.width, out=args.out, seed=args.seed)
    except (ValueError, TypeError, ImportError, OSError) as exc:
        print(f"sparsekit show: {exc}", file=sys.stderr)
        return 2
    print(text)
    return 0
