"""The benchmark itself: every backend x corrector through ``SparseAttention.plan`` / ``run``.

Per sequence length (one child process each unless ``isolate=False``) and per input kind
(``random`` / ``structured``, :mod:`sparsekit.bench.inputs`):

* dense baselines: FlashInfer fa3 single prefill (CUDA, when installed), SDPA cuDNN and SDPA flash
  (FA2) on CUDA, SDPA on the CPU;
* every config ``backend(+corrector)``: ``plan`` (selection + implementation choice + kernel plans)
  and ``run`` timed apart from the public API, and ``total = plan + run`` (the per-layer cost of a
  data-dependent backend; a data-independent one can reuse one plan across layers). Each row states
  the plan's exact density (``plan.cost()``), the implementation of each step and, on request, the
  per-step times (``--pieces``: ``run(..., timings=...)``, synchronised).

Timing: the first call is timed on its own (JIT / compile / cold plans are in it); then ``reps`` calls
with CUDA events (``perf_counter`` on the CPU), median reported. TFLOP/s count visible pairs (4·D
FLOPs per pair and query head). Peak memory = q/k/v + the largest transient of the call. Checks on
sampled rows against float32: ``err (dense)`` = final output vs dense attention; ``err (own)`` = the
backend step vs the exact semantics of its own pattern (a fast wrong kernel shows there). For each
bare backend, quality on sampled rows: the softmax mass its pattern keeps and the recall of each row's
64 highest-scoring keys (averaged over rows and heads).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
import time
import traceback
from typing import Optional

DEFAULT_NS = [32768, 131072, 524288, 1048576]
DEFAULT_CORRECTORS = ["none", "delta(gamma=64)", "recompute(gamma=64)", "delta(gamma=64,interpolation=linear)"]
DEFAULT_OPTIONS = {"streaming": "window=2048,sink=1024"}


def _reference_only(name: str) -> bool:
    """Backends that declare themselves analysis tools (e.g. ``oracle``) are left out of ``all``."""
    from ..registry import BACKENDS

    try:
        return bool(getattr(BACKENDS.get(name), "reference_only", False))
    except Exception:  # a broken plug-in is reported when it runs
        return False


def _progress(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


# ---------------------------------------------------------------- timing helpers
def _sync(dev):
    import torch

    if dev.type == "cuda":
        torch.cuda.synchronize()


def _time(fn, reps: int, dev):
    """(first_ms, median_ms, transient_bytes, last output). ``reps = 0``: the first call only."""
    import torch

    cuda = dev.type == "cuda"
    _sync(dev)
    base = torch.cuda.memory_allocated() if cuda else 0
    if cuda:
        torch.cuda.reset_peak_memory_stats()
    t0 = time.perf_counter()
    out = fn()
    _sync(dev)
    first = (time.perf_counter() - t0) * 1e3
    if reps <= 0:
        transient = (torch.cuda.max_memory_allocated() - base) if cuda else 0
        return first, first, transient, out
    del out
    ts = []
    if cuda:
        torch.cuda.reset_peak_memory_stats()
    for i in range(reps):
        if cuda:
            a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            a.record()
            out = fn()
            b.record()
            torch.cuda.synchronize()
            ts.append(a.elapsed_time(b))
        else:
            t0 = time.perf_counter()
            out = fn()
            ts.append((time.perf_counter() - t0) * 1e3)
        if i < reps - 1:
            del out
    transient = (torch.cuda.max_memory_allocated() - base) if cuda else 0
    ts.sort()
    return first, ts[len(ts) // 2], transient, out


def _rel(got, ref) -> float:
    return float((got.float() - ref.float()).abs().max() / ref.float().abs().max().clamp(min=1e-6))


def _rows_ref(q, k, v, rows, scale, keep_of):
    """float32 attention of call rows ``rows`` over the keys ``keep_of(r) -> (keys, keep)`` allows."""
    import torch

    from ..reference import attend_keys

    outs = []
    for r in rows.tolist():
        keys, keep = keep_of(r)
        o, _ = attend_keys(q[:, :, r : r + 1].float(), k, v, scale, keys, keep)
        outs.append(o)
    return torch.cat(outs, dim=2)


def _short(plan) -> str:
    """``sparse: fa3_paged, dense rows: fa3_rows``."""
    return ", ".join(f"{k}: {v}" for k, v in plan.implementations().items())


def _refusals(plan) -> dict:
    """Per step, every implementation ranked before the chosen one and why it refused."""
    out = {}
    for step, ch in (("sparse", plan.choice), ("dense rows", plan.dense_choice)):
        if ch is not None and ch.refused:
            out[step] = dict(ch.refused)
    return out


def _row_scores(q, k, rows, scale, top=64):
    """What :func:`_quality` needs of each sampled row that no pattern changes, computed once:
    ``[(r, s, lse, idx)]`` with ``s`` the float32 scaled scores over the row's causal prefix
    ``[B, Hq, r + 1]``, ``lse`` their logsumexp ``[B, Hq, 1]`` and ``idx`` the top-``top`` keys."""
    import torch

    B, Hq, _, D = q.shape
    Hkv = k.shape[1]
    out = []
    for r in rows.tolist():
        qr = q[:, :, r].float().reshape(B, Hkv, Hq // Hkv, D)  # query head h = kv * G + g
        s = torch.einsum("bhgd,bhkd->bhgk", qr, k[:, :, : r + 1].float()).reshape(B, Hq, r + 1) * scale
        out.append((r, s, torch.logsumexp(s, -1, keepdim=True), s.topk(min(top, r + 1), -1).indices))
    return out


def _quality(q, k, rows, scale, pattern, top=64, scores=None):
    """Attention mass the pattern keeps and recall of the top-``top`` keys, averaged over sampled rows and heads.

    ``scores``: :func:`_row_scores` of the same rows, to reuse across patterns (computed here if None).
    """
    import torch

    if scores is None:
        scores = _row_scores(q, k, rows, scale, top)
    mass, recall = [], []
    for r, s, lse, idx in scores:
        keys = torch.arange(r + 1, device=s.device)
        keep = pattern.expand(pattern.keep(r, r + 1, keys))[:, :, 0]  # [B, Hq, r + 1]
        mass.append((torch.exp(s - lse) * keep).sum(-1).mean().item())
        recall.append(keep.gather(-1, idx).float().mean().item())
    return sum(mass) / len(mass), sum(recall) / len(recall)


# ---------------------------------------------------------------- one sequence length
def run_one_n(cfg: dict) -> list:
    """Every config at one N for every input kind; returns result dicts (errors recorded, never raised)."""
    import torch

    from .. import SparseAttention, available_backends, kernels
    from ..executor import execute
    from .inputs import make_inputs

    N, B, Hq, Hkv, D = cfg["n"], cfg["batch"], cfg["heads"], cfg["kv_heads"], cfg["head_dim"]
    dtype = getattr(torch, cfg["dtype"])
    reps = cfg["large_reps"] if N >= cfg["large_n"] else cfg["reps"]
    dev = torch.device(cfg.get("device", "cuda"))
    scale = D**-0.5
    dense_pairs = N * (N + 1) // 2
    results = []
    for inputs in cfg["inputs"]:
        q, k, v = make_inputs(inputs, N, batch=B, q_heads=Hq, kv_heads=Hkv, head_dim=D, dtype=dtype, device=dev,
                              seed=cfg["seed"])
        qkv_bytes = sum(t.numel() * t.element_size() for t in (q, k, v))
        sample = torch.unique(torch.cat([
            torch.randint(0, N, (cfg["sample_rows"],), generator=torch.Generator().manual_seed(cfg["seed"] + 1)),
            torch.tensor([0, N - 1]),
        ])).to(dev)
        k32, v32 = k.float(), v.float()
        all_keys = torch.arange(N, device=dev)
        ref_dense = _rows_ref(q, k32, v32, sample, scale, lambda r: (all_keys[: r + 1], None))

        def record(row, fn, pairs, *, check=None):
            _progress(f"[N={N} {inputs}] {row['kind']:6s} {row['name']} ({row.get('impl', '')}) ...")
            try:
                if dev.type == "cuda":
                    torch.cuda.empty_cache()
                first, med, transient, out = _time(fn, reps, dev)
                o = out[0] if isinstance(out, tuple) else getattr(out, "out", out)
                if o.dim() == 3:  # NHD (the FlashInfer baseline) -> (B=1, H, N, D)
                    o = o.transpose(0, 1).unsqueeze(0)
                row.update(
                    first_ms=first, median_ms=med, one_time_ms=max(0.0, first - med) if reps > 0 else None,
                    tflops=(pairs * B * Hq * 4 * D / (med * 1e-3) / 1e12) if pairs else None,
                    peak_gib=(qkv_bytes + transient) / 2**30,
                    err_dense=_rel(o.index_select(2, sample), ref_dense),
                )
                del out, o
                if check is not None:
                    row["err_own"] = check()
                _progress(f"[N={N} {inputs}] {row['kind']:6s} {row['name']}: {med:.2f} ms")
            except Exception as exc:  # recorded, not fatal
                row["error"] = f"{type(exc).__name__}: {exc}"[:300]
                _progress(f"[N={N} {inputs}] {row['name']}: FAILED {row['error']}")
                traceback.print_exc(file=sys.stderr)
            results.append(row)
            return row

        # ---- dense baselines
        base = dict(n=N, inputs=inputs, kind="dense", density=1.0)
        if "fa3" in cfg["baselines"] and dev.type == "cuda":
            try:
                import flashinfer

                if B != 1:
                    raise RuntimeError("the fa3 baseline runs batch 1")
                qn, kn, vn = (t[0].transpose(0, 1).contiguous() for t in (q, k, v))
                record(dict(base, name="FlashInfer fa3", impl="flashinfer"), lambda: flashinfer.single_prefill_with_kv_cache(
                    qn, kn, vn, causal=True, sm_scale=scale, backend="fa3", return_lse=True), dense_pairs)
                del qn, kn, vn
            except Exception as exc:
                results.append(dict(base, name="FlashInfer fa3", impl="flashinfer", error=f"{type(exc).__name__}: {exc}"[:300]))
        big = cfg["baseline_max_n"] is not None and N > cfg["baseline_max_n"]
        from torch.nn.attention import SDPBackend, sdpa_kernel

        sdpas = ((("cudnn", "SDPA cuDNN", SDPBackend.CUDNN_ATTENTION), ("flash", "SDPA flash (FA2)", SDPBackend.FLASH_ATTENTION))
                 if dev.type == "cuda" else (("sdpa", "SDPA (CPU)", None),))
        for key, label, backend in sdpas:
            if key not in cfg["baselines"] and dev.type == "cuda":
                continue
            if big:
                results.append(dict(base, name=label, impl="torch", note=f"not run above N={cfg['baseline_max_n']}"))
                continue

            def sdpa(backend=backend):
                if backend is None:
                    return torch.nn.functional.scaled_dot_product_attention(q, k, v, is_causal=True, scale=scale,
                                                                            enable_gqa=True)
                with sdpa_kernel(backend):
                    return torch.nn.functional.scaled_dot_product_attention(q, k, v, is_causal=True, scale=scale,
                                                                            enable_gqa=True)

            record(dict(base, name=label, impl="torch"), sdpa, dense_pairs)

        # ---- registered backends x correctors, through plan / run
        names = cfg["backends"] or [b for b in available_backends() if b != "dense" and not _reference_only(b)]
        for bname in names:
            opts = "" if "(" in bname else cfg["backend_options"].get(bname, DEFAULT_OPTIONS.get(bname, ""))
            for cname in cfg["correctors"]:
                spec = f"{bname}({opts})" if opts else bname
                if cname and cname.lower() != "none":
                    spec += f"+{cname}"
                row0 = dict(n=N, inputs=inputs, kind="sparse", name=spec)
                try:
                    attn = SparseAttention.from_string(spec)
                except Exception as exc:
                    results.append(dict(row0, impl="auto", error=f"{type(exc).__name__}: {exc}"[:300]))
                    continue
                for impl in cfg.get("impls") or ["auto"]:
                    row = dict(row0, impl=impl)
                    try:
                        with kernels.use(impl):
                            plan = attn.plan(q, k, scale=scale, q_offset=0)
                    except Exception as exc:
                        results.append(dict(row, error=f"plan: {type(exc).__name__}: {exc}"[:300]))
                        continue
                    c = plan.cost()
                    row.update(runs_on=_short(plan), refused=_refusals(plan), density=c.density,
                               backend_density=c.backend_pairs / c.dense_pairs, corrector_share=c.corrector_share)
                    if plan.pattern is not None and cname.lower() == "none":
                        try:
                            qrows = sample[sample < plan.pattern.nq][: cfg["quality_rows"]]
                            row["mass"], row["recall64"] = _quality(q, k, qrows, scale, plan.pattern)
                        except Exception as exc:
                            row["quality_error"] = f"{type(exc).__name__}: {exc}"[:200]
                    if attn.backend.data_dependent and inputs == "random" and c.density > 0.5:
                        row["note"] = (f"data-dependent backend on i.i.d. random inputs selects {c.density:.0%} of the "
                                       "pairs: not comparable (see --inputs structured)")
                    try:
                        with kernels.use(impl):
                            pf, pm, _, _ = _time(lambda: attn.plan(q, k, scale=scale, q_offset=0), reps, dev)
                        row.update(plan_first_ms=pf, plan_ms=pm)
                    except Exception as exc:
                        row["error"] = f"plan timing: {type(exc).__name__}: {exc}"[:300]

                    def check(plan=plan, attn=attn):
                        if plan.pattern is None:
                            return None
                        res = execute(plan.pattern, q[:, :, : plan.pattern.nq], k, v, scale=scale, choice=plan.choice)
                        rows = sample[sample < plan.pattern.nq]
                        keep_of = lambda r: (all_keys[: r + 1], plan.pattern.expand(plan.pattern.keep(r, r + 1, all_keys[: r + 1])))  # noqa: E731
                        ref = _rows_ref(q, k32, v32, rows, scale, keep_of)
                        return _rel(res.out.index_select(2, rows), ref)

                    with kernels.use(impl):
                        record(row, lambda plan=plan, attn=attn: attn.run(plan, q, k, v), c.total_pairs, check=check)
                    if "median_ms" in row and row.get("plan_ms") is not None:
                        row["run_ms"] = row.pop("median_ms")
                        row["total_ms"] = row["plan_ms"] + row["run_ms"]
                        row["tflops"] = c.total_pairs * B * Hq * 4 * D / (row["total_ms"] * 1e-3) / 1e12
                    if cfg["pieces"] and "error" not in row:
                        try:
                            with kernels.use(impl):
                                tp = attn.plan(q, k, scale=scale, q_offset=0, timings=True)
                            row["plan_steps_ms"] = {key: s * 1e3 for key, s in tp.timings.items()}
                            del tp
                        except Exception as exc:
                            row["plan_steps_error"] = f"{type(exc).__name__}: {exc}"[:200]
                        try:
                            steps: dict = {}
                            for _ in range(max(1, reps)):
                                t: dict = {}
                                attn.run(plan, q, k, v, timings=t)
                                for key, s in t.items():
                                    steps.setdefault(key, []).append(s * 1e3)
                            row["steps_ms"] = {key: sorted(s)[len(s) // 2] for key, s in steps.items()}
                        except Exception as exc:
                            row["steps_error"] = f"{type(exc).__name__}: {exc}"[:200]
                    del plan
        del q, k, v, k32, v32
        if dev.type == "cuda":
            torch.cuda.empty_cache()
    return results


def _child() -> None:
    cfg = json.loads(sys.argv[1])
    res = run_one_n(cfg)
    with open(cfg["result_path"], "w") as f:
        json.dump(res, f)


# ---------------------------------------------------------------- driver
def bench(
    ns=None,
    backends=None,
    correctors=None,
    inputs=("random",),
    backend_options: Optional[dict] = None,
    baselines=("fa3", "cudnn", "flash"),
    baseline_max_n: Optional[int] = None,
    pieces: bool = False,
    impls=("auto",),
    batch: int = 1,
    heads: int = 32,
    kv_heads: int = 8,
    head_dim: int = 128,
    dtype: str = "bfloat16",
    reps: int = 5,
    large_n: int = 524288,
    large_reps: int = 1,
    sample_rows: int = 32,
    quality_rows: int = 16,
    seed: int = 0,
    isolate: bool = True,
    out_dir: Optional[str] = "bench-out",
    device: str = "cuda",
) -> dict:
    """Run the benchmark; returns ``{"config", "env", "results", "markdown"}`` and writes ``bench.json``,
    ``bench.md`` and ``bench.png`` under ``out_dir`` (None: write nothing).

    ``backends``: names, or None / ``["all"]`` for every registered one but ``dense``. Each N runs in
    a child process when ``isolate`` (a CUDA fault in one config then loses only that N).
    """
    import torch

    if device == "cuda" and not torch.cuda.is_available():
        raise RuntimeError("sparsekit bench: no CUDA device here; for a CPU run pass device='cpu' "
                           "(--device cpu) with small lengths (--n 1K,2K)")
    from .. import SparseAttention, available_backends

    if backends in (None, ["all"], ("all",), "all"):
        backends = None
    elif backends:
        unknown = [b for b in backends if "(" not in b and b not in available_backends()]
        for b in backends:
            if "(" in b:
                SparseAttention.from_string(b)  # a spec with options: it must build
        if unknown:
            raise ValueError(f"unknown backend(s) {unknown}; registered: {', '.join(available_backends())}")
    from .inputs import INPUTS

    inputs = list(inputs)
    bad = [i for i in inputs if i not in INPUTS]
    if bad:
        raise ValueError(f"inputs must be among {sorted(INPUTS)}, got {bad}")
    cfg = dict(
        device=device,
        batch=batch, heads=heads, kv_heads=kv_heads, head_dim=head_dim, dtype=dtype, reps=reps,
        large_n=large_n, large_reps=large_reps, sample_rows=sample_rows, quality_rows=quality_rows, seed=seed,
        backends=list(backends) if backends else None, inputs=inputs,
        correctors=list(correctors) if correctors else list(DEFAULT_CORRECTORS),
        backend_options=dict(backend_options or {}), baselines=list(baselines),
        baseline_max_n=baseline_max_n, pieces=pieces, impls=list(impls),
    )
    results = []
    ns = list(ns or DEFAULT_NS)
    for i, n in enumerate(ns):
        _progress(f"== N={n} ({i + 1}/{len(ns)}) ==")
        c = dict(cfg, n=n)
        if out_dir:  # what is done so far survives a run killed at a later N
            os.makedirs(out_dir, exist_ok=True)
            with open(os.path.join(out_dir, "bench.partial.json"), "w") as f:
                json.dump(dict(config=cfg, results=results), f)
        if not isolate:
            results += run_one_n(c)
            continue
        with tempfile.TemporaryDirectory() as tmp:
            c["result_path"] = os.path.join(tmp, "res.json")
            proc = subprocess.run([sys.executable, "-c", "from sparsekit.bench.runner import _child; _child()", json.dumps(c)])
            if proc.returncode == 0 and os.path.exists(c["result_path"]):
                with open(c["result_path"]) as f:
                    results += json.load(f)
            else:
                results.append(dict(n=n, kind="run", name=f"N={n}", impl="-", error=f"child process exited with {proc.returncode}"))
    from .report import markdown, plot

    env = dict(torch=torch.__version__, device=torch.cuda.get_device_name(0) if device == "cuda" else device,
               date=time.strftime("%Y-%m-%d", time.gmtime()))
    for mod in ("triton", "flashinfer"):
        try:
            env[mod] = __import__(mod).__version__
        except Exception:
            pass
    md = markdown(results, cfg, env)
    out = dict(config=cfg, env=env, results=results, markdown=md)
    if out_dir:
        os.makedirs(out_dir, exist_ok=True)
        partial = os.path.join(out_dir, "bench.partial.json")
        if os.path.exists(partial):
            os.remove(partial)
        with open(os.path.join(out_dir, "bench.json"), "w") as f:
            json.dump(dict(config=cfg, env=env, results=results), f, indent=1)
        with open(os.path.join(out_dir, "bench.md"), "w") as f:
            f.write(md)
        try:
            plot(results, os.path.join(out_dir, "bench.png"))
        except Exception as exc:  # matplotlib missing: table and JSON still written
            _progress(f"plot skipped: {exc}")
    return out
