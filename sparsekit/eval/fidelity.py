"""Per-layer attention fidelity on one long real input (the Δ paper's Fig. 3).

Willette, Lee, Hwang, "Δ Attention", NeurIPS 2025 (https://arxiv.org/abs/2505.11254),
Fig. 3: for the last 128 queries of a prefill, the cosine similarity of each method's
attention output to quadratic attention, and the Spearman rank correlation of its
attention rows with the dense rows.

Procedure: one dense forward captures q, k, v of every layer. Each config's
:class:`~sparsekit.SparseAttention` then runs on the *captured* q, k, v of each layer (so
errors do not compound across layers; every layer sees the same dense inputs). The probe
rows are the ``rows`` query rows just before the largest dense tail of the configs
(Δ / recompute / tail-only compute their last ``N % γ + max(128, γ)`` rows densely; rows
inside that tail would be exact by construction and say nothing).

Effective attention rows (for Spearman): a plain backend's row is the softmax over its
:meth:`~sparsekit.Backend.pattern`; recompute / tail-only rows are dense or sparse rows;
a Δ row is ``A_sparse[i] + Σ_k W[i, k] (A_dense[a_k] - A_sparse[a_k])`` where ``W`` is the
interpolation's spreading weights (obtained by spreading the identity; exact for the linear
interpolations shipped); a meancorr row gives each key of a corrected block ``exp(scale q.kbar - lse)``
(its own ``effective_rows``). ``recon_err`` = max |A_eff V - out| checks this against the
config's actual output. Spearman uses average ranks for ties, over the row's causal prefix.
"""

from __future__ import annotations

import contextlib
import json
import time
from pathlib import Path
from typing import Optional, Sequence

import torch

from .configs import Config

__all__ = ["run_fidelity", "capture_qkv", "rankdata", "spearman", "prefix_ranks", "prefix_spearman", "effective_rows"]


def rankdata(x: torch.Tensor) -> torch.Tensor:
    """Average ranks (0-based, ties share their mean rank) along the last dim. ``x [..., L]``."""
    s, idx = x.sort(dim=-1)
    L = x.shape[-1]
    new = torch.ones_like(s, dtype=torch.bool)
    new[..., 1:] = s[..., 1:] != s[..., :-1]
    grp = new.long().cumsum(-1) - 1  # group id of each sorted position
    pos = torch.arange(L, device=x.device, dtype=torch.float64).expand(s.shape).contiguous()
    first = torch.full(s.shape, float(L), dtype=torch.float64, device=x.device).scatter_reduce(-1, grp, pos, "amin")
    last = torch.full(s.shape, -1.0, dtype=torch.float64, device=x.device).scatter_reduce(-1, grp, pos, "amax")
    avg_sorted = ((first + last) / 2).gather(-1, grp)
    return torch.empty_like(avg_sorted).scatter_(-1, idx, avg_sorted)


