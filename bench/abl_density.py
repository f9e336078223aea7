"""Attention density of sparse specs on a real model's q/k (calibrating an equal-density ablation grid).

One dense forward captures q, k of every full-attention layer (``sparsekit.eval.fidelity.capture_qkv``);
each spec is then planned on every layer (``SparseAttention.plan``, no attention run) and its exact pair
counts are summed over layers, as ``sparsekit.hf`` does during a prefill (``LayerState.pairs``):
density = (backend + corrector pairs) / dense causal pairs of the same rows.

    python bench/abl_density.py --length 8192 --text argparse.py "streaming(window=512,sink=16)" "hip(k=512)" ...

Prints one line per spec: density over all layers, min / max over layers, and the planning time.
"""

from __future__ import annotations

import argparse
import time


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("specs", nargs="+", help="SparseAttention spec strings")
    p.add_argument("--model", default="smollm2")
    p.add_argument("--dtype", default="float32")
    p.add_argument("--device", default=None)
    p.add_argument("--threads", type=int, default=None)
    p.add_argument("--length", type=int, default=8192)
    p.add_argument("--text", default="argparse.py")
    p.add_argument("--layers", default=None, help="comma-separated layer subset (default: all)")
    args = p.parse_args(argv)

    import torch

    from sparsekit import SparseAttention
    from sparsekit.eval.fidelity import capture_qkv
    from sparsekit.models import load_model

    if args.threads:
        torch.set_num_threads(args.threads)
    model, tok = load_model(args.model, dtype=args.dtype, device=args.device)
    device = next(model.parameters()).device
    captured, scales, secs = capture_qkv(model, tok, text=args.text, length=args.length, device=device)
    layers = sorted(captured) if args.layers is None else [int(x) for x in args.layers.split(",")]
    print(f"captured {len(captured)} layers of {args.text}[:{args.length}] on {device} in {secs:.1f} s", flush=True)
    for spec in args.specs:
        attn = SparseAttention.from_string(spec)
        t0 = time.perf_counter()
        tot = dict(backend=0.0, corrector=0.0, dense=0)
        per_layer = []
        for i in layers:
            q, k, _ = captured[i]
            c = attn.plan(q, k, scale=scales[i], q_offset=0).cost()
            tot["backend"] += float(c.backend_pairs)
            tot["corrector"] += float(c.corrector_pairs)
            tot["dense"] += c.dense_pairs
            per_layer.append(c.density)
        secs = time.perf_counter() - t0
        d = (tot["backend"] + tot["corrector"]) / tot["dense"]
        print(f"{spec}: density {100 * d:.2f}% (backend {100 * tot['backend'] / tot['dense']:.2f}%, corrector "
              f"{100 * tot['corrector'] / tot['dense']:.2f}%), layers {100 * min(per_layer):.1f}-"
              f"{100 * max(per_layer):.1f}%, plan {secs / len(layers):.2f} s/layer", flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
