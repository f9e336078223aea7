"""Tables (CSV, JSON, markdown) and plots from the stored eval results.

Reads whatever exists under the results folder (``retrieval.jsonl``, ``ppl.json``,
``fidelity.json``, ``locality.json``), so a partial run still yields tables; the verdict
(:mod:`sparsekit.eval.verdict`) opens ``summary.md`` and is written to ``verdict.md``.
"""

from __future__ import annotations

import json
import math
import re
from pathlib import Path

from . import report_extra
from .common import complete_records, has_results, load_retrieval, pyplot, write_csv
from .stats import wilson
from .tasks import recall

__all__ = ["build_report", "retrieval_summary", "paired", "pyplot"]


def _order(labels, preferred) -> list:
    pref = [p for p in preferred if p in labels]
    return pref + sorted(l for l in labels if l not in pref)


def paired(records: list, a: str, b: str, length: int, task: str):
    """(wins of a over b, losses, n pairs) on the same (sample, question)."""
    def key(r):
        return r["sample"], r.get("context", ""), r["q"]

    ka = {key(r): r["correct"] for r in records if r["config"] == a and r["length"] == length and r["task"] == task}
    kb = {key(r): r["correct"] for r in records if r["config"] == b and r["length"] == length and r["task"] == task}
    common = sorted(set(ka) & set(kb))
    wins = sum(ka[k] and not kb[k] for k in common)
    losses = sum(kb[k] and not ka[k] for k in common)
    return wins, losses, len(common)


def retrieval_summary(records: list, configs_order=None) -> list:
    """Rows ``{length, task, config, n, correct, acc, lo, hi, samples, ...}``; only samples every config finished."""
    rows = []
    labels = _order({r["config"] for r in records}, configs_order or [])
    for L in sorted({r["length"] for r in records}):
        # keep samples that every config has finished, so the comparison is paired
        recL = complete_records([r for r in records if r["length"] == L])
        refs, plain_labels = _references(recL, labels)
        tasks = _order({r["task"] for r in recL}, ["passkey", "multikey", "multiquery", "multivalue", "vt"])
        for t in tasks + ["all"]:
            for c in labels:
                sel = [r for r in recL if r["config"] == c and (t == "all" or r["task"] == t)]
                if not sel:
                    continue
                k, n = sum(r["correct"] for r in sel), len(sel)
                lo, hi = wilson(k, n)
                first = [r for r in sel if r["q"] == 0]  # one per prefill
                rec = sum(recall(r["task"], r["answers"], r["output"]) for r in sel) / n
                row = dict(length=L, task=t, config=c, n=n, recall=rec, samples=len({(r["sample"], r.get("context", "")) for r in sel}),
                           correct=k, acc=k / n, lo=lo, hi=hi, spec=sel[0].get("spec", ""),
                           prefill_s=sum(r["prefill_s"] for r in first) / max(1, len(first)))
                if t != "all":
                    for name, ref in (("dense", refs[c].get("dense")), ("stream", refs[c].get("plain")),
                                      ("tail", refs[c].get("tail"))):
                        if ref and ref != c:
                            w, l, _ = paired(recL, c, ref, L, t)
                            row[f"vs_{name}"] = f"+{w}/-{l}"
                rows.append(row)
        # gap closed (task 'all'): (acc - plain backend) / (dense - plain backend), each config against the
        # plain config of its own backend (the backend itself: 0%)
        acc = {r["config"]: r["acc"] for r in rows if r["length"] == L and r["task"] == "all"}
        dense = next((d for c in labels for d in [refs.get(c, {}).get("dense")] if d), None)
        for r in rows:
            if r["length"] != L or r["task"] != "all":
                continue
            plain = refs.get(r["config"], {}).get("plain")
            if plain is None and r["config"] in plain_labels:
                plain = r["config"]
            if plain is None and dense == r["config"]:
                plain = next(iter(plain_labels), None)  # dense closes 100% of any backend's gap
            if dense in acc and plain in acc:
                gap = acc[dense] - acc[plain]
                r["gap_closed"] = (r["acc"] - acc[plain]) / gap if gap > 0 else float("nan")
    return rows


def _references(recL: list, labels: list) -> tuple:
    """``(refs, plain_labels)``: each config's references (:func:`sparsekit.eval.verdict.references`:
    dense, the plain backend, the tail-only control of the same backend) and the plain-backend labels."""
    from .verdict import references, split_spec

    spec = {}
    for r in recL:
        spec.setdefault(r["config"], r.get("spec"))
    present = [c for c in labels if c in spec]
    refs = references([(c, spec[c]) for c in present])
    plain = [c for c in present if split_spec(spec[c])[0] is not None and split_spec(spec[c])[1] is None]
    return refs, plain


def _fmt_acc(r):
    cell = f"{100 * r['acc']:.0f}% ({r['correct']}/{r['n']})"
    if r["task"] in ("multivalue", "vt"):
        cell += f", recall {100 * r['recall']:.0f}%"
    return cell


