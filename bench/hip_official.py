"""The official hip-attn next to ours, on the same inputs (run in its own process: a CUDA fault in a
third-party kernel poisons the process).

    HIP_DISABLE_AUTOTUNE=1 python bench/hip_official.py --out DIR [--n 32K,128K] [--fidelity-n 32K]

Needs the hip-attn wheel installed (``pip install --no-deps hip-attn==1.2.9``). Writes
DIR/hip_official.json and DIR/hip_official.md. Timing: B=1, Hq=32, Hkv=8, D=128 bf16 random
inputs; fidelity: the structured synthetic data of ``hip_bench.py``. The official package's
recall is computed from its returned mask (``indices``/``ks``, chunks of the last stage's
size) plus sink and window as its args state them: an approximation of what its kernel reads.
"""

from __future__ import annotations

import argparse
import json
import os
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from hip_bench import _ints, _label, cuda_ms, dense_out, synthetic  # noqa: E402

from sparsekit import SparseAttention  # noqa: E402
from sparsekit.backends.hip import HiP  # noqa: E402
from sparsekit.backends.hip_attn import HipAttn, _load  # noqa: E402
from sparsekit.correctors.delta import Delta  # noqa: E402


def official_keep(ha: HipAttn, q, k, sample, scale):
    """(B, Hq, R, N) bool: keys the official mask holds for the sampled rows (approximate)."""
    ext, _ = _load()
    B, Hq, N, D = q.shape
    args = ha.args(0, N, q.device)
    _, meta = ext.dual_stage_quadratic_hip_attention(
        (q * scale).transpose(1, 2).contiguous(), k.transpose(1, 2).contiguous(), k.transpose(1, 2).contiguous(), args=args)
    idx, ks = meta.indices, meta.ks  # [B*Hq, BDST, K], [B*Hq, BDST]
    bdst = N // idx.shape[1] if idx.shape[1] else N
    chunk = ha.args(0, N, q.device).stages[-1].stage_chunk_size
    qb = sample // bdst
    keep = torch.zeros(B * Hq, len(sample), N + chunk, dtype=torch.bool, device=q.device)
    sel = idx[:, qb].long()  # [BH, R, K]
    valid = torch.arange(sel.shape[-1], device=q.device)[None, None, :] < ks[:, qb, None]
    for c in range(chunk):
        pos = torch.where(valid, sel + c, torch.full_like(sel, N + chunk - 1))
        keep.scatter_(-1, pos.clamp(max=N + chunk - 1), True)
    keep = keep[..., :N].view(B, Hq, len(sample), N)
    j = torch.arange(N, device=q.device)
    window = ha.window + 64  # the package widens the window by its query block
    keep |= (j[None, :] < ha.sink) | (j[None, :] > sample[:, None] - window)
    return keep & (j[None, :] <= sample[:, None]), idx.shape, bdst, chunk


