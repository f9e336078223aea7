"""`sparsekit sweep`: density vs quality per backend, and quality at equal density (fast, CPU, tiny N)."""

from __future__ import annotations

import json
import math
import sys

import pytest
import torch

from sparsekit.bench.sweep import default_grid, equal_density, interpolate, parse_spec_items
from sparsekit.cli import main

N = 1024
B32 = "block_q=32,block_k=32"
SPECS = [
    "w32=streaming(window=32,sink=16)",
    "w128=streaming(window=128,sink=16)",
    f"k64=hip(k=64,{B32},stages='',sink=32,window=32)",
    f"k192=hip(k=192,{B32},stages='',sink=32,window=32)",
    f"v32=vertical_slash(vertical_size=32,slash_size=64,local=16,{B32})",
    f"a0.2=block_threshold(scorer=pooled,rule=relative(alpha=0.2),{B32},sink=32,window=32,min_len=0)",
    f"t0.8=block_threshold(scorer=antidiagonal(stride=8),rule=mass(tau=0.8),{B32},sink=32,window=32,min_len=0)",
    f"bt/b64=block_threshold(scorer=vslash,rule=relative(alpha=0.001),budget=64,{B32},sink=32,window=32,min_len=0)",
    f"d0.05=oracle(density=0.05,{B32},allocate=global)",
    f"d0.15=oracle(density=0.15,{B32},allocate=global)",
    f"d0.3=oracle(density=0.3,{B32},allocate=global)",
    f"d0.6=oracle(density=0.6,{B32},allocate=global)",
    f"p0.05=oracle(density=0.05,{B32})",
    f"p0.3=oracle(density=0.3,{B32})",
]


@pytest.fixture(scope="module")
def swept(tmp_path_factory):
    """One small sweep through the CLI (JSON, markdown, and the PNG when matplotlib is installed)."""
    out = tmp_path_factory.mktemp("sweep")
    try:
        import matplotlib  # noqa: F401

        plot = []
    except ImportError:
        plot = ["--no-plot"]
    argv = ["sweep", "--n", "1K", "--heads", "4", "--kv-heads", "2", "--head-dim", "32", "--rows", "24",
            "--at", "5,10,20,40", "--out", str(out), "--specs", *SPECS, *plot]
    import io
    from contextlib import redirect_stderr, redirect_stdout

    so, se = io.StringIO(), io.StringIO()
    with redirect_stdout(so), redirect_stderr(se):
        rc = main(argv)
    return dict(rc=rc, out=out, stdout=so.getvalue(), stderr=se.getvalue(), plot=not plot,
                data=json.loads((out / "sweep.json").read_text()) if rc == 0 else None)


def test_cli_writes_every_point_with_its_density_and_quality(swept):
    assert swept["rc"] == 0, swept["stderr"][-2000:]
    d = swept["data"]
    assert set(d) >= {"config", "env", "points", "equal_density"}
    assert {"device", "torch", "date"} <= set(d["env"]) and d["env"]["device"].startswith("CPU")
    cfg = d["config"]
    assert cfg["ns"] == [N] and cfg["heads"] == 4 and cfg["kv_heads"] == 2 and cfg["head_dim"] == 32
    assert cfg["seed"] == 0 and cfg["at"] == [0.05, 0.1, 0.2, 0.4] and cfg["dtype"] == "float32"
    pts = d["points"]
    assert [p["label"] for p in pts] == [s.split("=", 1)[0].split("/")[-1] for s in SPECS]
    for p in pts:
        assert "error" not in p, p
        assert {"n", "inputs", "series", "label", "spec", "backend", "density", "mass", "recall64", "out_err"} <= set(p)
        assert p["n"] == N and p["inputs"] == "structured"
        assert 0 < p["density"] <= 1 and 0 < p["mass"] <= 1 + 1e-6 and 0 <= p["recall64"] <= 1 and p["out_err"] >= 0
    series = {p["label"]: p["series"] for p in pts}
    assert series["w32"] == "streaming" and series["k64"] == "hip" and series["d0.3"] == "oracle"
    assert series["p0.3"] == "oracle per block"  # allocate="block"
    assert {p["label"] for p in pts if p["reference_only"]} == {"d0.05", "d0.15", "d0.3", "d0.6", "p0.05", "p0.3"}
    assert series["a0.2"] == "block_threshold pooled alpha" and series["t0.8"] == "block_threshold antidiagonal tau"
    assert series["b64"] == "bt"  # 'series/label=spec' names the curve
    # more keys, more mass, less error (same backend)
    by = {p["label"]: p for p in pts}
    assert by["w128"]["density"] > by["w32"]["density"] and by["w128"]["mass"] > by["w32"]["mass"]
    assert by["d0.6"]["out_err"] < by["d0.05"]["out_err"]
    # progress on stderr, one line per point; both tables on stdout and in sweep.md
    assert swept["stderr"].count("[sweep N=1024 structured]") >= len(SPECS)
    md = (swept["out"] / "sweep.md").read_text()
    for text in (swept["stdout"], md):
        assert "Every point (density vs quality)" in text and "Quality at equal density" in text
        assert "Oracle gap" in text and "| streaming |" in text
    assert (swept["out"] / "sweep.png").exists() == swept["plot"]
    assert not (swept["out"] / "sweep.partial.json").exists()


