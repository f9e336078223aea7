"""Issue 13's table from ``sparsekit bench`` runs of streaming and streaming + Δ (``bash bench/gpu.sh s13``).

    python bench/streaming_table.py RUN_DIR [RUN_DIR ...] --out DIR

For every N: dense fa3, streaming alone and + Δ(γ=64) in each run (ms, × fa3 of the same run), the
density, TFLOP/s over the pairs the config computes, the visible-pair bound (1 / density: the speed-up
at fa3's own per-pair rate) and the fraction of it reached, peak memory against fa3's, the steps, and
the run-to-run spread. Writes ``DIR/README.md`` (the table) and ``DIR/speedup.png`` when matplotlib is
installed.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path


def _load(run: Path) -> dict:
    d = json.loads((run / "bench.json").read_text())
    by = {}
    for r in d["results"]:
        by[(r["n"], r["name"])] = r
    return dict(env=d["env"], rows=by, name=run.name)


def _k(n: int) -> str:
    return f"{n >> 20}M" if n >= 1 << 20 and n % (1 << 20) == 0 else f"{n >> 10}K"


def build(runs: list, out: Path) -> str:
    dense = "FlashInfer fa3"
    names = sorted({name for r in runs for (_, name) in r["rows"] if name != dense}, key=len)
    ns = sorted({n for r in runs for (n, _) in r["rows"]})
    env = runs[0]["env"]
    lines = [
        "# Streaming + Δ against dense fa3 (issue 13)",
        "",
        f"{env['device']}, {env['date']}; torch {env['torch']}, triton {env['triton']}, flashinfer "
        f"{env['flashinfer']}. One Llama-3.1-8B layer (B=1, 32 query heads, 8 KV heads, D=128, bf16), structured "
        "inputs. Each run is one `sparsekit bench` process (`RUN=k bash bench/gpu.sh s13`): fa3 and the configs "
        "are timed in the same run, ratios are within a run. total = plan + run (medians of CUDA-event timings: "
        "7 reps below 512K, 3 from 512K on). Bound = 1 / density: the speed-up if every computed pair ran at "
        "fa3's own per-pair rate in that run; fraction = × fa3 / bound. TFLOP/s count the pairs the config "
        "computes (4·D FLOPs per pair and query head) over total ms.",
        "",
        f"Runs: {', '.join(r['name'] for r in runs)}.",
        "",
    ]
    for name in names:
        lines += [f"## {name}", "",
                  "| N | fa3 ms | total ms | × fa3 | bound | fraction of bound | TFLOP/s | fa3 TFLOP/s | "
                  "peak GiB (fa3) | steps ms (sparse / dense rows / combine) | plan ms |",
                  "|---|---|---|---|---|---|---|---|---|---|---|"]
        for n in ns:
            got = [(r["rows"].get((n, dense)), r["rows"].get((n, name))) for r in runs]
            got = [(d, c) for d, c in got if d and c]
            if not got:
                continue
            x = [d["median_ms"] / c["total_ms"] for d, c in got]
            bound = 1.0 / got[0][1]["density"]
            spread = (max(x) - min(x)) / min(x) if len(x) > 1 else 0.0

            def each(f):
                return " / ".join(f(d, c) for d, c in got)

            steps = each(lambda d, c: "/".join(f"{c.get('steps_ms', {}).get(s, 0):.1f}"
                                               for s in ("sparse", "dense rows", "combine")))
            mem = each(lambda d, c: f"{c['peak_gib']:.2f} ({d['peak_gib']:.2f}, {c['peak_gib'] / d['peak_gib'] - 1:+.1%})")
            fa3_ms = each(lambda d, c: f"{d['median_ms']:,.1f}")
            tot = each(lambda d, c: f"{c['total_ms']:.2f}")
            xs = " / ".join(f"{v:.2f}" for v in x)
            frac = " / ".join(f"{v / bound:.0%}" for v in x)
            tf = each(lambda d, c: f"{c['tflops']:.0f}")
            tf_d = each(lambda d, c: f"{d['tflops']:.0f}")
            plan = each(lambda d, c: f"{c['plan_ms']:.2f}")
            lines.append(f"| {_k(n)} | {fa3_ms} | {tot} | {xs} (spread {spread:.1%}) | {bound:.1f} | {frac} | {tf} | "
                         f"{tf_d} | {mem} | {steps} | {plan} |")
        lines.append("")
    text = "\n".join(lines)
    out.mkdir(parents=True, exist_ok=True)
    (out / "README.md").write_text(text)
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return text
    fig, ax = plt.subplots(figsize=(6.4, 4))
    for name in names:
        for i, r in enumerate(runs):
            pts = [(n, r["rows"][(n, dense)]["median_ms"] / r["rows"][(n, name)]["total_ms"])
                   for n in ns if (n, dense) in r["rows"] and (n, name) in r["rows"]]
            ax.plot([p[0] for p in pts], [p[1] for p in pts], "o-", label=f"{name} ({r['name']})", alpha=0.8)
        b = [(n, 1 / runs[0]["rows"][(n, name)]["density"]) for n in ns if (n, name) in runs[0]["rows"]]
        ax.plot([p[0] for p in b], [p[1] for p in b], "k:", alpha=0.5)
    ax.set_xscale("log", base=2)
    ax.set_yscale("log")
    ax.set_xlabel("N (tokens)")
    ax.set_ylabel("× dense fa3 (dotted: visible-pair bound)")
    ax.legend(fontsize=6)
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(out / "speedup.png", dpi=120)
    return text


def main(argv=None) -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("runs", nargs="+", type=Path)
    ap.add_argument("--out", type=Path, required=True)
    a = ap.parse_args(argv)
    print(build([_load(r) for r in a.runs], a.out))
    return 0


if __name__ == "__main__":
    sys.exit(main())