def spearman(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Spearman rank correlation along the last dim (``[..., L]`` -> ``[...]``), NaN when a side is constant."""
    ra, rb = rankdata(a), rankdata(b)
    ra = ra - ra.mean(-1, keepdim=True)
    rb = rb - rb.mean(-1, keepdim=True)
    den = (ra.square().sum(-1) * rb.square().sum(-1)).sqrt()
    return (ra * rb).sum(-1) / den


def prefix_ranks(A: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
    """Centred average ranks of every row of ``A [H, R, N]`` over its causal prefix, all rows at once.

    Row ``(h, j)`` is ranked over ``A[h, j, :positions[j] + 1]`` exactly as :func:`rankdata` ranks it
    (ties share their mean rank), then centred (its mean rank, ``(n - 1) / 2``, subtracted); entries past
    the prefix are 0. Returns float64 ``[H, R, N]``, the input of :func:`prefix_spearman`. One batched sort
    instead of one call per row.
    """
    H, R, N = A.shape
    keys = torch.arange(N, device=A.device)
    valid = (keys[None, :] <= positions[:, None]).expand(H, R, N)
    x = A.double().masked_fill(~valid, float("inf"))  # entries past the prefix sort last
    s, idx = x.sort(dim=-1)
    new = torch.ones_like(s, dtype=torch.bool)
    new[..., 1:] = s[..., 1:] != s[..., :-1]
    pos = keys.expand_as(s)
    first = torch.where(new, pos, torch.zeros_like(pos)).cummax(dim=-1).values  # first position of the tie group
    last_of = torch.ones_like(new)
    last_of[..., :-1] = new[..., 1:]
    big = torch.full_like(pos, N)
    last = torch.where(last_of, pos, big).flip(-1).cummin(dim=-1).values.flip(-1)  # its last position
    ranks = torch.empty_like(s).scatter_(-1, idx, (first + last).double() / 2)
    n = (positions + 1).double()[None, :, None]
    return torch.where(valid, ranks - (n - 1) / 2, torch.zeros_like(ranks))


def prefix_spearman(ra: torch.Tensor, rb: torch.Tensor) -> torch.Tensor:
    """Spearman correlation ``[H, R]`` from two :func:`prefix_ranks` outputs (same rows and prefixes); NaN where
    a row is constant on one side (as :func:`spearman`)."""
    return (ra * rb).sum(-1) / (ra.square().sum(-1) * rb.square().sum(-1)).sqrt()


def _rows_softmax(q_rows, k, scale, keep) -> torch.Tensor:
    """Attention probabilities ``[B, Hq, R, Nk]`` (float64) of gathered rows under a keep mask."""
    B, Hq, R, D = q_rows.shape
    G = Hq // k.shape[1]
    kk = k.double().repeat_interleave(G, dim=1)
    s = torch.matmul(q_rows.double(), kk.transpose(-1, -2)) * scale
    s = s.masked_fill(~keep, float("-inf"))
    return torch.softmax(s, dim=-1)


def _causal(rows: torch.Tensor, nk: int, device) -> torch.Tensor:
    return torch.arange(nk, device=device)[None, :] <= rows[:, None]


def effective_rows(attn, q, k, *, scale: float, rows: torch.Tensor, pattern=None,
                   mix_cache: Optional[dict] = None) -> Optional[torch.Tensor]:
    """Effective attention ``[B, Hq, R, Nk]`` (float64) of ``attn`` at query ``rows`` (absolute = row index, q_offset 0).

    The backend's rows come from its pattern for the whole call (data-dependent selection included).
    A corrector declared ``row_linear`` (its output rows are a fixed linear mix of sparse and dense
    rows) is read through :func:`mixing`; any other corrector through its own
    ``effective_rows(pattern, q, k, *, scale, rows)`` when it has one (``meancorr``), else this returns
    None (the config's ρ and reconstruction error are then left empty, its cosine is still measured).
    """
    N, nk = q.shape[2], k.shape[2]
    dev = q.device
    # pattern: the backend's pattern over every row of the call, when the caller already has it;
    # mix_cache: a dict that keeps a row-linear corrector's mixing map between calls (it depends on the
    # corrector, the length and the rows only, not on q and k: the fidelity probe reuses it on every layer)
    pat = pattern if pattern is not None else attn.backend.pattern(q, k, scale=scale, q_offset=0)

    def sparse_at(r):
        return _rows_softmax(q[:, :, r], k, scale, _pattern_rows(pat, r))

    def dense_at(r):
        return _rows_softmax(q[:, :, r], k, scale, _causal(r, nk, dev))

    corr = attn.corrector
    if corr is None:
        return sparse_at(rows)
    if not getattr(corr, "row_linear", False):
        # not a fixed mix of sparse and dense rows (e.g. meancorr, whose weights depend on lse): read it
        # through the corrector's own effective rows when it gives them, else skip (rho is reported empty)
        own = getattr(corr, "effective_rows", None)
        return own(pat, q, k, scale=scale, rows=rows) if callable(own) else None
    plan = corr.rows(N)
    didx = plan.dense_rows(dev)
    key = (str(attn), N, tuple(rows.tolist()), str(dev))
    if mix_cache is not None and key in mix_cache:
        ms, md = mix_cache[key]
    else:
        ms, md = mixing(corr, plan, N, didx.numel(), dev)
        ms, md = ms[rows], md[rows]  # [R, N], [R, nd]
        if mix_cache is not None:
            mix_cache[key] = (ms, md)
    need_s = (ms != 0).any(0).nonzero().squeeze(1)
    need_d = (md != 0).any(0).nonzero().squeeze(1)
    out = torch.zeros(q.shape[0], q.shape[1], rows.numel(), nk, dtype=torch.float64, device=dev)
    if need_s.numel():
        out += torch.einsum("rj,bhjn->bhrn", ms[:, need_s].double(), sparse_at(need_s))
    if need_d.numel():
        out += torch.einsum("rj,bhjn->bhrn", md[:, need_d].double(), dense_at(didx[need_d]))
    return out


def mixing(corr, plan, n: int, n_dense: int, device):
    """The linear map of a ``row_linear`` corrector: ``(Ms [n, n], Md [n, n_dense])`` with
    ``out[i] = Ms[i] @ sparse + Md[i] @ dense`` (channel by channel), read by running its
    ``combine`` on identity inputs: sparse row j = unit vector j, dense row m = unit vector n + m."""
    from sparsekit.contract import AttentionResult

    C = n + n_dense
    dt = torch.float64 if n * C <= (1 << 25) else torch.float32
    s_out = torch.zeros(1, 1, n, C, dtype=dt, device=device)
    s_out[0, 0, :, :n] = torch.eye(n, dtype=dt, device=device)
    d_out = torch.zeros(1, 1, n_dense, C, dtype=dt, device=device)
    d_out[0, 0, :, n:] = torch.eye(n_dense, dtype=dt, device=device)
    z = lambda m: torch.zeros(1, 1, m, dtype=torch.float32, device=device)  # noqa: E731
    res = corr.combine(plan, AttentionResult(s_out, z(n)) if plan.needs_sparse else None, AttentionResult(d_out, z(n_dense)))
    m = res.out[0, 0]
    return m[:, :n], m[:, n:]


def _pattern_rows(pat, rows):
    """Keep mask ``[B, Hq, R, Nk]`` of call rows ``rows`` (ascending; consecutive runs in one call)."""
    masks = []
    r = rows.tolist()
    keys = torch.arange(pat.nk, device=pat.device)
    i = 0
    while i < len(r):
        j = i
        while j + 1 < len(r) and r[j + 1] == r[j] + 1:
            j += 1
        masks.append(pat.expand(pat.keep(r[i], r[j] + 1, keys)))
        i = j + 1
    return torch.cat(masks, dim=-2)


@contextlib.contextmanager
def _fixed_pattern(backend, pattern):
    """Inside the block ``backend.pattern(...)`` returns ``pattern`` (computed on the same q, k before).

    An instance attribute shadows the method (set with ``object.__setattr__``, so frozen dataclasses take it
    too); a backend that takes no instance attribute (``__slots__``) keeps computing its own pattern (the
    same one, only slower)."""
    try:
        object.__setattr__(backend, "pattern", lambda *a, **kw: pattern)
    except (AttributeError, TypeError):
        yield
        return
    try:
        yield
    finally:
        object.__delattr__(backend, "pattern")


@torch.no_grad()
def capture_qkv(model, tok, *, text: str, length: int, device) -> tuple:
    """Dense forward over the first ``length`` tokens of stdlib file ``text``.

    Returns ``(captured, scales, seconds)``: ``captured[layer] = (q, k, v)`` float32 on the model's
    device (q ``[1, Hq, N, D]``, k/v ``[1, Hkv, N, D]``, after RoPE) for every full-attention layer
    (the model's own sliding-window layers are left out), ``scales[layer]`` the softmax scale.
    """
    from sparsekit.hf import attention_modules, use

    from .perplexity import stdlib_text

    ids = tok(stdlib_text(text), return_tensors="pt", add_special_tokens=False)["input_ids"]
    if ids.shape[1] < length:
        raise ValueError(f"{text} has only {ids.shape[1]} tokens, fewer than --length {length}")
    ids = ids[:, :length].to(device)
    captured: dict = {}

    def capture(layer, q, k, v):
        captured[layer] = (q.detach().float(), k.detach().float(), v.detach().float())

    t0 = time.perf_counter()
    with use(model, None, capture=capture):
        model(ids, use_cache=False, logits_to_keep=1)
    modules = dict(attention_modules(model))
    scales = {idx: float(m.scaling) for idx, m in modules.items()}
    # layers the model itself runs as sliding-window (Gemma 3's local layers) are not dense there:
    # comparing a config with dense attention on them would measure nothing the model does
    for idx, m in modules.items():
        if getattr(m, "sliding_window", None):
            captured.pop(idx, None)
    return captured, scales, time.perf_counter() - t0


@torch.no_grad()
def run_fidelity(model, tok, configs: Sequence[Config], out: Path, *, length: int, text: str, rows: int,
                 device, progress: bool = True, meta: dict | None = None) -> Path:
    """Write ``fidelity.json``: per config and layer, cosine and Spearman statistics over heads x rows."""
    captured, scales, capture_s = capture_qkv(model, tok, text=text, length=length, device=device)
    sparse_cfgs = [c for c in configs if c.spec is not None]
    attns = {c.label: c.attention() for c in sparse_cfgs}
    N = length
    tail = 0
    for a in attns.values():
        if a.corrector is not None:
            tail = max(tail, N - getattr(a.corrector.rows(N), "n_sparse", N))
    r1 = N - tail
    probe = torch.arange(r1 - rows, r1, device=next(iter(captured.values()))[0].device)
    result = dict(length=N, text=text, rows=[int(probe[0]), int(probe[-1])], capture_s=round(capture_s, 2),
                  meta=meta or {}, layers=sorted(captured), configs={})
    bar = None
    if progress:
        from tqdm.auto import tqdm

        bar = tqdm(total=len(captured) * len(sparse_cfgs), desc="fidelity", unit="layer", dynamic_ncols=True)
    for c in sparse_cfgs:
        result["configs"][c.label] = dict(spec=c.spec, cos_mean=[], cos_p10=[], cos_median=[],
                                          rho_mean=[], rho_p10=[], rho_median=[], recon_err=[], density=[])
    mixes: dict = {}  # row-linear correctors' mixing maps, shared by the layers
    for layer in sorted(captured):
        q, k, v = captured[layer]
        scale = scales[layer]
        A_d = _rows_softmax(q[:, :, probe], k, scale, _causal(probe, N, q.device))  # [1,Hq,R,N]
        out_d = torch.matmul(A_d, v.double().repeat_interleave(q.shape[1] // k.shape[1], dim=1))
        # the backend's pattern over every row of this layer, once per backend spec: its configs (plain and
        # corrected) all run on the same q, k, so they share it (a data-dependent selection, e.g. the
        # oracle's, is the costly part of a probe on the CPU)
        patterns: dict = {}
        ranks_d = None
        for c in sparse_cfgs:
            attn = attns[c.label]
            if c.dense_layers and layer in c.dense_layers:
                o = out_d.float()
                A_e = A_d
                density = 1.0
            else:
                bkey = str(attn.backend)
                if bkey not in patterns:
                    patterns[bkey] = attn.backend.pattern(q, k, scale=scale, q_offset=0)
                with _fixed_pattern(attn.backend, patterns[bkey]):
                    plan = attn.plan(q, k, scale=scale, q_offset=0)
                o = attn.run(plan, q, k, v).out[:, :, probe]
                density = float(plan.cost().density)
                A_e = effective_rows(attn, q, k, scale=scale, rows=probe, pattern=patterns[bkey], mix_cache=mixes)
            cos = torch.nn.functional.cosine_similarity(o.double(), out_d, dim=-1).flatten()
            st = result["configs"][c.label]
            st["density"].append(density)
            st["cos_mean"].append(float(cos.mean()))
            st["cos_median"].append(float(cos.median()))
            st["cos_p10"].append(float(cos.quantile(0.1)))
            if A_e is None:
                for key in ("rho_mean", "rho_median", "rho_p10", "recon_err"):
                    st[key].append(None)
            else:
                o_e = torch.matmul(A_e, v.double().repeat_interleave(q.shape[1] // k.shape[1], dim=1))
                st["recon_err"].append(float((o_e - o.double()).abs().max()))
                if ranks_d is None:  # the dense rows' ranks, once per layer
                    ranks_d = prefix_ranks(A_d[0], probe)
                # per (head, probe row) over the row's causal prefix; the same numbers as spearman() row by row
                rho = prefix_spearman(prefix_ranks(A_e[0], probe), ranks_d).flatten()  # [Hq * R]
                rho = rho[~torch.isnan(rho)]
                st["rho_mean"].append(float(rho.mean()))
                st["rho_median"].append(float(rho.median()))
                st["rho_p10"].append(float(rho.quantile(0.1)))
            if bar is not None:
                bar.update(1)
                bar.set_postfix_str(f"layer {layer} {c.label}: cos {st['cos_mean'][-1]:.3f}")
        (Path(out) / "fidelity.json").write_text(json.dumps(result, indent=1))
    if bar is not None:
        bar.close()
    return Path(out) / "fidelity.json"
