"""A backend x corrector grid in ``sparsekit eval``: the grid file, measured densities, per-backend references.

The first part needs no transformers (constructed result files); the last test runs the perplexity,
retrieval and fidelity runners on a tiny random Llama with a grid of two backends (one data-dependent)
and four correctors, ``meancorr`` included, and rebuilds the report.
"""

import json
import math

import pytest

from sparsekit.cli import main
from sparsekit.eval.configs import parse_configs, read_configs_file
from sparsekit.eval.report import build_report, retrieval_summary
from sparsekit.eval.verdict import (
    measured_cost,
    perplexity_measurement,
    references,
    retrieval_measurements,
    verdict_markdown,
)

S = "streaming(window=64,sink=4)"
O = "oracle(density=0.25,block_q=16,block_k=16)"  # data-dependent: no static cost
CORR = {"": None, "+tail": "tailonly(gamma=16)", "+delta": "delta(gamma=16)", "+meancorr": "meancorr(gamma=16)"}


def grid():
    out = {"dense": "sdpa"}
    for name, b in (("s", S), ("o", O)):
        for suffix, c in CORR.items():
            out[name + suffix] = b if c is None else f"{b}+{c}"
    return out


# ------------------------------------------------------------------------------ the grid file
def test_configs_file(tmp_path):
    f = tmp_path / "grid.txt"
    f.write_text("# a comment\n\ndense\n  s=streaming(window=8,sink=2)   # trailing comment\n"
                 "s+d=streaming(window=8,sink=2)+delta(gamma=4)\n")
    items = read_configs_file(f)
    assert items == ["dense", "s=streaming(window=8,sink=2)", "s+d=streaming(window=8,sink=2)+delta(gamma=4)"]
    assert [(c.label, c.spec) for c in parse_configs(items)] == [
        ("dense", None), ("s", "streaming(window=8,sink=2)"), ("s+d", "streaming(window=8,sink=2)+delta(gamma=4)")]
    (tmp_path / "empty.txt").write_text("# nothing\n\n")
    with pytest.raises(ValueError, match="holds no config"):
        read_configs_file(tmp_path / "empty.txt")
    with pytest.raises(FileNotFoundError, match="no such file"):
        read_configs_file(tmp_path / "missing.txt")


def test_committed_grid_builds():
    from pathlib import Path

    path = Path(__file__).resolve().parents[1] / "bench" / "grids" / "abl8k.txt"
    cfgs = parse_configs(read_configs_file(path))
    for c in cfgs:
        c.attention()  # every spec builds
    refs = references([(c.label, c.spec or "sdpa") for c in cfgs])
    for b in ("streaming", "hip", "vslash", "bt", "oracle"):
        assert refs[f"{b}+meancorr"] == {"dense": "dense", "plain": b, "tail": f"{b}+tail"}
        assert refs[f"{b}+delta"]["tail"] == f"{b}+tail"


@pytest.mark.parametrize("extra, message", [
    (["--configs-file", "NOPE"], "--configs-file: no such file"),
    (["--configs-file", "BAD"], "config 'x' (spec 'streaming(window=8,sink=2)+nosuch(gamma=4)')"),
])
def test_configs_file_errors_before_any_work(capsys, tmp_path, extra, message):
    (tmp_path / "BAD").write_text("dense\nx=streaming(window=8,sink=2)+nosuch(gamma=4)\n")
    extra = [str(tmp_path / e) if e in ("NOPE", "BAD") else e for e in extra]
    rc = main(["eval", "ppl", *extra, "--model", str(tmp_path / "nope"), "--out", str(tmp_path / "out")])
    err = capsys.readouterr().err
    assert rc == 2 and message in err and len(err.strip().splitlines()) == 1
    assert not (tmp_path / "out").exists()


# ------------------------------------------------------------------------------ constructed results
# passkey over 20 contexts: config answers contexts 0..K-1
K = {"dense": 20, "s": 4, "s+tail": 12, "s+delta": 8, "s+meancorr": 14, "o": 10, "o+tail": 16, "o+delta": 16,
     "o+meancorr": 18}
PAIRS = {"o": (30.0, 0.0), "o+tail": (25.0, 10.0), "o+delta": (24.0, 14.0), "o+meancorr": (25.0, 12.0)}


