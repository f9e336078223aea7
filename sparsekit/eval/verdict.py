"""The verdict: a short per-config judgement from the stored retrieval and perplexity results.

Every config is compared, on the same questions and the same scored tokens, with three references
when they exist among the configs:

* ``dense`` - the model's own attention (spec ``None`` / ``"sdpa"``);
* the **tail-only control** - the config's backend with the ``tailonly`` corrector (only the dense
  tail every anchored corrector computes, e.g. label ``streaming+tail``), preferring the same γ;
* **no correction** - the plain backend (the config's spec without its corrector).

Retrieval: accuracy difference in points over all questions of a length (tasks pooled), 95% interval
from a paired bootstrap over contexts (questions of one context are resampled together), paired
wins/losses. Perplexity: ratio ``exp(mean ΔNLL)`` over the scored tokens of every text, 95% interval
from a paired bootstrap over blocks of :data:`TOKEN_BLOCK` consecutive tokens. A difference is called
"worse" or "better" only when its interval excludes no difference (and, for accuracy, the exact sign
test of the paired wins/losses rejects a tie at 5%); otherwise it is within noise.

Attention density and the corrector's extra compute are the pairs the prefills attended, counted by
:mod:`sparsekit.hf` (``LayerState.pairs``) and stored with the results (``pairs``), summed over the
prefills; for results stored without them, :meth:`sparsekit.SparseAttention.cost` at the measured length
(``corrector_pairs / dense_pairs``), unknown for backends whose pattern depends on the data.

Entry points: :func:`build_verdict` (markdown from a results folder) and :func:`write_verdict`
(``verdict.md``); :func:`retrieval_measurements`, :func:`perplexity_measurement` and
:func:`verdict_markdown` are the pure steps, usable on constructed records.
"""

from __future__ import annotations

import math
import re
import statistics
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional

from .common import complete_records, load_json, load_retrieval
from .stats import Interval, paired_difference, perplexity_ratio, sign_test, token_blocks, wins_losses

__all__ = [
    "N_BOOT",
    "SEED",
    "TOKEN_BLOCK",
    "Comparison",
    "Row",
    "Measurement",
    "split_spec",
    "references",
    "attention_cost",
    "measured_cost",
    "retrieval_measurements",
    "perplexity_measurement",
    "verdict_markdown",
    "build_verdict",
    "write_verdict",
]

N_BOOT = 2000  # bootstrap resamples
SEED = 0  # bootstrap seed: the same results give the same verdict
TOKEN_BLOCK = 32  # perplexity: tokens resampled together (neighbouring tokens' losses are correlated)

_REF_NAMES = {"dense": "dense", "tail": "the tail-only control", "plain": "no correction"}


# ------------------------------------------------------------------------------ data
@dataclass(frozen=True)
class Comparison:
    """One config against one reference on one measurement.

    role : ``"dense"``, ``"tail"`` or ``"plain"``
    ref : label of the reference config
    interval : accuracy difference (fraction, config minus reference) or perplexity ratio (config / reference)
    wins, losses : paired items where the config is better / worse than the reference
    ref_value : the reference's accuracy or perplexity
    higher_is_better : True for accuracy, False for perplexity
    """

    role: str
    ref: str
    interval: Interval
    wins: int
    losses: int
    ref_value: float
    higher_is_better: bool

    @property
    def outcome(self) -> str:
        """``"better"``, ``"worse"``, ``"within"`` (no measurable difference), ``"same"`` (no item differs)
        or ``"unknown"`` (too few contexts for an interval).

        Better/worse need the interval to exclude no difference; for accuracy (per-question outcomes)
        also the exact sign test of the paired wins/losses at the 5% level, which keeps a handful of
        questions from being called a difference where the bootstrap is too optimistic.
        """
        where = self.interval.compare(0.0 if self.higher_is_better else 1.0)
        if where in ("above", "below"):
            if self.higher_is_better and sign_test(self.wins, self.losses) >= 0.05:
                return "within"
            return "better" if (where == "above") == self.higher_is_better else "worse"
        return where


