"""Markdown tables and a plot of a benchmark run (speed-ups are ratios within the run)."""

from __future__ import annotations

__all__ = ["markdown", "plot"]


def _fmt(x, spec):
    return "–" if x is None else format(x, spec)


def _n(n: int) -> str:
    return f"{n // 1048576}M" if n % 1048576 == 0 else f"{n // 1024}K" if n % 1024 == 0 else str(n)


def _ms(r):
    """The time a row is compared by: plan + run for sparkit configs, the call for baselines."""
    return r.get("total_ms") if r.get("kind") == "sparse" else r.get("median_ms")


def markdown(results, cfg, env) -> str:
    """One table per (N, inputs): density, plan / run / total ms, speed-up vs dense, implementations."""
    lines = [
        f"B={cfg['batch']}, Hq={cfg['heads']}, Hkv={cfg['kv_heads']}, D={cfg['head_dim']}, {cfg['dtype']}; "
        + ", ".join(f"{k} {v}" for k, v in env.items()),
        "",
        "density = pairs the config computes (backend over the rows it keeps + the corrector's dense rows) / "
        "dense causal pairs, from the plan's exact cost: compare rows of similar density only. plan = selection + "
        "implementation choice + kernel plans; run = attention; total = plan + run (ms, medians of CUDA-event "
        "timings after a first call timed apart); × dense = the fastest dense baseline's ms / total (× run: / run "
        "only, for a plan reused across layers). TFLOP/s over computed pairs (4·D per pair and head) and total. "
        "peak = q/k/v + largest transient. err = max |out − ref| / max |ref| on sampled rows against float32: "
        "dense = vs dense attention, own = the backend step vs its own pattern's exact semantics. mass / recall@64 "
        "(bare backends): softmax mass the pattern keeps and the share of each row's 64 top keys it holds, on sampled "
        "rows. Which implementation refused each step and why: bench.json, field 'refused'.",
        "",
    ]
    keys = sorted({(r["n"], r.get("inputs", "random")) for r in results if "n" in r})
    for n, inputs in keys:
        rows = [r for r in results if r.get("n") == n and r.get("inputs", "random") == inputs]
        dense = [r for r in rows if r.get("kind") == "dense" and r.get("median_ms")]
        ref = next((r for r in dense if r.get("name") == "FlashInfer fa3"), None) or (
            min(dense, key=lambda r: r["median_ms"]) if dense else None)
        ref_ms = ref["median_ms"] if ref else None
        ref_name = ref["name"] if ref else "dense"
        lines += [f"### N = {_n(n)}, {inputs} inputs (× vs {ref_name})", "",
                  "| config | impl | density | mass | recall@64 | plan ms | run ms | total ms | × dense | × run | TFLOP/s | "
                  "peak GiB | err (dense) | err (own) | runs on | note |",
                  "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
        for r in rows:
            total = _ms(r)
            run = r.get("run_ms", r.get("median_ms"))
            sp = (ref_ms / total) if (ref_ms and total) else None
            sp_run = (ref_ms / run) if (ref_ms and run and r.get("kind") == "sparse") else None
            note = r.get("error") or r.get("note") or ""
            if r.get("plan_steps_ms"):
                note = (note + " " if note else "") + "plan: " + ", ".join(
                    f"{k} {v:.2f}" for k, v in r["plan_steps_ms"].items()) + ";"
            if r.get("steps_ms"):
                note = (note + " " if note else "") + "steps: " + ", ".join(
                    f"{k} {v:.2f}" for k, v in r["steps_ms"].items())

            dens = r.get("density")
            lines.append(
                f"| {r.get('name', '')} | {r.get('impl', '')} | {_fmt(None if dens is None else 100 * dens, '.1f')}% | "
                f"{_fmt(r.get('mass'), '.3f')} | {_fmt(r.get('recall64'), '.3f')} | {_fmt(r.get('plan_ms'), '.2f')} | {_fmt(run, '.2f')} | {_fmt(total, '.2f')} | {_fmt(sp, '.2f')} | "
                f"{_fmt(sp_run, '.2f')} | {_fmt(r.get('tflops'), '.0f')} | {_fmt(r.get('peak_gib'), '.2f')} | "
                f"{_fmt(r.get('err_dense'), '.1e')} | {_fmt(r.get('err_own'), '.1e')} | {r.get('runs_on', '')} | "
                f"{note.replace('|', '/')} |"
            )
        lines.append("")
    return "\n".join(lines)


def plot(results, path: str) -> None:
    """Log-log latency vs N, one line per config, one panel per input kind (needs matplotlib)."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError as exc:
        raise ImportError('the plot needs matplotlib: pip install "sparsekit-prefill[plot]"') from exc
    kinds = sorted({r.get("inputs", "random") for r in results if r.get("kind") in ("dense", "sparse")})
    fig, axes = plt.subplots(1, max(1, len(kinds)), figsize=(9 * max(1, len(kinds)), 6), squeeze=False)
    for ax, kind in zip(axes[0], kinds):
        series = {}
        for r in results:
            ms = _ms(r)
            if ms and r.get("kind") in ("dense", "sparse") and r.get("inputs", "random") == kind:
                series.setdefault(f"{r['name']} [{r['impl']}]", []).append((r["n"], ms))
        for name, pts in sorted(series.items()):
            pts.sort()
            style = "--" if name.startswith(("FlashInfer", "SDPA")) else "-"
            ax.plot([p[0] for p in pts], [p[1] for p in pts], style, marker="o", label=name)
        ax.set_xscale("log", base=2)
        ax.set_yscale("log")
        ax.set_xlabel("sequence length N")
        ax.set_ylabel("prefill attention, one layer: plan + run (ms)")
        ax.set_title(f"sparsekit bench, {kind} inputs")
        ax.grid(True, which="both", alpha=0.3)
        ax.legend(fontsize=6, loc="upper left", bbox_to_anchor=(1.0, 1.0))
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