def _retrieval_markdown(rows: list, meta: dict) -> str:
    lines = ["## Retrieval accuracy (exact match)", ""]
    if meta:
        lines.append(
            f"Model {meta.get('model')}, tasks {', '.join(meta.get('tasks', []))}, "
            f"{'shared context per sample' if meta.get('shared') else 'one context per task'}, seed {meta.get('seed')}."
        )
        lines.append("")
    for L in sorted({r["length"] for r in rows}):
        sub = [r for r in rows if r["length"] == L]
        tasks = list(dict.fromkeys(r["task"] for r in sub))
        cfgs = list(dict.fromkeys(r["config"] for r in sub))
        per_task = [r["samples"] for r in sub if r["task"] != "all"]
        ns = f"{min(per_task)}" if min(per_task) == max(per_task) else f"{min(per_task)}-{max(per_task)}"
        lines += [f"### {L} tokens ({ns} samples per task and config, paired)", ""]
        specs = []
        for c in cfgs:
            spec = next(r["spec"] for r in sub if r["config"] == c)
            specs.append(f"{c} = `{spec}`")
        lines += ["Specs: " + "; ".join(specs) + ".", ""]
        lines.append("| config | " + " | ".join(tasks) + " | gap closed | prefill s |")
        lines.append("|---|" + "---|" * (len(tasks) + 2))
        for c in cfgs:
            cells = []
            for t in tasks:
                r = next((r for r in sub if r["config"] == c and r["task"] == t), None)
                cells.append(_fmt_acc(r) if r else "")
            allr = next((r for r in sub if r["config"] == c and r["task"] == "all"), None)
            gc = allr.get("gap_closed") if allr else None
            gcs = "" if gc is None or (isinstance(gc, float) and math.isnan(gc)) else f"{100 * gc:.0f}%"
            lines.append(f"| {c} | " + " | ".join(cells) + f" | {gcs} | {allr['prefill_s']:.1f} |")
        lines.append("")
        lines.append("Gap closed: (accuracy − the plain backend's) / (dense − the plain backend's), each config "
                     "against the plain config of its own backend.")
        lines.append("")
        lines.append("Paired wins/losses per task (same sample and question): vs dense / vs no correction (the "
                     "same backend alone) / vs the tail-only control (the same backend + tailonly)")
        lines.append("")
        lines.append("| config | " + " | ".join(t for t in tasks if t != "all") + " |")
        lines.append("|---|" + "---|" * len([t for t in tasks if t != "all"]))
        for c in cfgs:
            cells = []
            for t in tasks:
                if t == "all":
                    continue
                r = next((r for r in sub if r["config"] == c and r["task"] == t), None)
                cells.append(f"{r.get('vs_dense', '')} / {r.get('vs_stream', '')} / {r.get('vs_tail', '')}" if r else "")
            lines.append(f"| {c} | " + " | ".join(cells) + " |")
        lines.append("")
    return "\n".join(lines)


def _plot_retrieval(rows: list, path: Path) -> None:
    plt = pyplot()
    if plt is None:
        return
    tasks = list(dict.fromkeys(r["task"] for r in rows))
    cfgs = list(dict.fromkeys(r["config"] for r in rows))
    fig, axes = plt.subplots(1, len(tasks), figsize=(3.6 * len(tasks), 3.4), squeeze=False, sharey=True)
    for ax, t in zip(axes[0], tasks):
        for c in cfgs:
            pts = sorted((r["length"], r["acc"], r["lo"], r["hi"]) for r in rows if r["task"] == t and r["config"] == c)
            if not pts:
                continue
            xs = [p[0] for p in pts]
            # max(0, .): a Wilson bound can miss the estimate by a rounding error (6/6: hi = 1 - 1e-16)
            ax.errorbar(xs, [p[1] for p in pts], yerr=[[max(0.0, p[1] - p[2]) for p in pts],
                                                       [max(0.0, p[3] - p[1]) for p in pts]],
                        marker="o", capsize=2, label=c)
        ax.set_xscale("log", base=2)
        ax.set_title(t)
        ax.set_xlabel("context tokens")
        ax.set_ylim(-0.02, 1.02)
    axes[0][0].set_ylabel("exact match (95% Wilson CI)")
    axes[0][-1].legend(fontsize=7, loc="upper left", bbox_to_anchor=(1.02, 1.0), borderaxespad=0)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def build_report(out: Path) -> Path:
    """Write ``summary.md`` and ``verdict.md`` (+ CSV/JSON tables and PNG plots) from the results under ``out``.

    The verdict (:mod:`sparsekit.eval.verdict`) opens ``summary.md`` and is also written on its own.
    Raises ``FileNotFoundError`` when ``out`` does not exist or holds no results.
    """
    from .verdict import write_verdict

    out = Path(out)
    if not out.is_dir():
        raise FileNotFoundError(f"results folder {str(out)!r} does not exist")
    if not has_results(out):
        raise FileNotFoundError(
            f"results folder {str(out)!r} holds no eval results (retrieval.jsonl, ppl.json, fidelity.json or "
            f"locality.json); run e.g. `sparsekit eval retrieval --out {out}` first"
        )
    parts = ["# sparsekit eval results", ""]
    if (out / "commands.txt").exists():
        parts += ["Commands that produced these files:", "", "```", (out / "commands.txt").read_text().strip(), "```", ""]
    verdict = write_verdict(out).read_text(encoding="utf-8")
    parts += [re.sub(r"^(#+) ", r"#\1 ", verdict.strip(), flags=re.M), "", "(The verdict is also in `verdict.md`.)", ""]
    records, meta = load_retrieval(out)
    if records:
        order = [c["label"] for c in meta.get("configs", [])] or None
        rows = retrieval_summary(records, order)
        write_csv(rows, out / "retrieval_summary.csv")
        (out / "retrieval_summary.json").write_text(json.dumps(rows, indent=1))
        parts.append(_retrieval_markdown(rows, meta))
        _plot_retrieval(rows, out / "accuracy_vs_length.png")
    parts += report_extra.sections(out)
    path = out / "summary.md"
    path.write_text("\n".join(parts) + "\n", encoding="utf-8")
    return path