@dataclass
class Row:
    """One config in one measurement.

    value : accuracy (fraction) or perplexity; detail : e.g. ``"47/179"``;
    cost : ``(density, backend share, corrector share)`` of dense causal pairs, or None when unknown;
    comparisons : role -> :class:`Comparison`
    """

    label: str
    spec: Optional[str]
    value: float
    detail: str = ""
    cost: Optional[tuple] = None
    comparisons: dict = field(default_factory=dict)

    @property
    def corrector(self) -> Optional[str]:
        return _corrector_name(split_spec(self.spec)[1])

    @property
    def control(self) -> bool:
        return is_control(split_spec(self.spec)[1])


@dataclass
class Measurement:
    """One table of the verdict: ``kind`` ``"retrieval"`` or ``"perplexity"``; ``where`` e.g.
    ``"at 4096 tokens"``; ``n_tokens`` the prefill length the costs are computed at."""

    kind: str
    title: str
    where: str
    n_tokens: int
    rows: list


# ------------------------------------------------------------------------------ roles
def split_spec(spec: Optional[str]) -> tuple:
    """``(backend, corrector)`` spec strings of a config spec, whitespace removed; ``(None, None)`` for the
    model's own attention (``None`` or ``"sdpa"``).

    >>> split_spec("streaming(window=8, sink=2)+delta(gamma=4)")
    ('streaming(window=8,sink=2)', 'delta(gamma=4)')
    """
    if spec is None or spec.strip() in ("", "sdpa"):
        return None, None
    s = "".join(spec.split())
    parts, depth, cur = [], 0, ""
    for ch in s:
        depth += ch == "("
        depth -= ch == ")"
        if ch == "+" and depth == 0:
            parts.append(cur)
            cur = ""
        else:
            cur += ch
    parts.append(cur)
    return parts[0], (parts[1] if len(parts) > 1 else None)


def _corrector_name(corrector: Optional[str]) -> Optional[str]:
    return None if corrector is None else corrector.split("(")[0].lower()


def is_control(corrector: Optional[str]) -> bool:
    """Whether a corrector spec names an ablation control (its class sets ``control = True``, as
    ``tailonly`` does); False for no corrector or one that does not build."""
    if corrector is None:
        return False
    from sparsekit.spec import build

    try:
        return bool(getattr(build("corrector", corrector), "control", False))
    except Exception:
        return False


def _canonical_backend(backend: str) -> str:
    """The backend spec with every option spelt out (``hip(sink=16,k=192)`` and ``hip(k=192,sink=16)`` are one
    backend); the spec as written when it does not build here (e.g. a plug-in that is not installed)."""
    from sparsekit.spec import build

    try:
        return str(build("backend", backend))
    except Exception:
        return backend


def _gamma(corrector: Optional[str]) -> Optional[str]:
    m = re.search(r"gamma=(\d+)", corrector or "")
    return m.group(1) if m else None


def references(configs: list) -> dict:
    """For ``configs`` ``[(label, spec)]``: ``{label: {role: reference label}}`` with roles ``dense``,
    ``tail`` (same backend + a control corrector such as ``tailonly``, same γ preferred) and ``plain``
    (same backend, no corrector).

    The dense reference is the config with spec None/``"sdpa"`` (labelled ``dense`` if several).
    """
    parsed = {label: split_spec(spec) for label, spec in configs}
    canon = {b: _canonical_backend(b) for b, _ in parsed.values() if b is not None}
    parsed = {label: (canon.get(b), c) for label, (b, c) in parsed.items()}
    dense = [label for label, (b, _) in parsed.items() if b is None]
    dense_ref = "dense" if "dense" in dense else (dense[0] if dense else None)
    out = {}
    for label, (backend, corr) in parsed.items():
        refs = {}
        if backend is None:
            out[label] = refs
            continue
        if dense_ref is not None:
            refs["dense"] = dense_ref
        if corr is not None:
            plain = [lab for lab, (b, c) in parsed.items() if b == backend and c is None]
            if plain:
                refs["plain"] = plain[0]
            if not is_control(corr):
                tails = [lab for lab, (b, c) in parsed.items() if b == backend and is_control(c)]
                same_gamma = [lab for lab in tails if _gamma(parsed[lab][1]) == _gamma(corr)]
                if same_gamma or tails:
                    refs["tail"] = (same_gamma or tails)[0]
        out[label] = refs
    return out


