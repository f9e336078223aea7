"""Report tables and the verdict, built from constructed result files with known answers (no transformers)."""

import json
import math
import random
import shutil
from pathlib import Path

import pytest

from sparsekit import SparseAttention
from sparsekit.eval.report import build_report, retrieval_summary
from sparsekit.eval.verdict import (
    attention_cost,
    build_verdict,
    perplexity_measurement,
    references,
    retrieval_measurements,
    split_spec,
)

B = "streaming(window=64,sink=4)"
SPECS = {
    "dense": "sdpa",
    "streaming": B,
    "streaming+tail": B + "+tailonly(gamma=16)",
    "streaming+recompute": B + "+recompute(gamma=16)",
    "streaming+delta": B + "+delta(gamma=16)",
}
# passkey: config c answers contexts 0..K[c]-1 correctly, out of 40
K = {"dense": 40, "streaming": 10, "streaming+tail": 30, "streaming+recompute": 30, "streaming+delta": 20}


def retrieval_records(length=1024, n=40, multivalue=False, with_context=True):
    out = []
    for i in range(n):
        for c, spec in SPECS.items():
            ok = i < K[c]
            r = dict(length=length, sample=i, context="", seed=i, n_tokens=1000, config=c, spec=spec,
                     task="passkey", q=0, answers=["12345"], output=" 12345." if ok else " 99.", correct=ok,
                     prefill_s=0.5, answer_s=0.1)
            if not with_context:
                del r["context"]
            out.append(r)
            if multivalue:  # dense finds all four values, every other config two of them
                vals = ["1111111", "2222222", "3333333", "4444444"]
                found = vals if c == "dense" else vals[:2]
                out.append(dict(r, task="multivalue", q=1, answers=vals, output=" " + ", ".join(found),
                                correct=c == "dense"))
    return out


# perplexity: per-token NLL of two 64-token texts; offsets from dense (delta noisy, worse than everything)
_rng = random.Random(0)
DENSE_NLL = [1.0 + 0.3 * math.sin(i) for i in range(128)]
NOISE = [_rng.gauss(0, 0.2) for _ in range(128)]
NLL = {
    "dense": DENSE_NLL,
    "streaming": [x + 0.2 for x in DENSE_NLL],
    "streaming+tail": [x + 0.1 for x in DENSE_NLL],
    "streaming+recompute": [x + 0.1 for x in DENSE_NLL],
    "streaming+delta": [x + 0.5 + e for x, e in zip(DENSE_NLL, NOISE)],
}


def mean_ppl(c):
    return math.exp(sum(NLL[c]) / len(NLL[c]))


def ppl_result():
    rows = []
    for t, text in enumerate(["a.py", "b.py"]):
        for c, spec in SPECS.items():
            toks = NLL[c][64 * t : 64 * (t + 1)]
            m = sum(toks) / 64
            rows.append(dict(text=text, config=c, spec=spec, tokens=64, nll=m, ppl=math.exp(m), seconds=1.0,
                             nll_tokens=toks))
    return dict(length=512, last=64, meta={"model": "tiny"}, rows=rows)


def write_results(folder: Path, **kw) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    recs = retrieval_records(**kw)
    (folder / "retrieval.jsonl").write_text("".join(json.dumps(r) + "\n" for r in recs))
    meta = dict(model="tiny", device="cpu", dtype="float32", shared=True, tasks=["passkey"], seed=0,
                configs=[dict(label=c, spec=None if c == "dense" else s, dense_layers=[]) for c, s in SPECS.items()],
                layers=dict(n_layers=4, sparse=[1, 3], sliding=[0, 2], dense=[], window=64))
    (folder / "retrieval_meta.json").write_text(json.dumps(meta))
    (folder / "ppl.json").write_text(json.dumps(ppl_result()))
    return folder