def fidelity(N, rows=96, seed=0):
    q, k, v = synthetic(N, seed=seed)
    B, Hq, _, D = q.shape
    scale = D ** -0.5
    ref = dense_out(q, k, v, scale).float()
    gen = torch.Generator().manual_seed(seed + 1)
    sample = torch.sort(torch.randint(N // 4, N, (rows,), generator=gen)).values.cuda()
    G = Hq // k.shape[1]
    s = torch.einsum("bhrd,bhnd->bhrn", q.float()[:, :, sample], k.float().repeat_interleave(G, 1)) * scale
    causal = torch.arange(N, device="cuda")[None, :] <= sample[:, None]
    s = s.masked_fill(~causal, float("-inf"))
    p = torch.softmax(s, -1)
    tops = {K: s.topk(K, -1).indices for K in (64, 2048)}
    out = []
    for label, ha in (("hip-attn official, Δ-paper stages", HipAttn()), ("hip-attn official, package stages", HipAttn(preset="package"))):
        row = dict(n=N, config=label)
        try:
            keep, shape, bdst, chunk = official_keep(ha, q, k, sample, scale)
            row.update({f"recall{K}": keep.gather(-1, idx).float().mean().item() for K, idx in tops.items()})
            row["mass"] = (p * keep).sum(-1).mean().item()
            row["note"] = f"indices {tuple(shape)}, q block {bdst}, chunk {chunk}"
        except Exception as exc:  # noqa: BLE001
            row["note"] = f"mask: {type(exc).__name__}: {exc}"[:200]
        for cname, corr in (("cos", None), ("cos_delta", Delta(gamma=64))):
            try:
                o = SparseAttention(ha, corrector=corr)(q, k, v).float()
                row[cname] = torch.nn.functional.cosine_similarity(o, ref, dim=-1).mean().item()
            except Exception as exc:  # noqa: BLE001
                row["note"] = row.get("note", "") + f"; {cname}: {type(exc).__name__}: {exc}"[:200]
        print(f"[fidelity N={N}] {row}", flush=True)
        out.append(row)
    return out


def timing(N, reps):
    torch.manual_seed(0)
    q = torch.randn(1, 32, N, 128, device="cuda", dtype=torch.bfloat16)
    k = torch.randn(1, 8, N, 128, device="cuda", dtype=torch.bfloat16)
    v = torch.randn(1, 8, N, 128, device="cuda", dtype=torch.bfloat16)
    scale = 128 ** -0.5
    rows = []
    for label, be in (("hip-attn official, package stages", HipAttn(preset="package", sink=256, window=512)),
                      ("hip-attn official, Δ-paper stages", HipAttn()),
                      ("hip (ours)", HiP())):
        try:
            first, med = cuda_ms(lambda: be.prefill(q, k, v, scale=scale, q_offset=0), reps)
            rows.append(dict(n=N, name=label, spec=str(be), ms=med, first_ms=first))
            print(f"[N={_label(N)}] {label}: {med:.2f} ms (first {first:.0f} ms)", flush=True)
        except Exception as exc:  # noqa: BLE001
            rows.append(dict(n=N, name=label, error=f"{type(exc).__name__}: {exc}"[:300]))
            print(f"[N={_label(N)}] {label}: FAILED {exc}", flush=True)
    return rows


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", required=True)
    ap.add_argument("--n", type=_ints, default=_ints("32K,128K"))
    ap.add_argument("--fidelity-n", type=_ints, default=_ints("32K"))
    ap.add_argument("--reps", type=int, default=5)
    args = ap.parse_args()
    os.makedirs(args.out, exist_ok=True)
    res = dict(fidelity=[], timing=[])
    path = os.path.join(args.out, "hip_official.json")
    for n in args.n:
        res["timing"] += timing(n, args.reps)
        json.dump(res, open(path, "w"), indent=1)
    for n in args.fidelity_n:
        res["fidelity"] += fidelity(n)
        json.dump(res, open(path, "w"), indent=1)
    lines = ["## Official hip-attn 1.2.9 next to ours", "", "| N | what | ms | first call ms |", "|---|---|---|---|"]
    for r in res["timing"]:
        lines.append(f"| {_label(r['n'])} | {r['name']} | {r.get('ms', float('nan')):.2f} | {r.get('first_ms', float('nan')):.0f} |"
                     if "ms" in r else f"| {_label(r['n'])} | {r['name']} | failed: {r['error']} | – |")
    lines += ["", "| N | config | recall@64 | recall@2048 | mass | cos | cos + Δ(γ=64) | note |", "|---|---|---|---|---|---|---|---|"]
    for r in res["fidelity"]:
        f = lambda key: "–" if r.get(key) is None else f"{r[key]:.4f}"
        lines.append(f"| {_label(r['n'])} | {r['config']} | {f('recall64')} | {f('recall2048')} | {f('mass')} | {f('cos')} | "
                     f"{f('cos_delta')} | {r.get('note', '')} |")
    open(os.path.join(args.out, "hip_official.md"), "w").write("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
