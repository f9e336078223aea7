"""``sparsekit sweep``: attention quality vs density for every backend, and quality at equal density.

A backend's speed means little without the quality it keeps at that density, and its quality means
little without its density. For each backend a list of knob settings (its own
:meth:`Backend.sweep(n) <sparsekit.base.Backend.sweep>`: streaming windows, HiP's ``k``, vertical-slash's
vertical / slash sizes, block_threshold's ``alpha`` / ``tau`` / ``budget`` for each scorer, the oracle's
density; a backend that declares none is left out unless given as ``--specs``) is **planned only**
(``SparseAttention(spec).plan(q, k)``, no attention run) on the bench's inputs
(:mod:`sparsekit.bench.inputs`, ``structured`` by default), and each plan gives:

* ``density``: the plan's exact pairs / dense causal pairs (``plan.cost()``);
* ``mass`` and ``recall64``: the softmax mass the pattern keeps and the share of each row's 64
  highest-scoring keys it holds (the bench's ``_quality``), averaged over sampled query rows and heads;
* ``out_err``: relative L2 error ``||o - o_dense|| / ||o_dense||`` of the pattern's exact float32
  output on the sampled rows, all heads together (the softmax of the row's scores restricted to the
  kept keys, times v: what any implementation of the pattern computes, up to rounding).

The sampled rows' scores over their causal prefix are computed once per (N, inputs) and shared by
every point (``runner._row_scores``), so a point costs its plan plus a few passes over those rows.

Rows are sampled once per (N, inputs) and shared by every point, with probability proportional to
``row + 1`` (the number of causal pairs the row holds, so the averages weigh rows as density does;
early rows see almost every key under any pattern), plus the last row.

Each backend's points form curves (*series*, named by the settings, or for a spec by
:meth:`Backend.series() <sparsekit.base.Backend.series>`: the backend's name, per scorer and knob for
block_threshold, per allocation for the oracle). **At equal density**: a series' quality at a common
density (default 2, 5, 10, 20%) is interpolated from its own curve, linearly in log density between the
two nearest points around it (:func:`interpolate`); just outside the curve (within ``reach`` x of its end
in density) it is extrapolated from the two end points and marked; further out the cell is missing. The
reference is the series named after a ``reference_only`` backend: the oracle's ``allocate="global"`` curve
(``backends/oracle.py``: the key blocks with the most mass per attended pair over all query blocks
within the density budget, a near-upper bound at equal total density); ``gap`` = reference mass - the
series' mass at the same density. Its ``allocate="block"`` curve (``oracle per block``: the same share
of every query block's visible blocks, the best pattern *for that per-block budget*) is shown too, with
its own gap: a rule that spends more blocks where attention is diffuse can beat it.

Python use::

    from sparsekit.bench.sweep import sweep
    res = sweep(ns=[16384], out_dir="sweep-out")      # res["points"], res["equal_density"], res["markdown"]

CLI: ``sparsekit sweep [--n 16K] [--specs "label=spec" ...] --out DIR`` writes ``sweep.json`` (every
point + the environment), ``sweep.md`` (both tables) and ``sweep.png`` (needs matplotlib).
"""

from __future__ import annotations

import argparse
import inspect
import json
import math
import os
import platform
import sys
import time
from typing import Optional

__all__ = ["sweep", "default_grid", "parse_spec_items", "series_of", "interpolate", "equal_density", "markdown",
           "plot", "add_arguments", "run", "DEFAULT_AT"]

DEFAULT_AT = (0.02, 0.05, 0.10, 0.20)
#: how far outside its own densities a curve is extrapolated (factor in density)
REACH = 1.5