# ------------------------------------------------------------------------------ roles and costs
def test_split_spec_and_references():
    assert split_spec("sdpa") == (None, None) and split_spec(None) == (None, None)
    assert split_spec("streaming(window=8, sink=2) + delta(gamma=4,interpolation=linear)") == (
        "streaming(window=8,sink=2)", "delta(gamma=4,interpolation=linear)")
    refs = references(list(SPECS.items()))
    assert refs["dense"] == {}
    assert refs["streaming"] == {"dense": "dense"}
    assert refs["streaming+tail"] == {"dense": "dense", "plain": "streaming"}
    assert refs["streaming+delta"] == {"dense": "dense", "plain": "streaming", "tail": "streaming+tail"}
    # with two tail controls the one with the same gamma is the reference; other backends are not mixed
    two = [("t4", B + "+tailonly(gamma=4)"), ("t16", B + "+tailonly(gamma=16)"), ("d16", B + "+delta(gamma=16)"),
           ("x", "streaming(window=32,sink=4)+delta(gamma=16)")]
    refs = references(two)
    assert refs["d16"] == {"tail": "t16"} and refs["x"] == {}


def test_attention_cost():
    assert attention_cost("sdpa", 1000) == (1.0, 1.0, 0.0)
    c = SparseAttention.from_string(SPECS["streaming+delta"]).cost(1000)
    got = attention_cost(SPECS["streaming+delta"], 1000)
    assert got == pytest.approx((c.density, c.backend_pairs / c.dense_pairs, c.corrector_pairs / c.dense_pairs))
    assert 0 < got[2] < got[0] < 1
    assert attention_cost("nosuchbackend(x=1)", 1000) is None  # unknown here: "density unknown", no crash


# ------------------------------------------------------------------------------ verdict
def test_retrieval_verdict_numbers():
    (m,) = retrieval_measurements(retrieval_records())
    rows = {r.label: r for r in m.rows}
    assert m.n_tokens == 1000 and "40 questions over 40 contexts" in m.title
    assert rows["streaming+delta"].value == 0.5 and rows["streaming+delta"].detail == "20/40"
    vs_tail = rows["streaming+delta"].comparisons["tail"]
    assert vs_tail.interval.estimate == pytest.approx(-0.25) and (vs_tail.wins, vs_tail.losses) == (0, 10)
    assert vs_tail.interval.hi < 0 and vs_tail.outcome == "worse"
    vs_plain = rows["streaming+delta"].comparisons["plain"]
    assert vs_plain.interval.estimate == pytest.approx(0.25) and vs_plain.outcome == "better"
    assert rows["streaming+recompute"].comparisons["tail"].outcome == "same"
    vs_dense = rows["streaming"].comparisons["dense"]
    assert vs_dense.interval.estimate == pytest.approx(-0.75) and (vs_dense.wins, vs_dense.losses) == (0, 30)


def test_retrieval_verdict_keeps_only_samples_every_config_finished():
    recs = [r for r in retrieval_records() if not (r["config"] == "streaming" and r["sample"] >= 30)]
    (m,) = retrieval_measurements(recs)
    rows = {r.label: r for r in m.rows}
    assert rows["dense"].detail == "30/30" and rows["streaming+tail"].detail == "30/30"


def test_perplexity_verdict_numbers():
    m = perplexity_measurement(ppl_result())
    rows = {r.label: r for r in m.rows}
    assert rows["streaming"].value == pytest.approx(mean_ppl("streaming"))
    assert rows["streaming"].comparisons["dense"].interval.estimate == pytest.approx(math.exp(0.2))
    assert rows["streaming"].comparisons["dense"].interval.lo == pytest.approx(math.exp(0.2))  # constant shift
    delta = rows["streaming+delta"].comparisons
    assert delta["tail"].outcome == "worse" and delta["plain"].outcome == "worse"
    assert delta["tail"].interval.estimate == pytest.approx(mean_ppl("streaming+delta") / mean_ppl("streaming+tail"))
    assert rows["streaming+tail"].comparisons["plain"].outcome == "better"
    assert rows["streaming+recompute"].comparisons["tail"].outcome == "same"
    assert "2 texts" not in m.title and "a.py, b.py (128 scored tokens)" in m.title