def test_oracle_keeps_at_least_the_mass_of_every_backend_at_no_more_density(swept):
    """A sanity check on these inputs, not a theorem: the global oracle spends its density where the mass per
    pair is largest (greedy, in blocks), so no backend keeps more mass at no more density; the per-block oracle
    gives every query block the same share, so a rule that spends blocks unevenly can beat it."""
    pts = swept["data"]["points"]
    oracle = [p for p in pts if p["series"] == "oracle"]
    others = [p for p in pts if not p["reference_only"]]
    checked = 0
    for o in oracle:
        for p in others:
            if p["density"] <= o["density"]:
                assert o["mass"] >= p["mass"] - 1e-3, (o["label"], o["density"], o["mass"], p["label"], p["density"],
                                                       p["mass"])
                checked += 1
    assert checked >= 5
    # and the oracle's own curve rises with density
    ms = [o["mass"] for o in sorted(oracle, key=lambda o: o["density"])]
    assert ms == sorted(ms)


def test_equal_density_table_and_oracle_gap(swept):
    eq = swept["data"]["equal_density"]
    rows = {r["series"]: r for r in eq}
    assert rows["oracle"]["reference"] and list(rows["oracle"]["at"]) == ["0.05", "0.1", "0.2", "0.4"]
    assert set(rows) == {p["series"] for p in swept["data"]["points"]}
    # the reference is the reference-only backend's series named after it; the per-block oracle has a gap
    assert [r["series"] for r in eq if r["reference_only"]] == ["oracle per block", "oracle"] == [
        r["series"] for r in eq[-2:]]
    assert [r["series"] for r in eq if r["reference"]] == ["oracle"]
    pb = rows["oracle per block"]["at"]["0.1"]
    assert pb["oracle_gap"] == pytest.approx(rows["oracle"]["at"]["0.1"]["mass"] - pb["mass"])
    assert pb["oracle_gap"] > -1e-3  # the global allocation keeps at least as much
    s = rows["streaming"]
    for key, cell in s["at"].items():
        o = rows["oracle"]["at"][key]
        if cell["mass"] is not None and o["mass"] is not None:
            assert cell["oracle_gap"] == pytest.approx(o["mass"] - cell["mass"])
            assert cell["how"] in ("exact", "interpolated", "extrapolated")
        else:
            assert cell["oracle_gap"] is None and cell["gap_how"] == "missing"
    # a cell inside the streaming curve is interpolated from its two points, linear in log density
    pts = sorted((p["density"], p["mass"]) for p in swept["data"]["points"] if p["series"] == "streaming")
    x = math.sqrt(pts[0][0] * pts[1][0])
    (v, how), = [interpolate(pts, x)]
    assert how == "interpolated" and v == pytest.approx((pts[0][1] + pts[1][1]) / 2)


def test_interpolate_on_a_hand_made_curve():
    curve = [(0.10, 0.6), (0.01, 0.2), (0.4, 0.9)]  # any order
    assert interpolate(curve, 0.01) == (0.2, "exact")
    v, how = interpolate(curve, math.sqrt(0.001))  # halfway between 1% and 10% in log density
    assert how == "interpolated" and v == pytest.approx(0.4)
    v, how = interpolate(curve, 0.2)  # between 10% and 40%: half of the log distance
    assert how == "interpolated" and v == pytest.approx(0.75)
    # just outside: extrapolated through the two end points, clipped
    v, how = interpolate(curve, 0.008)
    assert how == "extrapolated" and v == pytest.approx(0.2 + math.log(0.8) / math.log(10) * 0.4)
    v, how = interpolate(curve, 0.55, hi=1.0)
    assert how == "extrapolated" and v == pytest.approx(min(1.0, 0.9 + math.log(0.55 / 0.4) / math.log(4) * 0.3))
    assert interpolate([(0.1, 0.5), (0.4, 0.9)], 0.59, hi=0.95) == (0.95, "extrapolated")
    # too far outside, no point, one point, bad values dropped, equal densities averaged
    assert interpolate(curve, 0.005) == (None, "missing")
    assert interpolate(curve, 0.7) == (None, "missing")
    assert interpolate([], 0.1) == (None, "missing")
    assert interpolate([(0.1, 0.5)], 0.12) == (None, "missing")
    assert interpolate([(0.1, 0.5)], 0.1) == (0.5, "exact")
    assert interpolate([(0.1, None), (0.2, float("nan")), (0.0, 0.3), (0.1, 0.5), (0.1, 0.7)], 0.1) == (
        pytest.approx(0.6), "exact")