def measured_cost(pairs: list) -> Optional[tuple]:
    """``(density, backend share, corrector share)`` from the pair counts measured during prefills.

    ``pairs``: ``{"backend", "corrector", "dense"}`` dicts (one per prefill, as ``sparsekit eval``
    stores them from :func:`sparsekit.eval.plan.prefill_pairs`); summed before dividing, so longer
    prefills weigh more. None when there is none.
    """
    pairs = [p for p in pairs if p and p.get("dense")]
    if not pairs:
        return None
    b = sum(float(p["backend"]) for p in pairs)
    c = sum(float(p["corrector"]) for p in pairs)
    d = sum(float(p["dense"]) for p in pairs)
    return ((b + c) / d, b / d, c / d)


def attention_cost(spec: Optional[str], n: int) -> Optional[tuple]:
    """``(density, backend share, corrector share)`` of dense causal pairs for a prefill of ``n`` tokens.

    ``(1.0, 1.0, 0.0)`` for the model's own attention; None when the spec has no static cost (a backend
    whose pattern depends on the data) or cannot be built here (e.g. a plug-in that is not installed).
    """
    backend, _ = split_spec(spec)
    if backend is None:
        return (1.0, 1.0, 0.0)
    from sparsekit import SparseAttention

    try:
        c = SparseAttention.from_string(spec).cost(int(n))
    except (ValueError, ImportError, NotImplementedError, TypeError):
        return None
    if not c.dense_pairs:
        return None
    return (c.density, c.backend_pairs / c.dense_pairs, c.corrector_pairs / c.dense_pairs)


# ------------------------------------------------------------------------------ measurements
def _compare_acc(role, ref, mine: dict, theirs: dict, *, n_boot, seed) -> Comparison:
    keys = sorted(set(mine) & set(theirs), key=repr)
    a = [float(mine[k]) for k in keys]
    b = [float(theirs[k]) for k in keys]
    iv = paired_difference(a, b, clusters=[k[:2] for k in keys], n_boot=n_boot, seed=seed)
    w, l, _ = wins_losses(a, b)
    return Comparison(role, ref, iv, w, l, sum(b) / len(b) if b else float("nan"), True)


def retrieval_measurements(records: list, *, order: Optional[list] = None, n_boot: int = N_BOOT,
                           seed: int = SEED) -> list:
    """One :class:`Measurement` per length of the retrieval ``records`` (dicts as in ``retrieval.jsonl``).

    Only samples every config finished count (paired). Accuracy is exact match over all questions of
    the length, tasks pooled; comparisons resample whole contexts. ``order``: preferred config order.
    """
    out = []
    for L in sorted({r["length"] for r in records}):
        recL = complete_records([r for r in records if r["length"] == L])
        if not recL:
            continue
        labels = list(dict.fromkeys(r["config"] for r in recL))
        if order:
            labels = [c for c in order if c in labels] + [c for c in labels if c not in order]
        spec = {}
        for r in recL:
            spec.setdefault(r["config"], r.get("spec"))
        scores = {c: {} for c in labels}
        for r in recL:
            scores[r["config"]][(r["sample"], r.get("context", ""), r["q"])] = bool(r["correct"])
        refs = references([(c, spec[c]) for c in labels])
        n_ctx = int(statistics.median(r["n_tokens"] for r in recL))
        prefills: dict = {}  # the context prefill's pairs, once per (config, sample, context)
        for r in recL:
            prefills.setdefault(r["config"], {}).setdefault((r["sample"], r.get("context", "")), r.get("pairs"))
        rows = []
        for c in labels:
            k, n = sum(scores[c].values()), len(scores[c])
            cost = measured_cost(list(prefills.get(c, {}).values())) or attention_cost(spec[c], n_ctx)
            row = Row(c, spec[c], k / n, f"{k}/{n}", cost)
            for role, ref in refs[c].items():
                row.comparisons[role] = _compare_acc(role, ref, scores[c], scores[ref], n_boot=n_boot, seed=seed)
            rows.append(row)
        n_q = len(scores[labels[0]])
        n_s = len({(r["sample"], r.get("context", "")) for r in recL})
        title = f"Retrieval at {L} tokens ({n_q} questions over {n_s} contexts, tasks pooled, exact match)"
        out.append(Measurement("retrieval", title, f"at {L} tokens", n_ctx, rows))
    return out