def test_verdict_text_states_what_to_do(tmp_path):
    text = build_verdict(write_results(tmp_path / "r"))
    assert text.startswith("# Verdict")
    assert "Sparse configs run on 2 of 4 attention layers (2 are the model's own sliding window" in text
    delta = next(line for line in text.splitlines() if line.startswith("* **streaming+delta**"))
    assert "**The corrector does harm here: the tail-only control is the better choice.**" in delta
    assert "Worse than the tail-only control at 1024 tokens (-25 pts, 95% CI [" in delta
    assert "0 wins / 10 losses" in delta
    assert f"worse than no correction in perplexity ({mean_ppl('streaming+delta'):.2f} vs {mean_ppl('streaming'):.2f}" in delta
    assert "better than no correction at 1024 tokens (+25 pts" in delta
    recompute = next(line for line in text.splitlines() if line.startswith("* **streaming+recompute**"))
    assert "No measurable gain over the tail-only control, which costs less" in recompute
    assert "identical to the tail-only control at 1024 tokens (every question)" in recompute
    tail = next(line for line in text.splitlines() if line.startswith("* **streaming+tail**"))
    assert "better than no correction at 1024 tokens (+50 pts" in tail
    # the table row: density, corrector share, accuracy and the paired cells
    row = next(line for line in text.splitlines() if line.startswith("| streaming+delta | "))
    cost = attention_cost(SPECS["streaming+delta"], 1000)
    assert f"| {100 * cost[0]:.1f}% | +{100 * cost[2]:.1f}% | 50% (20/40) | -50 pts [" in row
    assert "-25 pts [" in row and "+0/-10" in row


def test_few_questions_are_not_called_a_difference():
    """4 losses out of 10 contexts: the bootstrap interval excludes 0, the exact sign test (p = 0.125) does not."""
    recs = [r for r in retrieval_records(n=10) if r["config"] in ("streaming", "streaming+tail", "streaming+delta")]
    for r in recs:  # tail right on 0..5, delta right on 0..1: 4 losses, no win
        r["correct"] = r["sample"] < {"streaming": 0, "streaming+tail": 6, "streaming+delta": 2}[r["config"]]
    (m,) = retrieval_measurements(recs)
    cmp = next(r for r in m.rows if r.label == "streaming+delta").comparisons["tail"]
    assert (cmp.wins, cmp.losses) == (0, 4) and cmp.interval.hi < 0
    assert cmp.outcome == "within"
    one = [r for r in recs if r["sample"] == 0]
    (m,) = retrieval_measurements([dict(r, correct=r["config"] != "streaming+delta") for r in one])
    assert next(r for r in m.rows if r.label == "streaming+delta").comparisons["tail"].outcome == "unknown"
    from sparsekit.eval.verdict import verdict_markdown

    assert "Too few contexts to judge it against the tail-only control" in verdict_markdown([m])


def test_verdict_without_tail_control_or_costs():
    recs = [dict(r, spec="mystery(k=1)" if r["spec"] == B else r["spec"].replace(B, "mystery(k=1)"))
            for r in retrieval_records() if r["config"] != "streaming+tail"]
    (m,) = retrieval_measurements(recs)
    rows = {r.label: r for r in m.rows}
    assert "tail" not in rows["streaming+delta"].comparisons and rows["streaming+delta"].cost is None
    from sparsekit.eval.verdict import verdict_markdown

    text = verdict_markdown([m])
    assert "Density unknown" in text
    assert "The corrector helps over no correction (no tail-only control was run" in text
    assert "No retrieval or perplexity results here to judge yet: run `sparsekit eval retrieval`" in verdict_markdown([])