def _progress(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


# ---------------------------------------------------------------- the knob settings
def _spec_string(name: str, options: dict) -> str:
    """``name(key=value,...)`` of the options given (not the defaults): short, and parses back to them."""
    from ..spec import _format_call

    return _format_call(dict(name=name, **options))


def _settings(cls, n: int, scorers=None) -> list:
    """``cls.sweep(n)``; ``scorers`` is passed to a backend whose ``sweep`` takes a ``scorers`` argument."""
    if scorers is not None and "scorers" in inspect.signature(cls.sweep).parameters:
        return list(cls.sweep(n, scorers=tuple(scorers)))
    return list(cls.sweep(n))


def _swept_backends(n: int) -> list:
    """The registered backends that declare default settings (``Backend.sweep``), the reference-only ones
    (the oracle) last."""
    import warnings

    from ..registry import BACKENDS, available_backends

    names = []
    for b in available_backends():
        try:
            if _settings(BACKENDS.get(b), n):
                names.append(b)
        except Exception as exc:  # a broken plug-in must not take the others down
            warnings.warn(f"backend {b!r}: sweep({n}) failed, left out: {type(exc).__name__}: {exc}", RuntimeWarning,
                          stacklevel=2)
    return sorted(names, key=lambda b: bool(getattr(BACKENDS.get(b), "reference_only", False)))


def default_grid(n: int, backends=None, scorers=None) -> list:
    """Each backend's default knob settings at length ``n`` (its :meth:`~sparsekit.base.Backend.sweep`,
    densities of about 1% to 50%): ``[{"series", "label", "spec"}]``, settings giving the same backend once.

    ``backends``: names, or None / ``"all"`` for every registered backend that declares settings (in name
    order, reference-only ones last); a named backend that declares none is an error. ``scorers``: passed
    to the backends whose ``sweep`` takes a ``scorers`` argument (block_threshold's scorers); None: their own.
    """
    from .. import SparseAttention
    from ..registry import BACKENDS

    named = backends not in (None, ["all"], ("all",), "all")
    names = list(backends) if named else _swept_backends(n)
    grid, seen = [], set()
    for name in names:
        settings = _settings(BACKENDS.get(name), n, scorers)
        if not settings:
            have = ", ".join(_swept_backends(n)) or "none"
            raise ValueError(f"no default settings for backend {name!r} (its sweep(n) declares none; backends with "
                             f"default settings: {have}); give your own with --specs \"label=spec\"")
        for it in settings:
            attn = SparseAttention(name, **it["options"])
            if str(attn) not in seen:
                seen.add(str(attn))
                grid.append(dict(series=it["series"], label=it["label"], spec=_spec_string(name, it["options"])))
    return grid


def series_of(attn) -> str:
    """The curve a spec belongs to: its backend's :meth:`~sparsekit.base.Backend.series` (the backend name,
    or finer: block_threshold's scorer and knob, the oracle's allocation)."""
    return attn.backend.series()


def parse_spec_items(items) -> list:
    """``["label=spec", "spec", "series/label=spec"]`` -> ``[{"series", "label", "spec"}]`` (series None:
    from the spec). A ``=`` before any ``(`` separates a label; a ``/`` in the label names the series."""
    out = []
    for item in items:
        item = item.strip()
        if not item:
            continue
        eq, par = item.find("="), item.find("(")
        if eq > 0 and (par < 0 or eq < par):
            label, spec = item[:eq].strip(), item[eq + 1:].strip()
        else:
            label, spec = item, item
        if not spec:
            raise ValueError(f"--specs: empty spec in {item!r}")
        series = None
        if "/" in label:
            series, label = (x.strip() for x in label.split("/", 1))
        out.append(dict(series=series, label=label, spec=spec))
    if not out:
        raise ValueError("--specs: no spec given")
    return out


# ---------------------------------------------------------------- interpolation
def interpolate(points, x: float, *, reach: float = REACH, lo: Optional[float] = None, hi: Optional[float] = None,
                log_values: bool = False):
    """A curve's value at density ``x``: ``(value, how)``, ``how`` one of ``exact``, ``interpolated``,
    ``extrapolated``, ``missing`` (value None).

    ``points``: ``(density, value)`` pairs (any order; None / non-finite values and densities <= 0 are
    dropped; points of equal density are averaged). Between two points: linear in log density between
    the two nearest points around ``x``. Outside the curve but within ``reach`` x of its nearest end:
    the line through the two end points, clipped to ``[lo, hi]``. Otherwise missing. ``log_values``:
    the same on the log of the values (for errors: never extrapolated to zero or below; values <= 0
    are dropped).
    """
    if log_values:
        pts = [(d, None if v is None or not v > 0 else math.log(v)) for d, v in points]
        v, how = interpolate(pts, x, reach=reach)
        if v is None:
            return None, how
        v = math.exp(v)
        return (max(lo, v) if lo is not None else v) if hi is None else min(hi, v), how
    pts = {}
    for d, v in points:
        if d is None or v is None or not (d > 0) or not math.isfinite(v) or not math.isfinite(d):
            continue
        key = round(math.log(d), 9)
        pts.setdefault(key, []).append(float(v))
    if not pts or not x > 0:
        return None, "missing"
    curve = sorted((lx, sum(vs) / len(vs)) for lx, vs in pts.items())
    lx = math.log(x)
    for cx, cv in curve:
        if abs(cx - lx) < 1e-6:
            return cv, "exact"
    if curve[0][0] < lx < curve[-1][0]:
        for (x0, v0), (x1, v1) in zip(curve, curve[1:]):
            if x0 < lx < x1:
                return v0 + (lx - x0) / (x1 - x0) * (v1 - v0), "interpolated"
    if len(curve) < 2:
        return None, "missing"
    (x0, v0), (x1, v1) = (curve[0], curve[1]) if lx < curve[0][0] else (curve[-2], curve[-1])
    end = curve[0][0] if lx < curve[0][0] else curve[-1][0]
    if abs(lx - end) > math.log(reach):
        return None, "missing"
    v = v0 + (lx - x0) / (x1 - x0) * (v1 - v0)
    if lo is not None:
        v = max(lo, v)
    if hi is not None:
        v = min(hi, v)
    return v, "extrapolated"


#: (field, lower bound, upper bound, interpolate its log)
METRICS = (("mass", 0.0, 1.0, False), ("recall64", 0.0, 1.0, False), ("out_err", None, None, True))


def equal_density(points, at=DEFAULT_AT, *, reach: float = REACH) -> list:
    """One row per (n, inputs, series): each metric interpolated at each density of ``at``, and the
    reference's mass gap. ``[{"n", "inputs", "series", "reference_only", "reference", "densities": [min, max],
    "at": {"0.05": {...}}}]``; ``reference``: the row is the reference (a reference-only backend's series named
    after the backend), whose mass the other rows' ``oracle_gap`` is measured from; rows of reference-only
    backends come last, the reference at the end."""
    groups = {}
    for p in points:
        if p.get("density") is None or p.get("mass") is None:
            continue
        groups.setdefault((p["n"], p["inputs"], p["series"]), []).append(p)
    rows = []
    for (n, inputs, series), pts in groups.items():
        ref_only = any(_reference_only(p) for p in pts)
        row = dict(n=n, inputs=inputs, series=series, reference_only=ref_only,
                   reference=ref_only and series == pts[0].get("backend"), points=len(pts),
                   densities=[min(p["density"] for p in pts), max(p["density"] for p in pts)], at={})
        for x in at:
            cell = {}
            for m, lo, hi, logv in METRICS:
                v, how = interpolate([(p["density"], p.get(m)) for p in pts], x, reach=reach, lo=lo, hi=hi,
                                     log_values=logv)
                cell[m], cell[f"{m}_how"] = v, how
                if m == "mass":
                    cell["how"] = how
            row["at"][f"{x:g}"] = cell
        rows.append(row)
    for row in rows:  # the oracle's gap, within the same (n, inputs)
        orc = next((r for r in rows if r["reference"] and r["n"] == row["n"] and r["inputs"] == row["inputs"]), None)
        for x, cell in row["at"].items():
            o = orc["at"][x] if orc is not None else None
            if o is None or o["mass"] is None or cell["mass"] is None or row["reference"]:
                cell["oracle_gap"], cell["gap_how"] = None, "missing"
            else:
                cell["oracle_gap"] = o["mass"] - cell["mass"]
                cell["gap_how"] = "extrapolated" if "extrapolated" in (o["how"], cell["how"]) else "interpolated"
    first = {}
    for i, p in enumerate(points):
        first.setdefault(p["series"], i)
    rows.sort(key=lambda r: (r["n"], r["inputs"], r["reference_only"], r["reference"], first.get(r["series"], 0),
                             r["series"]))
    return rows


def _reference_only(p) -> bool:
    """The point's backend is reference-only (``Backend.reference_only``): recorded in the point, or (points of
    an older run) looked up in the registry."""
    if "reference_only" in p:
        return bool(p["reference_only"])
    from ..registry import BACKENDS

    try:
        return bool(getattr(BACKENDS.get(p.get("backend") or ""), "reference_only", False))
    except Exception:
        return False


# ---------------------------------------------------------------- the sweep
def _sample_rows(n: int, count: int, seed: int):
    """``count`` distinct rows drawn with probability ``(row + 1) / sum`` plus the last row, ascending."""
    import torch

    w = torch.arange(1, n + 1, dtype=torch.float64)
    g = torch.Generator().manual_seed(seed + 1)
    rows = torch.multinomial(w, min(count, n), replacement=False, generator=g)
    return torch.unique(torch.cat([rows, torch.tensor([n - 1])]))


def _rows_out(scores, v, pattern):
    """float32 ``[B, Hq, R, D]``: the exact attention output of each sampled row over the keys ``pattern``
    keeps (every causal key when None), from the rows' cached scores (:func:`~sparsekit.bench.runner._row_scores`):
    the softmax of the row's scores restricted to its kept keys, times v."""
    import torch

    B, Hkv, _, D = v.shape
    outs = []
    for r, s, lse, _ in scores:
        Hq = s.shape[1]
        if pattern is None:
            w = torch.exp(s - lse)
        else:
            keep = pattern.expand(pattern.keep(r, r + 1, torch.arange(r + 1, device=s.device)))[:, :, 0]
            w = torch.softmax(s.masked_fill(~keep, float("-inf")), -1).nan_to_num_(0.0)
        o = torch.einsum("bhgk,bhkd->bhgd", w.reshape(B, Hkv, Hq // Hkv, r + 1), v[:, :, : r + 1].float())
        outs.append(o.reshape(B, Hq, D))
    return torch.stack(outs, 2)


def _env(device: str) -> dict:
    import torch

    from .. import __version__

    if device == "cuda":
        name = torch.cuda.get_device_name(0)
    else:
        name = platform.processor() or platform.machine()
        try:
            with open("/proc/cpuinfo") as f:
                name = next(line.split(":", 1)[1].strip() for line in f if line.startswith("model name"))
        except (OSError, StopIteration):
            pass
        name = f"CPU: {name}, {os.cpu_count()} cores, {torch.get_num_threads()} torch threads"
    return dict(device=name, torch=torch.__version__, sparsekit=__version__, python=platform.python_version(),
                date=time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()))


def _build(items) -> list:
    """Construct every spec before any input is made (a bad spec is an error up front)."""
    from .. import SparseAttention

    out = []
    for it in items:
        try:
            attn = SparseAttention.from_string(it["spec"])
        except Exception as exc:
            raise ValueError(f"spec {it['spec']!r}: {exc}") from None
        if attn.corrector is not None:
            raise ValueError(f"spec {it['spec']!r}: the sweep measures bare backends; drop the corrector "
                             f"({attn.corrector.name})")
        out.append(dict(it, series=it.get("series") or series_of(attn), backend=attn.backend.name,
                        reference_only=bool(getattr(attn.backend, "reference_only", False)), attn=attn))
    return out


def sweep(
    ns=(16384,),
    inputs=("structured",),
    specs=None,
    backends=None,
    scorers=None,
    at=DEFAULT_AT,
    rows: int = 128,
    batch: int = 1,
    heads: int = 8,
    kv_heads: int = 2,
    head_dim: int = 64,
    dtype: str = "float32",
    device: str = "cpu",
    seed: int = 0,
    out_dir: Optional[str] = None,
    plot_png: bool = True,
) -> dict:
    """Run the sweep; returns ``{"config", "env", "points", "equal_density", "markdown"}`` and, with
    ``out_dir``, writes ``sweep.json``, ``sweep.md`` and (``plot_png``) ``sweep.png`` there.

    ``specs``: ``["label=spec", ...]`` (see :func:`parse_spec_items`), or None for :func:`default_grid`
    at each N (restricted to ``backends``; ``scorers`` goes to the backends whose settings take scorers).
    Errors of one point are recorded in it, not raised.
    """
    import torch

    from .inputs import INPUTS, make_inputs
    from .runner import _quality, _row_scores

    if device == "cuda" and not torch.cuda.is_available():
        raise RuntimeError("no CUDA device here; run on the CPU with --device cpu (the default)")
    if device not in ("cpu", "cuda"):
        raise ValueError(f"device must be cpu or cuda, got {device!r}")
    bad = [i for i in inputs if i not in INPUTS]
    if bad:
        raise ValueError(f"inputs must be among {sorted(INPUTS)}, got {bad}")
    if dtype not in ("float32", "bfloat16", "float16"):
        raise ValueError(f"dtype must be float32, bfloat16 or float16, got {dtype!r}")
    if rows < 1:
        raise ValueError(f"rows must be >= 1, got {rows}")
    at = sorted(float(x) for x in at)
    if not at or any(not 0 < x <= 1 for x in at):
        raise ValueError(f"densities to compare at must be in (0, 1], got {at}")
    if plot_png and out_dir:
        _matplotlib()  # fail before the work, not after it
    ns = list(ns)
    user = parse_spec_items(specs) if specs else None
    grids = {n: _build(user if user is not None else default_grid(n, backends, scorers)) for n in ns}
    cfg = dict(ns=ns, inputs=list(inputs), specs=list(specs) if specs else None,
               backends=list(backends) if backends else None, scorers=list(scorers) if scorers else None, at=at,
               rows=rows, batch=batch, heads=heads, kv_heads=kv_heads, head_dim=head_dim, dtype=dtype, seed=seed,
               row_sampling="probability proportional to row + 1, plus the last row", top=64)
    env = _env(device)
    dev = torch.device(device)
    points = []
    t_start = time.perf_counter()
    total = sum(len(g) for g in grids.values()) * len(inputs)
    done = 0
    for n in ns:
        scale = head_dim ** -0.5
        for kind in inputs:
            t0 = time.perf_counter()
            q, k, v = make_inputs(kind, n, batch=batch, q_heads=heads, kv_heads=kv_heads, head_dim=head_dim,
                                  dtype=getattr(torch, dtype), device=dev, seed=seed)
            sample = _sample_rows(n, rows, seed).to(dev)
            scores = _row_scores(q, k, sample, scale)  # pattern-independent, shared by every point
            ref = _rows_out(scores, v, None)
            ref_norm = float(ref.norm())
            _progress(f"[sweep N={n} {kind}] inputs and dense reference rows: {time.perf_counter() - t0:.1f} s")
            for it in grids[n]:
                done += 1
                attn = it["attn"]
                p = dict(n=n, inputs=kind, series=it["series"], label=it["label"], spec=it["spec"],
                         spec_full=str(attn), backend=it["backend"], reference_only=it["reference_only"])
                t1 = time.perf_counter()
                try:
                    plan = attn.plan(q, k, scale=scale, q_offset=0)
                    p["plan_s"] = time.perf_counter() - t1
                    c = plan.cost()
                    p["density"] = float(c.density)
                    p["pairs"] = float(c.total_pairs)
                    pat = plan.pattern
                    t2 = time.perf_counter()
                    p["mass"], p["recall64"] = _quality(q, k, sample, scale, pat, scores=scores)
                    p["out_err"] = float((_rows_out(scores, v, pat) - ref).norm()) / max(ref_norm, 1e-30)
                    p["quality_s"] = time.perf_counter() - t2
                    del plan, pat
                    _progress(f"[sweep N={n} {kind}] {done}/{total} {it['series']} {it['label']}: density "
                              f"{p['density']:.2%} mass {p['mass']:.3f} recall@64 {p['recall64']:.3f} "
                              f"err {p['out_err']:.3f} ({time.perf_counter() - t1:.1f} s)")
                except Exception as exc:  # recorded, not fatal
                    p["error"] = f"{type(exc).__name__}: {exc}"[:300]
                    _progress(f"[sweep N={n} {kind}] {done}/{total} {it['series']} {it['label']}: FAILED {p['error']}")
                points.append(p)
                if out_dir:  # what is done so far survives a run killed later
                    _write_json(os.path.join(out_dir, "sweep.partial.json"), dict(config=cfg, env=env, points=points))
            del q, k, v, scores, ref
    env["wall_s"] = round(time.perf_counter() - t_start, 1)
    eq = equal_density(points, at)
    md = markdown(points, eq, cfg, env)
    out = dict(config=cfg, env=env, points=points, equal_density=eq, markdown=md)
    if out_dir:
        _write_json(os.path.join(out_dir, "sweep.json"), dict(config=cfg, env=env, points=points, equal_density=eq))
        partial = os.path.join(out_dir, "sweep.partial.json")
        if os.path.exists(partial):
            os.remove(partial)
        with open(os.path.join(out_dir, "sweep.md"), "w") as f:
            f.write(md)
        if plot_png:
            plot(points, os.path.join(out_dir, "sweep.png"), at=at, title_env=env)
    return out


def _write_json(path: str, obj) -> None:
    os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
    tmp = path + ".tmp"
    with open(tmp, "w") as f:
        json.dump(obj, f, indent=1)
    os.replace(tmp, path)


# ---------------------------------------------------------------- report
def _f(x, spec=".3f"):
    return "–" if x is None else format(x, spec)


def _n(n: int) -> str:
    return f"{n // 1048576}M" if n % 1048576 == 0 else f"{n // 1024}K" if n % 1024 == 0 else str(n)


def _cell(cell, key, spec=".3f", how_key="how"):
    v = cell.get(key)
    if v is None:
        return "–"
    s = format(v, spec)
    return f"{s}\\*" if cell.get(how_key) == "extrapolated" else s


def markdown(points, eq, cfg, env) -> str:
    """Per (N, inputs): every point, then quality at equal density (mass, oracle gap, recall@64, error)."""
    at = cfg["at"]
    lines = [
        f"B={cfg['batch']}, Hq={cfg['heads']}, Hkv={cfg['kv_heads']}, D={cfg['head_dim']}, {cfg['dtype']}, "
        f"seed {cfg['seed']}, {cfg['rows']} sampled query rows; " + ", ".join(f"{k} {v}" for k, v in env.items()),
        "",
        "density = the plan's exact pairs / dense causal pairs. mass = softmax mass the pattern keeps; recall@64 = "
        "share of each row's 64 highest-scoring keys it keeps; err = relative L2 error ||o − o_dense|| / ||o_dense|| "
        "of the pattern's exact output; all on the same sampled rows (drawn with probability ∝ row + 1, plus the "
        "last row), averaged over rows and heads. Patterns are planned only (no attention run).",
        "",
    ]
    keys = sorted({(p["n"], p["inputs"]) for p in points})
    for n, kind in keys:
        pts = [p for p in points if p["n"] == n and p["inputs"] == kind]
        rows = [r for r in eq if r["n"] == n and r["inputs"] == kind]
        order = {r["series"]: i for i, r in enumerate(rows)}
        pts.sort(key=lambda p: (order.get(p["series"], 1e9), p["series"], p.get("density") or 2.0))
        lines += [f"## N = {_n(n)}, {kind} inputs", "", "### Every point (density vs quality)", "",
                  "| series | setting | density | mass | recall@64 | err | plan s | spec |",
                  "|---|---|---|---|---|---|---|---|"]
        for p in pts:
            d = p.get("density")
            lines.append(
                f"| {p['series']} | {p['label']} | {_f(None if d is None else 100 * d, '.2f')}% | "
                f"{_f(p.get('mass'))} | "
                f"{_f(p.get('recall64'))} | {_f(p.get('out_err'))} | {_f(p.get('plan_s'), '.2f')} | "
                f"`{p['spec']}`{' FAILED: ' + p['error'].replace('|', '/') if p.get('error') else ''} |")
        head = "| series | density range | " + " | ".join(f"{100 * x:g}%" for x in at) + " |"
        rule = "|---|---|" + "---|" * len(at)
        note = ("Each series interpolated on its own curve, linear in log density between the two nearest points (the error: "
                "its log); "
                f"\\* = extrapolated from the curve's two end points (at most {REACH:g}× beyond its densities); "
                "– = outside the curve.")
        lines += ["", "### Quality at equal density", "", note, ""]
        for title, key, spec, how in (("Attention mass kept", "mass", ".3f", "mass_how"),
                                      ("Oracle gap: oracle mass − mass (> 0: the oracle's blocks keep more at this density)",
                                       "oracle_gap", "+.3f", "gap_how"),
                                      ("recall@64", "recall64", ".3f", "recall64_how"),
                                      ("Output error (relative L2 vs dense)", "out_err", ".3f", "out_err_how")):
            lines += [f"**{title}**", "", head, rule]
            for r in rows:
                if key == "oracle_gap" and r["reference"]:
                    continue
                lo, hi = r["densities"]
                lines.append(f"| {r['series']} | {100 * lo:.1f}–{100 * hi:.1f}% | "
                             + " | ".join(_cell(r["at"][f"{x:g}"], key, spec, how) for x in at) + " |")
            lines.append("")
    return "\n".join(lines)


def _matplotlib():
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError as exc:
        raise RuntimeError('the plot (sweep.png) needs matplotlib: pip install "sparsekit-prefill[plot]" '
                           "(or pass --no-plot)") from exc
    return plt


def plot(points, path: str, *, at=DEFAULT_AT, title_env: Optional[dict] = None) -> None:
    """Density (log x) vs mass, recall@64 and output error; one line per series, the oracle dashed;
    one row of panels per (N, inputs)."""
    plt = _matplotlib()
    from matplotlib.ticker import FuncFormatter

    keys = sorted({(p["n"], p["inputs"]) for p in points if p.get("density") is not None})
    if not keys:
        return
    series = list(dict.fromkeys(p["series"] for p in points if p.get("density") is not None))  # run order
    # presentation only: the colours of the known curves (a series takes the colour of its longest listed
    # prefix of words, e.g. "block_threshold pooled alpha" of "block_threshold pooled"), a spare palette else
    fixed = {"streaming": "tab:blue", "hip": "tab:orange", "vertical_slash": "tab:green",
             "block_threshold pooled": "tab:red", "block_threshold vslash": "tab:purple",
             "block_threshold antidiagonal": "tab:brown", "oracle per block": "dimgray"}
    spare = iter(["tab:pink", "tab:olive", "tab:cyan", "tab:gray", "gold", "navy", "teal", "salmon", "lime",
                  "indigo"] * 10)
    # reference-only curves -> whether it is the reference (the series named after its backend)
    refs = {p["series"]: p["series"] == p.get("backend") for p in points
            if p.get("density") is not None and _reference_only(p)}
    colors, styles, bases = {}, {}, {}
    for s in series:
        if refs.get(s):  # the reference (the oracle)
            colors[s], styles[s] = "black", dict(linestyle="--", marker="s", linewidth=2.2)
            continue
        words = s.split()
        base = next((" ".join(words[:i]) for i in range(len(words), 0, -1) if " ".join(words[:i]) in fixed), s)
        if base not in bases:
            bases[base] = fixed.get(base) or next(spare)
        colors[s] = bases[base]
        if s in refs:  # another reference-only curve (the oracle per block)
            styles[s] = dict(linestyle="--", marker="s", linewidth=1.6)
            continue
        # curves sharing a colour (one backend's knobs): solid, dash-dot, dotted, dashed, in run order
        nth = sum(1 for t in styles if t not in refs and colors[t] == colors[s])
        styles[s] = dict(linestyle=("-", "-.", ":", "--")[nth % 4], marker="o", linewidth=1.6)
    metrics = (("mass", "attention mass kept"), ("recall64", "recall@64"), ("out_err", "output rel. L2 error vs dense"))
    fig, axes = plt.subplots(len(keys), 3, figsize=(18, 5.2 * len(keys)), squeeze=False)
    pct = FuncFormatter(lambda x, _: f"{100 * x:g}%")
    for row, (n, kind) in zip(axes, keys):
        for ax, (m, ylabel) in zip(row, metrics):
            for s in series:
                pts = sorted((p["density"], p[m]) for p in points if p["n"] == n and p["inputs"] == kind
                             and p["series"] == s and p.get(m) is not None and p.get("density"))
                if pts:
                    ax.plot([d for d, _ in pts], [y for _, y in pts], color=colors[s], markersize=3.5, label=s,
                            **styles[s])
            for x in at:
                ax.axvline(x, color="grey", linestyle=":", linewidth=0.8)
            ax.set_xscale("log")
            ax.xaxis.set_major_formatter(pct)
            if m == "out_err":
                ax.set_yscale("log")
                lo = min((p["out_err"] for p in points if p.get("out_err")), default=1e-3)
                ax.set_ylim(bottom=max(lo, 1e-3))
            ax.set_xlabel("density (pairs computed / dense causal pairs)")
            ax.set_ylabel(ylabel)
            ax.set_title(f"N = {_n(n)}, {kind} inputs: {ylabel}")
            ax.grid(True, which="both", alpha=0.3)
    handles, labels = axes[0][0].get_legend_handles_labels()
    fig.legend(handles, labels, loc="lower center", ncol=min(5, max(1, len(labels))), fontsize=8,
               bbox_to_anchor=(0.5, 0.0))
    sub = f" ({title_env['device']}, {title_env['date'][:10]})" if title_env else ""
    fig.suptitle(f"sparsekit sweep: density vs quality{sub}", fontsize=11)
    nrows_legend = -(-len(labels) // 5)
    fig.tight_layout(rect=(0, 0.035 * nrows_legend / len(keys) + 0.02, 1, 0.97))
    os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
    fig.savefig(path, dpi=100)
    plt.close(fig)


# ---------------------------------------------------------------- CLI
def _percents(text: str):
    out = []
    for part in text.split(","):
        part = part.strip().rstrip("%")
        if not part:
            continue
        try:
            x = float(part)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected densities in percent like 2,5,10,20, got {text!r}") from None
        if not 0 < x <= 100:
            raise argparse.ArgumentTypeError(f"densities must be in (0, 100] percent, got {text!r}")
        out.append(x / 100)
    return out


def add_arguments(parser: argparse.ArgumentParser) -> None:
    from . import _split_top, parse_sizes

    names = lambda s: [x for x in s.split(",") if x]  # noqa: E731
    parser.add_argument("--n", type=parse_sizes, default=[16384],
                        help="sequence length(s), e.g. 16K or 16K,32K (default 16K)")
    parser.add_argument("--inputs", type=names, default=["structured"],
                        help="structured (default), random, or random,structured")
    parser.add_argument("--specs", nargs="+", default=None, metavar="LABEL=SPEC",
                        help="your own settings instead of the default grid: 'label=spec' (or a bare spec; "
                             "'series/label=spec' names the curve), e.g. \"w64=streaming(window=64,sink=16)\"")
    parser.add_argument("--backends", type=names, default=["all"],
                        help="default settings (each backend's sweep(n)) of these backends: all (default: every "
                             "backend that declares some) or a comma-separated list")
    parser.add_argument("--scorers", type=_split_top, default=None,
                        help="scorers for the backends whose default settings take scorers (block_threshold; "
                             "default: their own, pooled,vslash,antidiagonal(stride=8))")
    parser.add_argument("--at", type=_percents, default=list(DEFAULT_AT),
                        help="densities in percent for the equal-density table (default 2,5,10,20)")
    parser.add_argument("--rows", type=int, default=128,
                        help="sampled query rows for mass / recall@64 / error (default 128)")
    parser.add_argument("--batch", type=int, default=1)
    parser.add_argument("--heads", type=int, default=8)
    parser.add_argument("--kv-heads", type=int, default=2)
    parser.add_argument("--head-dim", type=int, default=64)
    parser.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"])
    parser.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", default="sweep-out", help="folder for sweep.json, sweep.md, sweep.png")
    parser.add_argument("--no-plot", action="store_true", help="do not write sweep.png (no matplotlib needed)")


def run(args) -> int:
    try:
        res = sweep(ns=args.n, inputs=args.inputs, specs=args.specs, backends=args.backends, scorers=args.scorers,
                    at=args.at, rows=args.rows, batch=args.batch, heads=args.heads, kv_heads=args.kv_heads,
                    head_dim=args.head_dim, dtype=args.dtype, device=args.device, seed=args.seed, out_dir=args.out,
                    plot_png=not args.no_plot)
    except (RuntimeError, ValueError) as exc:
        msg = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        print(f"sparsekit sweep: {msg}", file=sys.stderr)
        return 2
    print(res["markdown"])
    _progress(f"sparsekit sweep: wrote {os.path.join(args.out, 'sweep.json')}, sweep.md"
              + ("" if args.no_plot else ", sweep.png") + f" ({res['env']['wall_s']:.0f} s)")
    return 0