def perplexity_measurement(ppl: dict, *, block: int = TOKEN_BLOCK, n_boot: int = N_BOOT,
                           seed: int = SEED) -> Optional[Measurement]:
    """A :class:`Measurement` from the contents of ``ppl.json`` (None without rows).

    Texts every config scored count; a config's perplexity is ``exp`` of its mean NLL over all their
    scored tokens (for one text, that text's perplexity). Comparisons pair the same tokens.
    """
    rows_in = (ppl or {}).get("rows", [])
    if not rows_in:
        return None
    labels = list(dict.fromkeys(r["config"] for r in rows_in))
    by = {(r["text"], r["config"]): r for r in rows_in}
    texts = [t for t in dict.fromkeys(r["text"] for r in rows_in) if all((t, c) in by for c in labels)]
    if not texts:
        return None
    spec = {c: next(r.get("spec") for r in rows_in if r["config"] == c) for c in labels}

    def tokens(c):
        if any("nll_tokens" not in by[(t, c)] for t in texts):
            return None
        return [x for t in texts for x in by[(t, c)]["nll_tokens"]]

    nll = {c: tokens(c) for c in labels}
    lengths = [len(by[(t, labels[0])].get("nll_tokens", [])) for t in texts]
    clusters = token_blocks(lengths, block)

    def mean_nll(c):
        if nll[c] is not None:
            return sum(nll[c]) / len(nll[c])
        return sum(by[(t, c)]["nll"] for t in texts) / len(texts)

    value = {c: math.exp(mean_nll(c)) for c in labels}
    refs = references([(c, spec[c]) for c in labels])
    length = int(ppl.get("length", 0))
    rows = []
    for c in labels:
        cost = measured_cost([by[(t, c)].get("pairs") for t in texts])
        if cost is None and length:
            cost = attention_cost(spec[c], length)
        row = Row(c, spec[c], value[c], "", cost)
        for role, ref in refs[c].items():
            if nll[c] is not None and nll[ref] is not None and len(nll[c]) == len(nll[ref]) == len(clusters):
                iv = perplexity_ratio(nll[c], nll[ref], clusters=clusters, n_boot=n_boot, seed=seed)
                w, l, _ = wins_losses(nll[ref], nll[c])  # lower NLL wins
            else:
                r = value[c] / value[ref]
                iv, w, l = Interval(r, float("nan"), float("nan")), 0, 0
            row.comparisons[role] = Comparison(role, ref, iv, w, l, value[ref], False)
        rows.append(row)
    n_tok = sum(lengths)
    title = (f"Perplexity over the last {ppl.get('last')} of the first {length} tokens of {', '.join(texts)} "
             f"({n_tok} scored tokens)")
    return Measurement("perplexity", title, "in perplexity", length, rows)


# ------------------------------------------------------------------------------ text
def _pts(x: float) -> str:
    v = int(round(100 * x))
    return f"{v:+d}"


def _pct(x: float) -> str:
    return f"{100 * x:.1f}%" if x < 0.995 else f"{100 * x:.0f}%"