# ------------------------------------------------------------------------------ report
def test_report_tables_from_constructed_files(tmp_path):
    out = write_results(tmp_path / "r", multivalue=True)
    (out / "commands.txt").write_text("2026-01-01 00:00:00 UTC [retrieval] sparsekit eval retrieval ...\n")
    fid = dict(length=512, text="a.py", rows=[300, 363], capture_s=0.1, meta={"model": "tiny"}, layers=[1, 3],
               configs={"streaming": dict(spec=B, cos_mean=[0.9, 0.8], cos_p10=[0.8, 0.7], cos_median=[0.9, 0.8],
                                          rho_mean=[0.5, None], rho_p10=[0.4, None], rho_median=[0.5, None],
                                          recon_err=[1e-5, None])})
    (out / "fidelity.json").write_text(json.dumps(fid))
    g = 4
    layer = dict(ratio_repeat=[0.0, 1.0, 1.5, 2.0], ratio_linear=[0.0, 0.5, 0.75, 1.0], helped_repeat=[1, 0.5, 0.4, 0.3],
                 helped_linear=[1, 0.6, 0.5, 0.4], cos=[1, 0.5, 0.4, 0.3], pooled_cos=0.4, pooled_ratio_repeat=1.5,
                 pooled_ratio_linear=0.75, pooled_helped_repeat=0.4, pooled_helped_linear=0.5)
    loc = dict(length=512, text="a.py", backend=B, gamma=g, n_body=256, meta={}, layers={"1": layer, "3": dict(layer, pooled_ratio_repeat=2.5)})
    (out / "locality.json").write_text(json.dumps(loc))
    md = build_report(out).read_text()
    # retrieval: accuracy, partial credit, gap closed (tail: (37.5% - 12.5%) / (100% - 12.5%) = 29%)
    assert "### 1024 tokens (40 samples per task and config, paired)" in md
    assert "| dense | 100% (40/40) | 100% (40/40), recall 100% | 100% (80/80) | 100% |" in md
    assert "| streaming+tail | 75% (30/40) | 0% (0/40), recall 50% | 38% (30/80) | 29% |" in md
    assert "| streaming+delta | +0/-20 / +10/-0 / +0/-10 | +0/-40 / +0/-0 / +0/-0 |" in md
    # perplexity section: mean NLL, ppl, difference to dense, tokens worse than dense
    d = sum(NLL["dense"][:64]) / 64
    assert f"| a.py | streaming | {d + 0.2:.4f} | {math.exp(d + 0.2):.3f} | {math.exp(d + 0.2) - math.exp(d):+.3f} | 64/64 |" in md
    # fidelity and locality sections
    assert "| streaming | 0.850 | 0.800 | 0.500 | 1.0e-05 |" in md
    assert "| mean | 2.00 | 0.75 | 40% | 50% | 0.40 |" in md
    assert "j=1: 1.00, j=2: 1.50" in md
    # the verdict opens the summary and is written on its own; CSV/JSON tables are written
    assert md.index("## Verdict") < md.index("## Retrieval accuracy")
    assert (out / "verdict.md").read_text().startswith("# Verdict")
    rows = json.loads((out / "retrieval_summary.json").read_text())
    tail_all = next(r for r in rows if r["config"] == "streaming+tail" and r["task"] == "all")
    assert (tail_all["correct"], tail_all["n"]) == (30, 80) and tail_all["gap_closed"] == pytest.approx(25 / 87.5)
    assert (out / "ppl_summary.csv").read_text().startswith("text,config,spec,tokens,nll,ppl,seconds")
    assert "nll_tokens" not in (out / "ppl_summary.csv").read_text()


def test_report_reads_records_without_context(tmp_path):
    """Records written before they named their context: one context per task when the meta says so."""
    out = tmp_path / "old"
    out.mkdir()
    recs = retrieval_records(n=3, multivalue=True, with_context=False)
    (out / "retrieval.jsonl").write_text("".join(json.dumps(r) + "\n" for r in recs + recs[:5]))  # + duplicates
    (out / "retrieval_meta.json").write_text(json.dumps(dict(shared=False, configs=[])))
    md = build_report(out).read_text()
    assert "### 1024 tokens (3 samples per task and config, paired)" in md
    assert "| dense | 100% (3/3) | 100% (3/3), recall 100% | 100% (6/6) |" in md
    rows = retrieval_summary([dict(r, context=r["task"]) for r in recs])
    assert {r["samples"] for r in rows if r["task"] == "all"} == {6}


def test_report_refuses_a_missing_or_empty_folder(tmp_path):
    with pytest.raises(FileNotFoundError, match="does not exist"):
        build_report(tmp_path / "missing")
    (tmp_path / "empty").mkdir()
    with pytest.raises(FileNotFoundError, match="holds no eval results"):
        build_report(tmp_path / "empty")


def test_committed_results_still_build(tmp_path):
    """The committed H200 results (written by earlier versions) rebuild, with a verdict."""
    src = Path(__file__).resolve().parents[1] / "bench" / "results" / "eval" / "h200"
    if not (src / "retrieval.jsonl").exists():
        pytest.skip("committed results not present")
    out = tmp_path / "h200"
    shutil.copytree(src, out)
    md = build_report(out).read_text()
    assert "### 4096 tokens (29-30 samples per task and config, paired)" in md
    verdict = (out / "verdict.md").read_text()
    delta = next(line for line in verdict.splitlines() if line.startswith("* **streaming+delta**"))
    assert "worse than the tail-only control in perplexity (8.25 vs 5.34" in delta.lower()
