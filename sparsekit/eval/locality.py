"""Does Δ's locality assumption hold on a real model? (the Δ paper's §3 assumption, measured).

Δ correction estimates the missing part of row ``i``'s output, ``Δ_i = dense_i - sparse_i``, from
the anchor row that starts its block of ``γ`` rows: ``Δ̂_{a+j} = Δ_a`` (repeat) or
``(1 - j/γ) Δ_a + (j/γ) Δ_{a+γ}`` (linear). Row ``a+j`` then has output error
``||Δ_{a+j} - Δ̂_{a+j}||`` instead of the sparse output's ``||Δ_{a+j}||``, so the correction helps
that row (in L2) exactly when the ratio of the two is below 1.

Procedure: one dense forward captures q, k, v of every layer (as in the fidelity probe); per
layer, the backend and dense attention give ``Δ`` for every row of the body (rows before the
dense tail); per offset ``j`` we report the energy ratio ``Σ||Δ_{a+j} - Δ̂_{a+j}||² / Σ||Δ_{a+j}||²``
over anchors and heads (below 1: the correction removes error on average), the fraction of
(anchor, head) pairs where it helps, and the mean cosine between ``Δ_{a+j}`` and ``Δ_a`` (the
statistic of the paper's Fig. 6b, which it averages over ``j`` per layer).
"""

from __future__ import annotations

import json
import time
from pathlib import Path

import torch

__all__ = ["delta_locality", "run_locality"]


def delta_locality(delta: torch.Tensor, gamma: int) -> dict:
    """Locality statistics of ``delta [B, H, n_body, D]`` (``n_body`` a multiple of ``gamma``).

    Returns per offset ``j = 0..gamma-1`` (lists): ``ratio_repeat``, ``ratio_linear`` (energy ratios),
    ``helped_repeat``, ``helped_linear`` (fractions) and ``cos`` (mean cosine of ``Δ_{a+j}`` with the
    anchor's ``Δ_a``, the paper's Fig. 6b statistic), plus their values pooled over ``j >= 1``.
    """
    B, H, n, D = delta.shape
    if n % gamma or n < 2 * gamma:
        raise ValueError(f"delta_locality: body length {n} must be a multiple of gamma={gamma}, at least 2 blocks")
    from sparsekit.spec import build

    d = delta.double().reshape(B, H, n // gamma, gamma, D)
    anchor = d[:, :, :, :1]  # [B,H,nb,1,D]
    # the estimates are exactly what the Delta corrector adds: the registered interpolations' spread
    est = {name: build("interpolation", name).spread(anchor[:, :, :, 0], gamma, n).reshape(d.shape)
           for name in ("repeat", "linear")}
    base = d.square().sum(-1)  # [B,H,nb,gamma]
    cos = torch.nn.functional.cosine_similarity(d, anchor.expand_as(d), dim=-1)  # [B,H,nb,gamma]
    out: dict = {"cos": cos.mean((0, 1, 2)).tolist(), "pooled_cos": float(cos[..., 1:].mean())}
    for name, e in est.items():
        err = (d - e).square().sum(-1)
        out[f"ratio_{name}"] = (err.sum((0, 1, 2)) / base.sum((0, 1, 2)).clamp_min(1e-300)).tolist()
        out[f"helped_{name}"] = (err < base).double().mean((0, 1, 2)).tolist()
        out[f"pooled_ratio_{name}"] = float(err[..., 1:].sum() / base[..., 1:].sum().clamp_min(1e-300))
        out[f"pooled_helped_{name}"] = float((err[..., 1:] < base[..., 1:]).double().mean())
    return out


@torch.no_grad()
def run_locality(model, tok, out: Path, *, backend: str, length: int, text: str, gamma: int, device,
                 progress: bool = True, meta: dict | None = None) -> Path:
    """Write ``locality.json``: per layer, :func:`delta_locality` of ``backend`` on captured q/k/v."""
    from sparsekit import SparseAttention
    from sparsekit.rows import plan_rows

    from .fidelity import capture_qkv

    captured, scales, capture_s = capture_qkv(model, tok, text=text, length=length, device=device)
    sparse, dense = SparseAttention.from_string(backend), SparseAttention("dense")
    n_body = plan_rows(length, gamma).n_body
    result = dict(length=length, text=text, backend=backend, gamma=gamma, n_body=n_body,
                  capture_s=round(capture_s, 2), meta=meta or {}, layers={})
    bar = None
    if progress:
        from tqdm.auto import tqdm

        bar = tqdm(total=len(captured), desc="locality", unit="layer", dynamic_ncols=True)
    t0 = time.perf_counter()
    for layer in sorted(captured):
        q, k, v = captured[layer]
        s = scales[layer]
        delta = dense(q, k, v, scale=s)[:, :, :n_body] - sparse(q, k, v, scale=s)[:, :, :n_body]
        result["layers"][str(layer)] = delta_locality(delta, gamma)
        if bar is not None:
            bar.update(1)
            bar.set_postfix_str(f"layer {layer}: ratio {result['layers'][str(layer)]['pooled_ratio_repeat']:.2f}")
    result["seconds"] = round(time.perf_counter() - t0, 1)
    path = Path(out) / "locality.json"
    path.write_text(json.dumps(result, indent=1))
    if bar is not None:
        bar.close()
    return path