def _cell(cmp: Optional[Comparison]) -> str:
    if cmp is None:
        return ""
    iv = cmp.interval
    if cmp.outcome == "same":
        return "identical"
    if cmp.higher_is_better:
        ci = f" [{_pts(iv.lo)}, {_pts(iv.hi)}]" if iv.known else ""
        return f"{_pts(iv.estimate)} pts{ci}, +{cmp.wins}/-{cmp.losses}"
    ci = f" [{iv.lo:.3f}, {iv.hi:.3f}]" if iv.known else ""
    return f"x{iv.estimate:.3f}{ci}"


def _table(m: Measurement) -> list:
    head = "accuracy" if m.kind == "retrieval" else "perplexity"
    lines = [f"## {m.title}", "",
             f"| config | density | corrector | {head} | vs dense | vs tail-only | vs no correction |",
             "|---|---|---|---|---|---|---|"]
    for r in m.rows:
        dens = "?" if r.cost is None else _pct(r.cost[0])
        corr = "" if r.cost is None or not r.corrector else f"+{_pct(r.cost[2])}"
        val = f"{100 * r.value:.0f}% ({r.detail})" if m.kind == "retrieval" else f"{r.value:.3f}"
        cells = [_cell(r.comparisons.get(role)) for role in ("dense", "tail", "plain")]
        lines.append(f"| {r.label} | {dens} | {corr} | {val} | " + " | ".join(cells) + " |")
    lines.append("")
    return lines


def _grid_table(m: Measurement) -> list:
    """The same measurement as a backend x corrector grid (rows: backends, columns: no correction, then each
    corrector spec in order of appearance; cells: value and density), when the configs span at least two
    backends; ``[]`` otherwise. The dense reference is stated above the grid."""
    backends: dict = {}  # canonical backend -> {corrector spec or None: row}
    shown: dict = {}  # canonical backend -> the spec as first written
    columns: list = []
    for r in m.rows:
        b, c = split_spec(r.spec)
        if b is None:
            continue
        key = _canonical_backend(b)
        shown.setdefault(key, b)
        backends.setdefault(key, {})[c] = r
        if c is not None and c not in columns:
            columns.append(c)
    if len(backends) < 2:
        return []

    def cell(r: Optional[Row]) -> str:
        if r is None:
            return ""
        val = f"{100 * r.value:.0f}%" if m.kind == "retrieval" else f"{r.value:.3f}"
        return val + ("" if r.cost is None else f" ({_pct(r.cost[0])})")

    dense = next((r for r in m.rows if split_spec(r.spec)[0] is None), None)
    head = f"Accuracy {m.where}" if m.kind == "retrieval" else "Perplexity"
    lines = [f"{head} by backend and corrector (density in brackets)"
             + (f"; dense: {cell(dense)}" if dense is not None else "") + ":", "",
             "| backend | no correction | " + " | ".join(f"`{c}`" for c in columns) + " |",
             "|---|---|" + "---|" * len(columns)]
    for key, by_corr in backends.items():
        b = shown[key]
        plain = by_corr.get(None)
        name = plain.label if plain is not None else b.split("(")[0]
        lines.append(f"| {name} (`{b}`) | {cell(plain)} | " + " | ".join(cell(by_corr.get(c)) for c in columns) + " |")
    lines.append("")
    return lines


def _detail(m: Measurement, row: Row, cmp: Comparison) -> str:
    """The numbers of one comparison, e.g. 'at 4096 tokens (-6 pts, 95% CI [-11, -1]; 3 wins / 9 losses)'."""
    iv = cmp.interval
    if cmp.outcome == "same":
        return f"{m.where} (every {'question' if cmp.higher_is_better else 'scored token'})"
    if cmp.higher_is_better:  # accuracy difference
        ci = f", 95% CI [{_pts(iv.lo)}, {_pts(iv.hi)}]" if iv.known else ", too few contexts for an interval"
        return f"{m.where} ({_pts(iv.estimate)} pts{ci}; {cmp.wins} wins / {cmp.losses} losses)"
    ci = f", 95% CI [{iv.lo:.3f}, {iv.hi:.3f}]" if iv.known else ""
    return f"{m.where} ({row.value:.2f} vs {cmp.ref_value:.2f}, ratio {iv.estimate:.3f}{ci})"


