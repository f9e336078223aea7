"""The benchmark itself: one process per sequence length, every config run defensively.

Timing: the first call is timed on its own (JIT / compile / plan / mask building are in it;
``one_time_ms = first_ms - median_ms``); then ``reps`` calls timed with CUDA events, median
reported. Backends with ``plan(q, k, *, scale, q_offset)`` / ``run(plan, q, k, v, ...)`` have
their plan timed separately and reused across reps. Effective TFLOP/s count visible pairs
(4·D FLOPs per pair and head). Peak memory = inputs (q, k, v) + the largest transient the call
allocated. Every output is checked on sampled rows against float32: ``err_dense`` against dense
attention, ``err_ref`` against the config's own exact semantics where the bench can evaluate it
(dense baselines and the first-party streaming backend with its correctors).
"""

from __future__ import annotations

import json
import math
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


def _progress(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


# ---------------------------------------------------------------- timing helpers
def _time(fn, reps: int):
    """(first_ms, median_ms, transient_bytes, last output). ``reps = 0``: the first call is the
    only one (used at the largest N after the kernels ran at a smaller N in the same process)."""
    import torch

    cuda = torch.cuda.is_available()
    sync = torch.cuda.synchronize if cuda else (lambda: None)
    sync()
    base = torch.cuda.memory_allocated() if cuda else 0
    if cuda:
        torch.cuda.reset_peak_memory_stats()
    t0 = time.perf_counter()
    out = fn()
    sync()
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
            sync()
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


# ---------------------------------------------------------------- float32 references on rows
def _rows_ref(q, k, v, rows, scale, keys_of):
    """float32 attention of query rows ``rows`` (absolute positions, q_offset 0) over
    ``keys_of(p)`` (int64 key indices) -> out (B, Hq, len(rows), D)."""
    import torch

    from ..reference import attend_keys

    outs = []
    for r in rows.tolist():
        kj = keys_of(r)
        o, _ = attend_keys(q[:, :, r : r + 1].float(), k, v, scale, kj, None)
        outs.append(o)
    return torch.cat(outs, dim=2)


def _streaming_keys(window, sink, device):
    import torch

    def keys_of(p):
        s = min(sink, p + 1)
        lo = max(s, p - window + 1)
        return torch.cat([torch.arange(s, device=device), torch.arange(lo, p + 1, device=device)])

    return keys_of


def _expected_rows(attn, N, sample, sparse_rows, dense_rows):
    """Exact semantics of backend(+corrector) on ``sample`` rows, from callables giving the
    float32 sparse and dense rows; None for correctors the bench cannot evaluate."""
    import torch

    corr = attn.corrector
    if corr is None:
        return sparse_rows(sample)
    name = corr.name
    plan = corr.plan(N)
    g, nb, nbody = plan.gamma, plan.n_blocks, plan.n_body
    interp = getattr(getattr(corr, "interpolation", None), "name", None)
    if name not in ("delta", "recompute") or (name == "delta" and interp not in ("repeat", "linear")):
        return None
    out = []
    for i in sample.tolist():
        t = torch.tensor([i], device=sample.device)
        if i >= nbody or i % g == 0:
            out.append(dense_rows(t))
            continue
        if name == "recompute":
            out.append(sparse_rows(t))
            continue
        kb = i // g
        a = torch.tensor([kb * g], device=sample.device)
        d0 = dense_rows(a) - sparse_rows(a)
        if interp == "linear":
            k2 = min(kb + 1, nb - 1)
            a2 = torch.tensor([k2 * g], device=sample.device)
            d1 = dense_rows(a2) - sparse_rows(a2)
            w = (i - kb * g) / g
            d0 = d0 * (1 - w) + d1 * w
        out.append(sparse_rows(t) + d0)
    return torch.cat(out, dim=2)


# ---------------------------------------------------------------- one sequence length
def run_one_n(cfg: dict) -> list:
    """Every config at one N; returns result dicts (errors recorded, never raised)."""
    import torch

    from .. import SparseAttention, available_backends, kernels

    N, B, Hq, Hkv, D = cfg["n"], cfg["batch"], cfg["heads"], cfg["kv_heads"], cfg["head_dim"]
    dtype = getattr(torch, cfg["dtype"])
    reps = cfg["large_reps"] if N >= cfg["large_n"] else cfg["reps"]
    dev = torch.device(cfg.get("device", "cuda"))
    g = torch.Generator(device=dev).manual_seed(cfg["seed"])
    q = torch.randn(B, Hq, N, D, device=dev, dtype=dtype, generator=g)
    k = torch.randn(B, Hkv, N, D, device=dev, dtype=dtype, generator=g)
    v = torch.randn(B, Hkv, N, D, device=dev, dtype=dtype, generator=g)
    scale = D**-0.5
    qkv_bytes = sum(t.numel() * t.element_size() for t in (q, k, v))
    dense_pairs = N * (N + 1) // 2
    results = []
    sample = torch.unique(torch.cat([
        torch.randint(0, N, (cfg["sample_rows"],), generator=torch.Generator().manual_seed(cfg["seed"] + 1)),
        torch.tensor([0, N - 1]),
    ])).to(dev)
    k32, v32 = k.float(), v.float()
    dense_cache: dict = {}

    def dense_rows(rows):
        key = tuple(rows.tolist())
        if key not in dense_cache:
            dense_cache[key] = _rows_ref(q, k32, v32, rows, scale, lambda p: torch.arange(p + 1, device=dev))
        return dense_cache[key]

    ref_dense = dense_rows(sample)

    def record(kind, name, impl, fn, pairs, *, ref=None, plan_ms=None, note="", check=True):
        row = dict(n=N, kind=kind, name=name, impl=impl, pairs=pairs, plan_ms=plan_ms, note=note)
        _progress(f"[N={N}] {kind:6s} {name} ({impl}) ...")
        try:
            torch.cuda.empty_cache()
            first, med, transient, out = _time(fn, reps)
            o = out[0] if isinstance(out, tuple) else getattr(out, "out", out)
            if o.dim() == 3:  # NHD (FlashInfer baseline) -> (B=1, H, N, D)
                o = o.transpose(0, 1).unsqueeze(0)
            got = o.index_select(2, sample) if check else None
            row.update(
                first_ms=first, median_ms=med, one_time_ms=max(0.0, first - med) if reps > 0 else None,
                tflops=(pairs * B * Hq * 4 * D / (med * 1e-3) / 1e12) if pairs else None,
                peak_gib=(qkv_bytes + transient) / 2**30,
                err_dense=_rel(got, ref_dense) if check else None,
                err_ref=None if (ref is None or not check) else _rel(got, ref()),
            )
            del out, o
            _progress(f"[N={N}] {kind:6s} {name} ({impl}): {med:.2f} ms")
        except Exception as exc:  # recorded, not fatal
            row["error"] = f"{type(exc).__name__}: {exc}"[:300]
            _progress(f"[N={N}] {kind:6s} {name} ({impl}): FAILED {row['error']}")
            traceback.print_exc(file=sys.stderr)
        results.append(row)
        return row

    # ---- dense baselines
    if "fa3" in cfg["baselines"]:
        try:
            import flashinfer

            qn, kn, vn = (t[0].transpose(0, 1).contiguous() for t in (q, k, v)) if B == 1 else (None,) * 3
            if B != 1:
                raise RuntimeError("the fa3 baseline runs batch 1")
            record("dense", "FlashInfer fa3", "flashinfer", lambda: flashinfer.single_prefill_with_kv_cache(
                qn, kn, vn, causal=True, sm_scale=scale, backend="fa3", return_lse=True), dense_pairs,
                ref=lambda: ref_dense)
            del qn, kn, vn
        except Exception as exc:
            results.append(dict(n=N, kind="dense", name="FlashInfer fa3", impl="flashinfer", error=f"{type(exc).__name__}: {exc}"[:300]))
    big = cfg["baseline_max_n"] is not None and N > cfg["baseline_max_n"]
    from torch.nn.attention import SDPBackend, sdpa_kernel

    for key, label, backend in (("cudnn", "SDPA cuDNN", SDPBackend.CUDNN_ATTENTION), ("flash", "SDPA flash (FA2)", SDPBackend.FLASH_ATTENTION)):
        if key not in cfg["baselines"]:
            continue
        if big:
            results.append(dict(n=N, kind="dense", name=label, impl="torch", note=f"not run above N={cfg['baseline_max_n']}"))
            continue

        def sdpa(backend=backend):
            with sdpa_kernel(backend):
                return torch.nn.functional.scaled_dot_product_attention(q, k, v, is_causal=True, scale=scale, enable_gqa=True)

        record("dense", label, "torch", sdpa, dense_pairs, ref=lambda: ref_dense)

    # ---- registered backends x correctors
    names = cfg["backends"] or [b for b in available_backends() if b != "dense"]
    for bname in names:
        opts = cfg["backend_options"].get(bname, DEFAULT_OPTIONS.get(bname, ""))
        for cname in cfg["correctors"]:
            spec = f"{bname}({opts})" if opts else bname
            if cname and cname.lower() != "none":
                spec += f"+{cname}"
            try:
                attn = SparseAttention.from_string(spec)
            except Exception as exc:
                results.append(dict(n=N, kind="sparse", name=spec, impl="auto", error=f"{type(exc).__name__}: {exc}"[:300]))
                continue
            be, corr = attn.backend, attn.corrector
            plan_ms, plan = None, None
            try:
                if callable(getattr(be, "plan", None)) and callable(getattr(be, "run", None)):
                    torch.cuda.synchronize()
                    t0 = time.perf_counter()
                    plan = be.plan(q, k, scale=scale, q_offset=0)
                    torch.cuda.synchronize()
                    plan_ms = (time.perf_counter() - t0) * 1e3
            except Exception as exc:
                results.append(dict(n=N, kind="sparse", name=spec, impl="auto", error=f"plan: {type(exc).__name__}: {exc}"[:300]))
                continue

            def fn(be=be, corr=corr, plan=plan, impl="auto"):
                with kernels.use(impl):
                    sparse = None
                    if corr is None or corr.needs_sparse(N):
                        if plan is not None:
                            sparse = be.run(plan, q, k, v, scale=scale, q_offset=0)
                        else:
                            sparse = be.prefill(q, k, v, scale=scale, q_offset=0)
                    return sparse if corr is None else corr.correct(sparse, q, k, v, scale=scale, q_offset=0)

            pairs = attn.cost(N).total_pairs
            ref = None
            if bname == "streaming":
                keys_of = _streaming_keys(be.window, be.sink, dev)
                s_cache: dict = {}

                def sparse_rows(rows, keys_of=keys_of, s_cache=s_cache):
                    key = tuple(rows.tolist())
                    if key not in s_cache:
                        s_cache[key] = _rows_ref(q, k32, v32, rows, scale, keys_of)
                    return s_cache[key]

                def ref(attn=attn, sparse_rows=sparse_rows):
                    return _expected_rows(attn, N, sample, sparse_rows, dense_rows)

            for impl in cfg.get("impls") or ["auto"]:
                label = impl
                try:
                    with kernels.use(impl):
                        if bname == "streaming":
                            label = kernels.implementation("streaming", q, k, v)
                except RuntimeError as exc:
                    results.append(dict(n=N, kind="sparse", name=spec, impl=impl, error=str(exc)[:300]))
                    continue
                if impl != "auto" and label != impl:
                    continue  # forced implementation does not apply here
                record("sparse", spec, label, lambda fn=fn, impl=impl: fn(impl=impl), pairs, ref=ref, plan_ms=plan_ms)

    # ---- pieces, per implementation
    if cfg["pieces"]:
        from ..backends.streaming import Streaming
        from ..rows import plan_rows

        st = Streaming(**_kv(cfg["backend_options"].get("streaming", DEFAULT_OPTIONS["streaming"])))
        keys_of = _streaming_keys(st.window, st.sink, dev)
        for impl in ("flashinfer", "triton"):
            with kernels.use(impl):
                try:
                    kernels.implementation("streaming", q, k, v)
                except RuntimeError as exc:
                    results.append(dict(n=N, kind="piece", name="streaming", impl=impl, error=str(exc)[:300]))
                    continue

                def fn_s(st=st, impl=impl):
                    with kernels.use(impl):
                        return kernels.streaming_attention(q, k, v, scale=scale, q_offset=0, window=st.window, sink=st.sink)

                label = "streaming: fa3 window_left + sink merge_state" if impl == "flashinfer" else "streaming: Triton"
                record("piece", label, impl, fn_s, st.cost(N, N, 0),
                       ref=lambda: _rows_ref(q, k32, v32, sample, scale, keys_of))
        rp = plan_rows(N, 64)
        rows = rp.dense_rows(dev)
        qr = q.index_select(2, rows)
        for impl in ("flashinfer", "triton"):
            with kernels.use(impl):
                try:
                    kernels.implementation("rows", qr, k, v)
                except RuntimeError as exc:
                    results.append(dict(n=N, kind="piece", name="anchor rows", impl=impl, error=str(exc)[:300]))
                    continue

            def fn_r(impl=impl):
                with kernels.use(impl):
                    r = kernels.rows_attention(qr, k, v, positions=rows, scale=scale)
                # checked rows: put the sampled anchor rows where the sample expects them
                return r

            label = "anchor rows γ=64 (+tail): paged fa3 + triangle" if impl == "flashinfer" else "anchor rows γ=64 (+tail): Triton"
            row = record("piece", label, impl, fn_r, rp.dense_pairs(0), check=False)
            try:
                pick = torch.sort(torch.randperm(rows.numel(), generator=torch.Generator().manual_seed(5))[:16]).values.to(dev)
                with kernels.use(impl):
                    got = kernels.rows_attention(qr.index_select(2, pick), k, v, positions=rows[pick], scale=scale)
                row["err_ref"] = _rel(got.out, dense_rows(rows[pick]))
            except Exception as exc:
                row["error"] = f"check: {type(exc).__name__}: {exc}"[:300]
        try:
            sp = kernels.streaming_attention(q, k, v, scale=scale, q_offset=0, window=st.window, sink=st.sink)
            dn = kernels.rows_attention(qr, k, v, positions=rows, scale=scale)
            from ..kernels.triton_delta import delta_apply

            lse_c = sp.lse.contiguous()
            dn_lse = dn.lse.contiguous()
            for lin in (False, True):
                def fn_d(lin=lin):
                    return delta_apply(sp.out, lse_c, dn.out, dn_lse, gamma=64, n_body=rp.n_body, linear=lin,
                                       out=sp.out, out_lse=lse_c)

                record("piece", f"Δ apply ({'linear' if lin else 'repeat'}), in place", "triton", fn_d, 0, check=False)
            del sp, dn
        except Exception as exc:
            results.append(dict(n=N, kind="piece", name="Δ apply", impl="triton", error=f"{type(exc).__name__}: {exc}"[:300]))
    return results


def _kv(text: str) -> dict:
    out = {}
    for part in text.split(","):
        if part.strip():
            key, val = part.split("=", 1)
            out[key.strip()] = int(val)
    return out


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
    seed: int = 0,
    isolate: bool = True,
    out_dir: Optional[str] = "bench-out",
    device: str = "cuda",
) -> dict:
    """Run the benchmark; returns ``{"config", "results", "markdown"}`` and writes
    ``bench.json``, ``bench.md`` and ``bench.png`` under ``out_dir`` (None: write nothing).

    Each N runs in a child process when ``isolate`` (a CUDA fault in one config then loses
    only that N, recorded as an error row).
    """
    import torch

    if device == "cuda" and not torch.cuda.is_available():
        raise RuntimeError("sparsekit bench needs a CUDA device")
    cfg = dict(
        device=device,
        batch=batch, heads=heads, kv_heads=kv_heads, head_dim=head_dim, dtype=dtype, reps=reps,
        large_n=large_n, large_reps=large_reps, sample_rows=sample_rows, seed=seed,
        backends=list(backends) if backends else None,
        correctors=list(correctors) if correctors else list(DEFAULT_CORRECTORS),
        backend_options=dict(backend_options or {}), baselines=list(baselines),
        baseline_max_n=baseline_max_n, pieces=pieces, impls=list(impls),
    )
    results = []
    ns = list(ns or DEFAULT_NS)
    for i, n in enumerate(ns):
        _progress(f"== N={n} ({i + 1}/{len(ns)}) ==")
        c = dict(cfg, n=n)
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

    env = dict(torch=torch.__version__, device=torch.cuda.get_device_name(0) if device == "cuda" else device)
    try:
        import triton

        env["triton"] = triton.__version__
    except ImportError:
        pass
    try:
        import flashinfer

        env["flashinfer"] = flashinfer.__version__
    except ImportError:
        pass
    md = markdown(results, cfg, env)
    out = dict(config=cfg, env=env, results=results, markdown=md)
    if out_dir:
        os.makedirs(out_dir, exist_ok=True)
        with open(os.path.join(out_dir, "bench.json"), "w") as f:
            json.dump(dict(config=cfg, env=env, results=results), f, indent=1)
        with open(os.path.join(out_dir, "bench.md"), "w") as f:
            f.write(md)
        try:
            plot(results, os.path.join(out_dir, "bench.png"))
        except Exception as exc:  # matplotlib missing: table and JSON still written
            _progress(f"plot skipped: {exc}")
    return out
