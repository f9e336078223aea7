"""Perplexity, fidelity and locality sections of the eval report (markdown, CSV and plots)."""

from __future__ import annotations

import json
import math
from pathlib import Path

from .common import pyplot, write_csv

__all__ = ["sections", "MAX_PER_LAYER_COLUMNS"]

#: above this many configs the per-layer fidelity table shows the cosine only (ρ stays in the CSV)
MAX_PER_LAYER_COLUMNS = 8


def _ppl_section(out: Path) -> list:
    path = out / "ppl.json"
    if not path.exists():
        return []
    res = json.loads(path.read_text())
    rows = res.get("rows", [])
    if not rows:
        return []
    lines = ["## Perplexity", "",
             f"Token NLL over the last {res['last']} tokens of the first {res['length']} tokens of each text "
             "(Python standard-library sources of this interpreter); one prefill per config, no cache.", ""]
    dense = {r["text"]: r for r in rows if r["config"] == "dense"}
    lines.append("| text | config | mean NLL | perplexity | Δppl vs dense | tokens worse than dense | seconds |")
    lines.append("|---|---|---|---|---|---|---|")
    flat = []
    for r in rows:
        d = dense.get(r["text"])
        dppl = f"{r['ppl'] - d['ppl']:+.3f}" if d else ""
        worse = ""
        if d and r is not d:
            a, b = r["nll_tokens"], d["nll_tokens"]
            worse = f"{sum(x > y for x, y in zip(a, b))}/{len(a)}"
        lines.append(f"| {r['text']} | {r['config']} | {r['nll']:.4f} | {r['ppl']:.3f} | {dppl} | {worse} | {r['seconds']:.0f} |")
        flat.append({k: v for k, v in r.items() if k != "nll_tokens"})
    write_csv(flat, out / "ppl_summary.csv")
    lines.append("")
    return lines