def records(n=20):
    out = []
    for i in range(n):
        for c, spec in grid().items():
            r = dict(length=1000, sample=i, context="", seed=i, n_tokens=1000, config=c, spec=spec, task="passkey",
                     q=0, answers=["1"], output="1" if i < K[c] else "2", correct=i < K[c], prefill_s=0.1, answer_s=0.1)
            if c in PAIRS:  # measured by sparsekit.hf during the prefill
                r["pairs"] = dict(backend=PAIRS[c][0], corrector=PAIRS[c][1], dense=100)
            out.append(r)
    return out


def test_measured_cost():
    assert measured_cost([]) is None and measured_cost([None, {}]) is None
    got = measured_cost([dict(backend=10, corrector=2, dense=100), dict(backend=30, corrector=0, dense=100)])
    assert got == pytest.approx((0.21, 0.2, 0.01))


def test_verdict_and_report_of_two_backends(tmp_path):
    (m,) = retrieval_measurements(records())
    rows = {r.label: r for r in m.rows}
    # each corrector against the plain backend and the tail-only control of its own backend
    assert rows["o+meancorr"].comparisons["tail"].ref == "o+tail"
    assert rows["o+meancorr"].comparisons["plain"].ref == "o"
    assert rows["s+meancorr"].comparisons["tail"].ref == "s+tail"
    assert rows["o+delta"].comparisons["tail"].outcome == "same"
    # density: measured pairs where the records carry them, the static cost otherwise
    assert rows["o+meancorr"].cost == pytest.approx((0.37, 0.25, 0.12))
    assert rows["s+meancorr"].cost is not None and rows["dense"].cost == (1.0, 1.0, 0.0)
    text = verdict_markdown([m])
    assert "Density unknown" not in text
    assert "| o+meancorr | 37.0% | +12.0% | 90% (18/20) |" in text
    # the backend x corrector grid under the table
    assert "| backend | no correction | `tailonly(gamma=16)` | `delta(gamma=16)` | `meancorr(gamma=16)` |" in text
    assert f"| o (`{O}`) | 50% (30.0%) | 80% (35.0%) | 80% (38.0%) | 90% (37.0%) |" in text
    # the report: gap closed and paired wins/losses against each config's own backend
    summary = {(r["config"], r["task"]): r for r in retrieval_summary(records())}
    assert summary[("o+meancorr", "all")]["gap_closed"] == pytest.approx((18 - 10) / (20 - 10))
    assert summary[("s+meancorr", "all")]["gap_closed"] == pytest.approx((14 - 4) / (20 - 4))
    assert summary[("o", "all")]["gap_closed"] == 0 and summary[("dense", "all")]["gap_closed"] == 1
    assert summary[("o+meancorr", "passkey")]["vs_stream"] == "+8/-0"  # vs o
    assert summary[("o+meancorr", "passkey")]["vs_tail"] == "+2/-0"  # vs o+tail
    out = tmp_path / "r"
    out.mkdir()
    (out / "retrieval.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records()))
    md = build_report(out).read_text()
    assert "| o+meancorr | +0/-2 / +8/-0 / +2/-0 |" in md


def test_perplexity_measured_density():
    rows = []
    for t in ("a.py", "b.py"):
        for c, spec in grid().items():
            nll = [1.0 + 0.1 * (c != "dense")] * 32
            r = dict(text=t, config=c, spec=spec, tokens=32, nll=nll[0], ppl=math.exp(nll[0]), seconds=1, nll_tokens=nll)
            if c in PAIRS:
                r["pairs"] = dict(backend=PAIRS[c][0], corrector=PAIRS[c][1], dense=100)
            rows.append(r)
    m = perplexity_measurement(dict(length=256, last=32, rows=rows))
    got = {r.label: r.cost for r in m.rows}
    assert got["o+tail"] == pytest.approx((0.35, 0.25, 0.10))
    assert got["s"] is not None  # static cost of a streaming spec


# ------------------------------------------------------------------------------ on a tiny model
def test_runners_on_a_grid_of_two_backends(tmp_path):
    transformers = pytest.importorskip("transformers")
    import torch
    from char_tokenizer import CharTokenizer

    from sparsekit.eval.configs import Config
    from sparsekit.eval.fidelity import run_fidelity
    from sparsekit.eval.perplexity import run_perplexity
    from sparsekit.eval.retrieval import run_retrieval
    from sparsekit.eval.tasks import make_samples

    torch.manual_seed(0)
    cfg = transformers.LlamaConfig(vocab_size=128, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                                   num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=1024,
                                   attn_implementation="sdpa")
    model = transformers.LlamaForCausalLM(cfg).eval()
    with torch.no_grad():
        for layer in model.model.layers:
            layer.self_attn.q_proj.weight.mul_(4.0)
            layer.self_attn.k_proj.weight.mul_(4.0)
    tok = CharTokenizer()
    cfgs = [Config("dense", None)] + [Config(c, s) for c, s in grid().items() if c != "dense"]
    run_perplexity(model, tok, cfgs, tmp_path, length=400, last=64, texts=["argparse.py"], device="cpu",
                   progress=False)
    ppl = json.loads((tmp_path / "ppl.json").read_text())
    by = {r["config"]: r for r in ppl["rows"]}
    assert "pairs" not in by["dense"]  # the model's own SDPA: nothing counted
    p = by["o+meancorr"]["pairs"]  # counted over the 2 layers, per (batch item, query head)
    assert p["dense"] == 2 * 400 * 401 // 2 and 0 < p["backend"] < p["dense"] and p["corrector"] > 0
    s = by["s"]["pairs"]
    from sparsekit import SparseAttention

    static = SparseAttention.from_string(S).cost(400)
    assert s["backend"] == pytest.approx(2 * static.backend_pairs)
    samples = make_samples(tok, ["passkey"], 400, 1, seed=0)
    run_retrieval(model, tok, samples, cfgs, tmp_path / "retrieval.jsonl", device="cpu", progress=False)
    recs = [json.loads(line) for line in (tmp_path / "retrieval.jsonl").read_text().splitlines()]
    assert all("pairs" in r for r in recs if r["config"] != "dense")
    run_fidelity(model, tok, cfgs, tmp_path, length=400, text="argparse.py", rows=16, device="cpu", progress=False)
    fid = json.loads((tmp_path / "fidelity.json").read_text())
    mc = fid["configs"]["o+meancorr"]
    assert len(mc["density"]) == 2 and all(0 < d < 1 for d in mc["density"])
    assert all(x is not None for x in mc["rho_mean"]) and max(mc["recon_err"]) < 1e-4
    assert max(fid["configs"]["o+delta"]["recon_err"]) < 1e-4
    md = build_report(tmp_path).read_text()
    verdict = (tmp_path / "verdict.md").read_text()
    assert "Density unknown" not in verdict and "?" not in next(
        line for line in verdict.splitlines() if line.startswith("| o+meancorr |"))
    assert "by backend and corrector" in verdict
    assert "## Attention fidelity per layer" in md and "| o+meancorr |" in md


def test_batched_spearman_equals_row_by_row():
    """The fidelity probe ranks all (head, row) prefixes in one sort: the same numbers as spearman() per row,
    ties (zeros of a sparse row, repeated values) and constant rows (NaN) included."""
    import torch

    from sparsekit.eval.fidelity import prefix_ranks, prefix_spearman, rankdata, spearman

    g = torch.Generator().manual_seed(0)
    H, N = 3, 90
    positions = torch.tensor([0, 1, 5, 40, 41, 70, 89])
    R = positions.numel()
    a = torch.rand(H, R, N, generator=g, dtype=torch.float64)
    b = a + 0.3 * torch.rand(H, R, N, generator=g, dtype=torch.float64)
    a[a < 0.4] = 0.0  # ties at zero, as a sparse attention row has
    b = torch.round(b * 8) / 8  # ties among the kept values
    b[1, 4] = 0.25  # a constant row: NaN
    got = prefix_spearman(prefix_ranks(a, positions), prefix_ranks(b, positions))
    want = torch.stack([spearman(a[:, j, : p + 1], b[:, j, : p + 1]) for j, p in enumerate(positions.tolist())], 1)
    torch.testing.assert_close(got, want, equal_nan=True, rtol=1e-12, atol=1e-12)
    assert torch.isnan(got[1, 4]) and torch.isnan(got[:, 0]).all()  # one key: constant
    ranks = prefix_ranks(a, positions)  # centred average ranks of the prefix, 0 past it
    for j, p in enumerate(positions.tolist()):
        torch.testing.assert_close(ranks[:, j, : p + 1], rankdata(a[:, j, : p + 1]) - p / 2)
        assert not ranks[:, j, p + 1:].any()


def test_fidelity_report_of_a_grid(tmp_path):
    """Many configs: cosine-only per-layer table, density column, a backend x corrector grid; a corrector
    without effective rows (ρ None) is rendered, not a crash."""
    configs = {}
    for i, (label, spec) in enumerate(c for c in grid().items() if c[0] != "dense"):
        rho = [None, None] if label == "s+meancorr" else [0.5, 0.6]
        configs[label] = dict(spec=spec, cos_mean=[0.9, 0.8 + 0.01 * i], cos_p10=[0.8, 0.7], cos_median=[0.9, 0.8],
                              rho_mean=rho, rho_p10=rho, rho_median=rho,
                              recon_err=[None, None] if rho[0] is None else [1e-6, 2e-6], density=[0.2, 0.3])
    (tmp_path / "fidelity.json").write_text(json.dumps(dict(length=512, text="a.py", rows=[300, 363], capture_s=0.1,
                                                            meta={}, layers=[0, 1], configs=configs)))
    md = build_report(tmp_path).read_text()
    assert "Per layer: output cosine (8 configs" not in md  # 8 configs: still both columns
    assert "| layer | cos s | cos s+tail |" in md and "| ρ s |" in md
    assert "| config | cos, mean over layers | cos, worst layer | ρ, mean over layers | max recon err | density, mean over layers |" in md
    assert "| s+meancorr | 0.865 | 0.830 | nan | nan | 25.0% |" in md
    assert "| backend | no correction | `tailonly(gamma=16)` | `delta(gamma=16)` | `meancorr(gamma=16)` |" in md
    assert "| s | 0.850 (ρ 0.55) | 0.855 (ρ 0.55) | 0.860 (ρ 0.55) | 0.865 |" in md
    configs["extra"] = dict(configs["s"], spec=S + "+recompute(gamma=16)")  # 9 configs: cosine only per layer
    (tmp_path / "fidelity.json").write_text(json.dumps(dict(length=512, text="a.py", rows=[300, 363], capture_s=0.1,
                                                            meta={}, layers=[0, 1], configs=configs)))
    md = build_report(tmp_path).read_text()
    assert "Per layer: output cosine (9 configs" in md and "| ρ s |" not in md


def test_shared_pattern_leaves_the_backend_as_it_was():
    """The fidelity probe hands a backend's pattern to its configs; the backend is untouched afterwards;
    a backend without instance attributes computes its own."""
    from dataclasses import dataclass
    from typing import ClassVar

    import torch

    from sparsekit import Backend, Pattern, SparseAttention
    from sparsekit.eval.fidelity import _fixed_pattern

    a = SparseAttention.from_string("streaming(window=8,sink=2)")
    q = k = torch.randn(1, 2, 40, 8)
    pat = a.backend.pattern(q, k, scale=0.3, q_offset=0)
    with _fixed_pattern(a.backend, "sentinel"):
        assert a.backend.pattern(q, k, scale=0.3, q_offset=0) == "sentinel"
    assert "pattern" not in vars(a.backend) and a.backend.pattern(q, k, scale=0.3, q_offset=0).nq == pat.nq

    @dataclass(frozen=True)
    class Frozen(Backend):
        name: ClassVar[str] = "frozen_test"

        def pattern(self, q, k, *, scale, q_offset):
            return Pattern.causal(q, k, q_offset=q_offset)

    fb = Frozen()  # a frozen dataclass takes the shared pattern too, and gives it back
    with _fixed_pattern(fb, "sentinel"):
        assert fb.pattern(q, k, scale=0.3, q_offset=0) == "sentinel"
    assert isinstance(fb.pattern(q, k, scale=0.3, q_offset=0), Pattern)

    class Slotted:  # no instance attributes at all: it keeps computing its own pattern
        __slots__ = ()

        def pattern(self, q, k, *, scale, q_offset):
            return "own"

    sb = Slotted()
    with _fixed_pattern(sb, "sentinel"):
        assert sb.pattern(q, k, scale=0.3, q_offset=0) == "own"