_LEAD = {"worse": "worse than", "better": "better than", "within": "no measurable difference from",
         "same": "identical to", "unknown": "compared with"}


def _clauses(entries: list, roles: tuple) -> tuple:
    """Clauses grouping the comparisons of one config by (outcome, reference): worse first, then
    within noise, then better; and ``{role: [outcomes]}``."""
    groups: dict = {}
    found: dict = {}
    for role in roles:
        for m, r in entries:
            cmp = r.comparisons.get(role)
            if cmp is not None:
                groups.setdefault((cmp.outcome, role), []).append(_detail(m, r, cmp))
                found.setdefault(role, []).append(cmp.outcome)
    rank = {"worse": 0, "unknown": 1, "within": 2, "same": 3, "better": 4}
    clauses = []
    for (outcome, role), details in sorted(groups.items(), key=lambda kv: (rank[kv[0][0]], roles.index(kv[0][1]))):
        clauses.append(f"{_LEAD[outcome]} {_REF_NAMES[role]} " + " and ".join(details))
    return clauses, found


def _bottom_line(label: str, corrector: Optional[str], found: dict, cost_of: dict, control: bool = False) -> str:
    """The closing sentence of a config's bullet; ``found[role]`` lists the outcomes over measurements."""
    if corrector is None:
        return ""
    if control:
        if "better" in found.get("plain", []) and "worse" not in found.get("plain", []):
            return "The dense tail alone improves on no correction."
        return ""
    tail, plain = found.get("tail", []), found.get("plain", [])
    if "worse" in tail:
        return "**The corrector does harm here: the tail-only control is the better choice.**"
    if "worse" in plain:
        return "**The corrector does harm here: no correction is the better choice.**"
    if "better" in tail:
        return "The corrector helps beyond its dense tail."
    if tail and all(o == "unknown" for o in tail):
        return "Too few contexts to judge it against the tail-only control; run more samples (--n)."
    if tail:
        cheaper = ""
        mine, ctrl = cost_of.get(label), cost_of.get("tail")
        if mine and ctrl and ctrl[0] < mine[0] and _pct(ctrl[0]) != _pct(mine[0]):  # a difference that shows
            cheaper = f", which costs less (density {_pct(ctrl[0])} vs {_pct(mine[0])})"
        return f"No measurable gain over the tail-only control{cheaper}."
    if "better" in plain:
        return "The corrector helps over no correction (no tail-only control was run to isolate its dense tail)."
    return ""