def test_interpolate_errors_in_log_space_never_reaches_zero():
    curve = [(0.1, 0.4), (0.2, 0.1), (0.4, 0.0)]  # the 0 (a dense point) is dropped in log space
    v, how = interpolate(curve, math.sqrt(0.02), log_values=True)
    assert how == "interpolated" and v == pytest.approx(0.2)  # geometric mean of 0.4 and 0.1
    assert interpolate(curve, 0.4, log_values=True) == (None, "missing")
    v, how = interpolate(curve, 0.28, log_values=True)  # the dropped 0: 0.28 is past the curve's end
    assert how == "extrapolated" and v == pytest.approx(0.1 * 0.25 ** (math.log(1.4) / math.log(2)))
    assert interpolate(curve[:2], 0.28, lo=0.0) == (0.0, "extrapolated")  # the linear rule clips to zero


def test_equal_density_rows_on_hand_made_points():
    pts = [dict(n=8, inputs="x", series=s, backend=b, density=d, mass=m, recall64=m, out_err=1 - m)
           for s, b, d, m in [("oracle", "oracle", 0.01, 0.5), ("a", "a", 0.01, 0.2), ("a", "a", 0.1, 0.6),
                              ("oracle", "oracle", 0.1, 0.9), ("oracle per block", "oracle", 0.01, 0.4),
                              ("oracle per block", "oracle", 0.1, 0.8)]]
    rows = equal_density(pts, at=[0.01, math.sqrt(0.001), 0.5])
    assert [r["series"] for r in rows] == ["a", "oracle per block", "oracle"]  # the reference last
    assert [r["reference"] for r in rows] == [False, False, True]  # through the registry: oracle is reference-only
    assert rows[1]["at"]["0.01"]["oracle_gap"] == pytest.approx(0.1)
    # recorded in the points, reference_only wins over the registry: a series named after its backend
    assert [r["reference"] for r in equal_density([dict(p, reference_only=p["series"] == "a") for p in pts])] == [
        False, False, True]
    assert [r["series"] for r in equal_density([dict(p, reference_only=p["series"] == "a") for p in pts])] == [
        "oracle", "oracle per block", "a"]
    a = rows[0]["at"]
    assert a["0.01"]["mass"] == 0.2 and a["0.01"]["oracle_gap"] == pytest.approx(0.3)
    assert a[f"{math.sqrt(0.001):g}"]["mass"] == pytest.approx(0.4)
    assert a[f"{math.sqrt(0.001):g}"]["oracle_gap"] == pytest.approx(0.3)
    assert a["0.5"]["mass"] is None and a["0.5"]["how"] == "missing" and a["0.5"]["oracle_gap"] is None
    assert rows[2]["at"]["0.01"]["oracle_gap"] is None


def test_spec_items_and_default_grids_build():
    from sparsekit import SparseAttention

    assert parse_spec_items(["w=streaming(window=8)", "streaming(window=8,sink=2)", "s/l=hip(k=64)"]) == [
        dict(series=None, label="w", spec="streaming(window=8)"),
        dict(series=None, label="streaming(window=8,sink=2)", spec="streaming(window=8,sink=2)"),
        dict(series="s", label="l", spec="hip(k=64)"),
    ]
    for n in (1024, 16384, 131072):
        grid = default_grid(n)
        names = [g["spec"].split("(")[0] for g in grid]
        # every backend that declares settings (not dense, not the test plug-in strided), reference-only last
        assert list(dict.fromkeys(names)) == ["block_threshold", "hip", "streaming", "vertical_slash", "oracle"]
        assert len({g["spec"] for g in grid}) == len(grid)
        for g in grid:
            attn = SparseAttention.from_string(g["spec"])
            assert attn.backend.name == g["spec"].split("(")[0]
            assert attn.backend.series() == g["series"]  # a spec of the grid lands on the same curve
            if attn.backend.name == "block_threshold":
                assert attn.backend.min_len == 0
        oracle = [g for g in grid if g["spec"].startswith("oracle(")]
        assert [g["series"] for g in oracle] == ["oracle"] * 13 + ["oracle per block"] * 13  # global first
        assert all("allocate=global" in g["spec"] for g in oracle[:13])
    assert {g["series"] for g in default_grid(4096, ["block_threshold"])} == {
        f"block_threshold {s} {k}" for s in ("pooled", "vslash", "antidiagonal") for k in ("alpha", "tau", "budget")}
    # --scorers reaches the backends whose sweep() takes scorers, and only those
    assert {g["series"] for g in default_grid(4096, ["block_threshold", "streaming"], ["pooled"])} == {
        "streaming", *(f"block_threshold pooled {k}" for k in ("alpha", "tau", "budget"))}