def _plot_fidelity(res: dict, path: Path) -> None:
    plt = pyplot()
    if plt is None:
        return
    layers = res["layers"]
    fig, axes = plt.subplots(1, 2, figsize=(13, 3.8))
    for label, st in res["configs"].items():
        n = len(st["cos_mean"])
        axes[0].plot(layers[:n], st["cos_mean"], marker=".", label=label)
        rho = [math.nan if x is None else x for x in st["rho_mean"]]
        axes[1].plot(layers[:n], rho, marker=".", label=label)
    axes[0].set_title("cosine(config output, dense output), mean over heads x rows")
    axes[1].set_title("Spearman rank corr. of attention rows, mean")
    for ax in axes:
        ax.set_xlabel("layer")
        ax.grid(alpha=0.3)
    axes[0].set_ylabel("cosine")
    axes[1].set_ylabel("Spearman ρ")
    axes[1].legend(fontsize=7, loc="upper left", bbox_to_anchor=(1.01, 1.0), borderaxespad=0)
    fig.suptitle(f"{res['meta'].get('model', '')}: {res['text']}, {res['length']} tokens, query rows "
                 f"{res['rows'][0]}..{res['rows'][1]}", fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def _fidelity_grid(res: dict) -> list:
    """Mean cosine (and mean ρ) over layers as a backend x corrector grid, when the configs span two or more
    backends; ``[]`` otherwise."""
    from .verdict import split_spec

    backends: dict = {}
    columns: list = []
    for label, st in res["configs"].items():
        b, c = split_spec(st.get("spec"))
        if b is None or not st["cos_mean"]:
            continue
        backends.setdefault(b, {})[c] = (label, st)
        if c is not None and c not in columns:
            columns.append(c)
    if len(backends) < 2:
        return []

    def cell(entry) -> str:
        if entry is None:
            return ""
        st = entry[1]
        cos = sum(st["cos_mean"]) / len(st["cos_mean"])
        rho = [x for x in st["rho_mean"] if x is not None]
        return f"{cos:.3f}" + (f" (ρ {sum(rho) / len(rho):.2f})" if rho else "")

    lines = ["", "Output cosine by backend and corrector, mean over layers (Spearman ρ in brackets):", "",
             "| backend | no correction | " + " | ".join(f"`{c}`" for c in columns) + " |",
             "|---|---|" + "---|" * len(columns)]
    for b, by in backends.items():
        name = by[None][0] if None in by else b.split("(")[0]
        lines.append(f"| {name} | {cell(by.get(None))} | " + " | ".join(cell(by.get(c)) for c in columns) + " |")
    return lines


def _fidelity_section(out: Path) -> list:
    path = out / "fidelity.json"
    if not path.exists():
        return []
    res = json.loads(path.read_text())
    if not res.get("configs"):
        return []
    _plot_fidelity(res, out / "fidelity_per_layer.png")
    lines = ["## Attention fidelity per layer (Δ paper Fig. 3)", "",
             f"Input: first {res['length']} tokens of `{res['text']}`; dense q/k/v captured per layer, each config run on "
             f"them; query rows {res['rows'][0]}..{res['rows'][1]} (just before the largest dense tail). "
             "Mean over heads x rows; plot: `fidelity_per_layer.png`.", ""]
    labels = list(res["configs"])
    layers = res["layers"]
    wide = len(labels) > MAX_PER_LAYER_COLUMNS  # a large grid: cosine only per layer (ρ in the CSV)
    if wide:
        lines += [f"Per layer: output cosine ({len(labels)} configs; Spearman ρ per layer in `fidelity_summary.csv`).", ""]
    lines.append("| layer | " + " | ".join(f"cos {l}" for l in labels)
                 + ("" if wide else " | " + " | ".join(f"ρ {l}" for l in labels)) + " |")
    lines.append("|---|" + "---|" * ((1 if wide else 2) * len(labels)))
    flat = []
    for i, layer in enumerate(layers):
        if any(i >= len(res["configs"][l]["cos_mean"]) for l in labels):
            break
        cos = [f"{res['configs'][l]['cos_mean'][i]:.3f}" for l in labels]
        rho = [("" if res["configs"][l]["rho_mean"][i] is None else f"{res['configs'][l]['rho_mean'][i]:.3f}") for l in labels]
        lines.append(f"| {layer} | " + " | ".join(cos) + ("" if wide else " | " + " | ".join(rho)) + " |")
        for l in labels:
            st = res["configs"][l]
            flat.append(dict(layer=layer, config=l, **{k: st[k][i] for k in st if isinstance(st[k], list)}))
    if flat:
        write_csv(flat, out / "fidelity_summary.csv")
        means = []
        # density per layer (pairs of the config's plan / dense causal pairs), stored by newer runs
        with_density = any(res["configs"][l].get("density") for l in labels)
        for l in labels:
            c = [x for x in res["configs"][l]["cos_mean"]]
            r = [x for x in res["configs"][l]["rho_mean"] if x is not None]
            err = [x for x in res["configs"][l]["recon_err"] if x is not None]
            dens = res["configs"][l].get("density") or []
            line = (f"| {l} | {sum(c) / len(c):.3f} | {min(c):.3f} | "
                    f"{(sum(r) / len(r)) if r else float('nan'):.3f} | {max(err) if err else float('nan'):.1e} |")
            if with_density:
                line += f" {100 * sum(dens) / len(dens):.1f}% |" if dens else " |"
            means.append(line)
        head = "| config | cos, mean over layers | cos, worst layer | ρ, mean over layers | max recon err |"
        lines += ["", head + (" density, mean over layers |" if with_density else ""),
                  "|---|---|---|---|---|" + ("---|" if with_density else "")] + means
        lines += _fidelity_grid(res)
        unread = [l for l in labels if res["configs"][l]["cos_mean"]
                  and all(x is None for x in res["configs"][l]["rho_mean"])]
        if unread:
            lines += ["", "ρ and the reconstruction error are not measured for " + ", ".join(f"`{l}`" for l in unread)
                      + ": the corrector is not a fixed linear mix of sparse and dense rows and gives no effective "
                      "attention rows (cosine is measured on its outputs)."]
    lines.append("")
    return lines


def _locality_section(out: Path) -> list:
    path = out / "locality.json"
    if not path.exists():
        return []
    res = json.loads(path.read_text())
    layers = res.get("layers", {})
    if not layers:
        return []
    _plot_locality(res, out / "locality.png")
    g = res["gamma"]
    lines = ["## Δ locality (does the anchor row's Δ fit the rows after it?)", "",
             f"Input: first {res['length']} tokens of `{res['text']}`, backend `{res['backend']}`, γ = {g}, body rows "
             f"0..{res['n_body'] - 1}. Energy ratio Σ‖Δ_row − Δ̂_row‖² / Σ‖Δ_row‖² over the γ−1 rows after each anchor "
             "(below 1: the correction removes error; above 1: it adds error), and the fraction of (anchor, head, row) "
             "where it removes error; cos: mean cosine of the row's Δ with the anchor's Δ (the paper's Fig. 6b). "
             "Plot: `locality.png`.", "",
             "| layer | ratio, repeat | ratio, linear | helped, repeat | helped, linear | cos(Δ_row, Δ_anchor) |",
             "|---|---|---|---|---|---|"]

    def row(name, st):
        cos = f"{st['pooled_cos']:.2f}" if "pooled_cos" in st else ""
        return (f"| {name} | {st['pooled_ratio_repeat']:.2f} | {st['pooled_ratio_linear']:.2f} | "
                f"{100 * st['pooled_helped_repeat']:.0f}% | {100 * st['pooled_helped_linear']:.0f}% | {cos} |")

    for layer, st in layers.items():
        lines.append(row(layer, st))
    n = len(layers)
    keys = [k for k in next(iter(layers.values())) if k.startswith("pooled_")]
    lines.append(row("mean", {k: sum(st[k] for st in layers.values()) / n for k in keys}))
    by_j = [sum(st["ratio_repeat"][j] for st in layers.values()) / n for j in range(g)]
    marks = [j for j in (1, 2, 4, 8, 16, 32, g - 1) if j < g]
    lines += ["", "Energy ratio (repeat) by offset from the anchor, mean over layers: "
              + ", ".join(f"j={j}: {by_j[j]:.2f}" for j in marks) + ".", ""]
    return lines


def _plot_locality(res: dict, path: Path) -> None:
    plt = pyplot()
    if plt is None:
        return
    fig, axes = plt.subplots(1, 2, figsize=(11, 3.6))
    layers = res["layers"]
    j = list(range(res["gamma"]))
    for layer, st in layers.items():
        axes[0].plot(j[1:], st["ratio_repeat"][1:], color="tab:blue", alpha=0.25, lw=0.8)
    n = len(layers)
    for name, color in (("repeat", "tab:blue"), ("linear", "tab:orange")):
        mean = [sum(st[f"ratio_{name}"][i] for st in layers.values()) / n for i in j]
        axes[0].plot(j[1:], mean[1:], color=color, lw=2, label=f"{name}, mean over layers")
    axes[0].axhline(1.0, color="k", lw=0.8, ls="--")
    axes[0].set_xlabel("offset from anchor row")
    axes[0].set_ylabel("‖Δ − Δ̂‖² / ‖Δ‖²")
    axes[0].set_title("error left after the correction (1 = no correction)")
    axes[0].legend(fontsize=7)
    keys = list(layers)
    axes[1].bar([int(k) - 0.2 for k in keys], [layers[k]["pooled_ratio_repeat"] for k in keys], 0.4, label="repeat")
    axes[1].bar([int(k) + 0.2 for k in keys], [layers[k]["pooled_ratio_linear"] for k in keys], 0.4, label="linear")
    axes[1].axhline(1.0, color="k", lw=0.8, ls="--")
    axes[1].set_xlabel("layer")
    axes[1].set_title("per layer, pooled over offsets")
    axes[1].legend(fontsize=7)
    for ax in axes:
        ax.grid(alpha=0.3)
    fig.suptitle(f"{res['meta'].get('model', '')}: {res['text']}, {res['length']} tokens, {res['backend']}, "
                 f"γ={res['gamma']}", fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def sections(out: Path) -> list:
    out = Path(out)
    return _ppl_section(out) + _fidelity_section(out) + _locality_section(out)
