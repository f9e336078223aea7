"""Markdown table and log-log plot of a benchmark run (speed-ups are ratios within the run)."""

from __future__ import annotations

__all__ = ["markdown", "plot"]


def _fmt(x, spec):
    return "–" if x is None else format(x, spec)


def _n(n: int) -> str:
    return f"{n // 1048576}M" if n % 1048576 == 0 else f"{n // 1024}K" if n % 1024 == 0 else str(n)


def markdown(results, cfg, env) -> str:
    """One table per N: latency, speed-up vs dense FlashInfer fa3, TFLOP/s, memory, errors."""
    lines = [
        f"B={cfg['batch']}, Hq={cfg['heads']}, Hkv={cfg['kv_heads']}, D={cfg['head_dim']}, {cfg['dtype']}; "
        + ", ".join(f"{k} {v}" for k, v in env.items()),
        "",
        "ms = median of CUDA-event timings after a first (timed separately) call; one-time = first − median "
        "(JIT/compile, plan, mask building); TFLOP/s over visible pairs (4·D per pair and head); peak = q/k/v + "
        "largest transient; err = max |out − ref| / max |ref| on sampled rows against float32 "
        "(dense: exact dense attention; own: the config's exact semantics).",
        "",
    ]
    for n in sorted({r["n"] for r in results}):
        rows = [r for r in results if r["n"] == n]
        fa3 = next((r.get("median_ms") for r in rows if r.get("name") == "FlashInfer fa3" and r.get("median_ms")), None)
        lines += [f"### N = {_n(n)}", "",
                  "| kind | config | impl | ms | × fa3 | TFLOP/s | peak GiB | one-time ms | plan ms | err (dense) | err (own) | note |",
                  "|---|---|---|---|---|---|---|---|---|---|---|---|"]
        for r in rows:
            ms = r.get("median_ms")
            sp = (fa3 / ms) if (fa3 and ms) else None
            note = r.get("error") or r.get("note") or ""
            lines.append(
                f"| {r.get('kind', '')} | {r.get('name', '')} | {r.get('impl', '')} | {_fmt(ms, '.2f')} | {_fmt(sp, '.1f')} | "
                f"{_fmt(r.get('tflops'), '.0f')} | {_fmt(r.get('peak_gib'), '.1f')} | {_fmt(r.get('one_time_ms'), '.0f')} | "
                f"{_fmt(r.get('plan_ms'), '.1f')} | {_fmt(r.get('err_dense'), '.1e')} | {_fmt(r.get('err_ref'), '.1e')} | "
                f"{note.replace('|', '/')} |"
            )
        lines.append("")
    return "\n".join(lines)


def plot(results, path: str) -> None:
    """Log-log latency vs N, one line per config (needs matplotlib: pip install sparsekit[plot])."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError as exc:
        raise ImportError("the plot needs matplotlib: pip install sparsekit[plot]") from exc
    series = {}
    for r in results:
        if r.get("median_ms") and r.get("kind") in ("dense", "sparse"):
            series.setdefault(f"{r['name']} [{r['impl']}]", []).append((r["n"], r["median_ms"]))
    fig, ax = plt.subplots(figsize=(9, 6))
    for name, pts in sorted(series.items()):
        pts.sort()
        style = "--" if name.startswith(("FlashInfer", "SDPA")) else "-"
        ax.plot([p[0] for p in pts], [p[1] for p in pts], style, marker="o", label=name)
    ax.set_xscale("log", base=2)
    ax.set_yscale("log")
    ax.set_xlabel("sequence length N")
    ax.set_ylabel("prefill attention, one layer (ms)")
    ax.set_title("sparsekit bench: latency vs N")
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