def test_a_third_party_backends_sweep_settings_are_picked_up(tmp_path):
    """default_grid asks every registered backend for its settings (Backend.sweep); nothing is keyed by name."""
    from dataclasses import dataclass
    from typing import ClassVar

    from sparsekit import Backend, Pattern
    from sparsekit.bench.sweep import sweep
    from sparsekit.registry import BACKENDS

    @dataclass
    class Ribbon(Backend):
        name: ClassVar[str] = "ribbon"
        window: int = 64
        sink: int = 0

        @classmethod
        def sweep(cls, n):
            return [dict(series="ribbon sinkless", label=f"w={w}", options=dict(window=w)) for w in (n // 16, n // 4)]

        def pattern(self, q, k, *, scale, q_offset):
            return Pattern.band(q, k, q_offset=q_offset, window=self.window, sink=self.sink)

    assert Backend.sweep(1024) == [] and BACKENDS.get("strided").sweep(1024) == []
    BACKENDS.register("ribbon", Ribbon)
    try:
        grid = default_grid(1024)
        mine = [g for g in grid if g["spec"].startswith("ribbon")]
        assert mine == [dict(series="ribbon sinkless", label="w=64", spec="ribbon(window=64)"),
                        dict(series="ribbon sinkless", label="w=256", spec="ribbon(window=256)")]
        assert grid[-1]["spec"].startswith("oracle(")  # reference-only backends still last
        assert default_grid(1024, ["ribbon"]) == mine
        res = sweep(ns=[512], backends=["ribbon", "oracle"], heads=2, kv_heads=1, head_dim=16, rows=8, plot_png=False,
                    at=[0.1, 0.3])
        pts = [p for p in res["points"] if p["backend"] == "ribbon"]
        assert [p["label"] for p in pts] == ["w=32", "w=128"] and all("error" not in p for p in pts)
        row = next(r for r in res["equal_density"] if r["series"] == "ribbon sinkless")
        assert not row["reference_only"] and row["at"]["0.1"]["oracle_gap"] is not None
        # a spec of it (--specs) lands on its backend's series(): the name by default
        got = sweep(ns=[512], specs=["ribbon(window=40)"], heads=2, kv_heads=1, head_dim=16, rows=8, plot_png=False)
        assert got["points"][0]["series"] == "ribbon"
    finally:
        BACKENDS.unregister("ribbon")
    assert not any(g["spec"].startswith("ribbon") for g in default_grid(1024))


def test_no_logic_in_the_sweep_branches_on_a_backend_name():
    """First-party backend names appear in sweep.py only in docstrings and the plot's colour table."""
    import ast

    import sparsekit.bench.sweep as mod

    names = {"streaming", "hip", "vertical_slash", "block_threshold", "oracle", "dense"}
    tree = ast.parse(open(mod.__file__).read())
    allowed = set()
    for node in ast.walk(tree):
        if isinstance(node, (ast.Module, ast.FunctionDef, ast.ClassDef)) and ast.get_docstring(node, clean=False):
            allowed.add(id(node.body[0].value))
        if isinstance(node, ast.Assign) and any(getattr(t, "id", "") == "fixed" for t in node.targets):
            allowed.update(id(k) for k in node.value.keys)
    bad = [(n.lineno, n.value) for n in ast.walk(tree)
           if isinstance(n, ast.Constant) and isinstance(n.value, str) and id(n) not in allowed
           and (n.value in names or any(n.value.startswith(x + " ") for x in names))]
    assert bad == []


def test_oracle_mass_map_is_reused_across_densities_but_never_across_inputs(monkeypatch):
    """The oracle keeps its last mass map (keyed by the inputs' identity and version): one per inputs and
    allocation, shared by every density, when the settings of one allocation come together (as its sweep() gives)."""
    from sparsekit.bench.sweep import sweep
    from sparsekit.registry import BACKENDS

    cls = BACKENDS.get("oracle")
    calls = []
    orig = cls._mass
    monkeypatch.setattr(cls, "_mass", lambda self, q, k, **kw: calls.append(kw["weighted"]) or orig(self, q, k, **kw))
    specs = [f"a=oracle(density=0.1,{B32},allocate=global)", f"b=oracle(density=0.3,{B32},allocate=global)",
             f"c=oracle(density=0.1,{B32})", f"d=oracle(density=0.3,{B32})"]
    kw = dict(ns=[512], specs=specs, heads=2, kv_heads=1, head_dim=16, rows=8, plot_png=False)
    both = sweep(inputs=["random", "structured"], **kw)["points"]
    assert calls == [True, False, True, False]  # once per inputs and allocation, shared by both densities
    alone = sweep(inputs=["structured"], **kw)["points"]
    got = {(p["inputs"], p["label"]): p["mass"] for p in both}
    assert [got[("structured", p["label"])] for p in alone] == [p["mass"] for p in alone]
    assert got[("random", "a")] != got[("structured", "a")]


def test_fast_output_error_matches_the_bench_reference():
    """The sweep's output of a pattern from cached row scores equals runner._rows_ref over the same keys."""
    from sparsekit import SparseAttention
    from sparsekit.bench.inputs import structured_qkv
    from sparsekit.bench.runner import _quality, _row_scores, _rows_ref
    from sparsekit.bench.sweep import _rows_out

    q, k, v = structured_qkv(512, q_heads=4, kv_heads=2, head_dim=32, dtype=torch.float32, device="cpu")
    pat = SparseAttention.from_string(f"hip(k=64,{B32},stages='',sink=32,window=32)").plan(q, k).pattern
    rows = torch.tensor([0, 5, 100, 300, 511])
    scores = _row_scores(q, k, rows, 32 ** -0.5)
    keys = torch.arange(512)
    ref = _rows_ref(q, k, v, rows, 32 ** -0.5, lambda r: (keys[: r + 1], pat.expand(pat.keep(r, r + 1, keys[: r + 1]))))
    assert torch.allclose(_rows_out(scores, v, pat), ref, atol=1e-5)
    dense = _rows_ref(q, k, v, rows, 32 ** -0.5, lambda r: (keys[: r + 1], None))
    assert torch.allclose(_rows_out(scores, v, None), dense, atol=1e-5)
    assert _quality(q, k, rows, 32 ** -0.5, pat, scores=scores) == pytest.approx(_quality(q, k, rows, 32 ** -0.5, pat))


@pytest.mark.parametrize("argv, msg", [
    (["sweep", "--n", "1K", "--specs", "x=nosuch(k=1)", "--no-plot"], "unknown backend"),
    (["sweep", "--n", "1K", "--specs", "x=streaming(window=8)+delta(gamma=64)", "--no-plot"], "bare backends"),
    (["sweep", "--n", "1K", "--backends", "dense", "--no-plot"], "no default settings for backend"),
    (["sweep", "--n", "1K", "--inputs", "weird", "--no-plot"], "inputs must be among"),
    (["sweep", "--n", "1K", "--rows", "0", "--no-plot"], "rows must be >= 1"),
])
def test_bad_arguments_are_one_line_messages(argv, msg, capsys, tmp_path):
    assert main([*argv, "--out", str(tmp_path)]) == 2
    err = capsys.readouterr().err
    assert msg in err and "Traceback" not in err and len(err.strip().splitlines()) == 1


def test_no_cuda_and_no_matplotlib_are_messages(capsys, tmp_path, monkeypatch):
    if not torch.cuda.is_available():
        assert main(["sweep", "--n", "1K", "--device", "cuda", "--out", str(tmp_path)]) == 2
        assert "no CUDA device" in capsys.readouterr().err
    monkeypatch.setitem(sys.modules, "matplotlib", None)  # import matplotlib -> ImportError
    assert main(["sweep", "--n", "1K", "--specs", "streaming(window=8)", "--out", str(tmp_path)]) == 2
    err = capsys.readouterr().err
    assert 'pip install "sparsekit-prefill[plot]"' in err and "--no-plot" in err and "Traceback" not in err
    assert not (tmp_path / "sweep.json").exists()  # it failed before the work
    with pytest.raises(SystemExit) as e:
        main(["sweep", "--at", "0"])
    assert e.value.code == 2