def verdict_markdown(measurements: list, meta: Optional[dict] = None) -> str:
    """The verdict as markdown: how to read it, one table per measurement, one bullet per config."""
    meta = meta or {}
    lines = ["# Verdict", ""]
    if not measurements:
        return "\n".join(lines + [
            "No retrieval or perplexity results here to judge yet: run `sparsekit eval retrieval` or "
            "`sparsekit eval ppl` with the same `--out` (fidelity and locality tables, if any, are in summary.md).", ""])
    model = meta.get("model")
    if model:
        extra = ", ".join(str(meta[k]) for k in ("dtype", "device") if meta.get(k))
        lines += [f"Model `{model}`" + (f" ({extra})." if extra else "."), ""]
    plan = meta.get("layers")
    if isinstance(plan, dict) and plan.get("n_layers"):
        lines += [f"Sparse configs run on {len(plan.get('sparse', []))} of {plan['n_layers']} attention layers "
                  f"({len(plan.get('sliding', []))} are the model's own sliding window, "
                  f"{len(plan.get('dense', []))} kept dense); density is per sparse layer.", ""]
    lines += [
        "Each config is compared with dense, with the tail-only control (its backend plus only the dense tail "
        "every corrector computes) and with no correction (the plain backend), on the same questions and the "
        f"same scored tokens. 95% intervals: paired bootstrap ({N_BOOT} resamples, seed {SEED}) over contexts "
        f"(retrieval) or over blocks of {TOKEN_BLOCK} consecutive scored tokens (perplexity). \"Worse\" and "
        "\"better\" mean the interval excludes no difference (for accuracy also the exact sign test of the "
        "paired wins/losses, p < 0.05); otherwise the difference is within noise at this sample size. Density: attended (query, key) pairs relative to dense causal attention; corrector: the "
        "share the corrector adds, per layer that runs the config.",
        "",
    ]
    for m in measurements:
        lines += _table(m)
        lines += _grid_table(m)
    lines += ["## Per config", ""]
    labels = list(dict.fromkeys(r.label for m in measurements for r in m.rows))
    for label in labels:
        entries = [(m, r) for m in measurements for r in m.rows if r.label == label]
        specs = list(dict.fromkeys(r.spec for _, r in entries))
        corrector = entries[0][1].corrector
        control = entries[0][1].control
        if split_spec(specs[0])[0] is None:
            continue  # the dense reference
        if len(specs) == 1:
            head = f"**{label}** (`{specs[0]}`)"
        else:
            head = f"**{label}** (" + "; ".join(
                f"`{s}` {', '.join(m.where for m, r in entries if r.spec == s)}" for s in specs) + ")"
        roles = ("tail", "plain", "dense") if corrector and not control else (
            ("plain", "dense") if corrector else ("dense",))
        clauses, found = _clauses(entries, roles)
        # cost at the longest measurement with a known cost
        known = [(m, r) for m, r in entries if r.cost is not None]
        cost_of: dict = {}
        cost = ""
        if known:
            m, r = max(known, key=lambda e: e[0].n_tokens)
            cost_of[label] = r.cost
            cost = f"Density {_pct(r.cost[0])} at {m.n_tokens} tokens"
            if corrector:
                cost += f", of which the corrector adds {_pct(r.cost[2])}"
            tail = r.comparisons.get("tail")
            if tail is not None:
                ctrl = next((x for x in m.rows if x.label == tail.ref), None)
                if ctrl is not None and ctrl.cost is not None:
                    cost_of["tail"] = ctrl.cost
                    cost += f" (tail-only control: density {_pct(ctrl.cost[0])}, corrector {_pct(ctrl.cost[2])})"
            cost += "."
        elif entries:
            cost = "Density unknown (the backend's pattern depends on the data)."
        text = "; ".join(clauses)
        text = (text[0].upper() + text[1:] + ". ") if text else ""
        bottom = _bottom_line(label, corrector, found, cost_of, control)
        lines.append(f"* {head}: " + (f"{bottom} " if bottom else "") + f"{text}{cost}")
    lines.append("")
    return "\n".join(lines)


def build_verdict(out: Path, *, n_boot: int = N_BOOT, seed: int = SEED) -> str:
    """The verdict markdown from the results under ``out`` (``retrieval.jsonl``, ``ppl.json``)."""
    out = Path(out)
    records, meta = load_retrieval(out)
    order = [c["label"] for c in meta.get("configs", [])] or None
    measurements = retrieval_measurements(records, order=order, n_boot=n_boot, seed=seed)
    ppl = load_json(out / "ppl.json", {})
    pm = perplexity_measurement(ppl, n_boot=n_boot, seed=seed)
    if pm is not None:
        measurements.append(pm)
    return verdict_markdown(measurements, meta or (ppl or {}).get("meta", {}))


def write_verdict(out: Path) -> Path:
    """Write ``verdict.md`` under ``out``; returns its path."""
    path = Path(out) / "verdict.md"
    path.write_text(build_verdict(out), encoding="utf-8")
    return path
