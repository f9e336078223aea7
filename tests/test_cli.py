"""The command line as a user meets it: tables, messages (never tracebacks), exit codes."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from sparsekit.cli import main


def test_bench_on_cpu_writes_a_table_with_density_for_every_backend(tmp_path, capsys):
    rc = main(["bench", "--device", "cpu", "--n", "512", "--backends", "all", "--inputs", "random,structured",
               "--heads", "4", "--kv-heads", "2", "--head-dim", "32", "--dtype", "float32", "--reps", "1",
               "--no-isolate", "--correctors", "none,delta(gamma=64)",
               "--backend-options", "streaming:window=64,sink=16",
               "--backend-options", "hip:k=128,block_q=32,block_k=32,stages='',sink=32,window=64",
               "--backend-options", "vertical_slash:vertical_size=32,slash_size=32,block_q=32,block_k=32",
               "--out", str(tmp_path)])
    out = capsys.readouterr().out
    assert rc == 0
    data = json.loads((tmp_path / "bench.json").read_text())
    rows = [r for r in data["results"] if r["kind"] == "sparse"]
    names = {r["name"].split("(")[0].split("+")[0] for r in rows}
    assert {"streaming", "hip", "vertical_slash", "strided"} <= names  # every registered backend, the plug-in too
    assert not [r for r in rows if "error" in r], [r["error"] for r in rows if "error" in r]
    for r in rows:
        assert 0 < r["density"] <= 1.1 and r["total_ms"] > 0 and r["err_own"] < 1e-5
        assert r["runs_on"].startswith("sparse: reference")
    bare = [r for r in rows if "+" not in r["name"]]
    assert all(0 < r["mass"] <= 1 + 1e-6 and 0 <= r["recall64"] <= 1 for r in bare)
    # the density column and both input kinds are in the printed table
    assert "| density |" in out.replace("density | mass", "density |") and "structured inputs" in out
    assert (tmp_path / "bench.md").read_text().count("### N = 512") == 2


def test_bench_without_cuda_is_a_message(capsys):
    import torch

    if torch.cuda.is_available():
        pytest.skip("this machine has CUDA")
    assert main(["bench", "--n", "1K"]) == 2
    err = capsys.readouterr().err
    assert "no CUDA device" in err and "--device cpu" in err


@pytest.mark.parametrize("argv, msg", [
    (["demo", "--n", "100"], "--n must be >= 256"),
    (["demo", "--n", "0"], "--n must be >= 256"),
    (["demo", "--gamma", "0"], "--gamma must be >= 1"),
    (["bench", "--device", "cpu", "--n", "1K", "--backends", "nosuch"], "unknown backend"),
    (["bench", "--device", "cpu", "--n", "1K", "--inputs", "weird"], "inputs must be among"),
    (["show", "streaming", "--n", "0"], "--n must be >= 1"),
    (["show", "nosuch(window=1)"], "unknown backend"),
])
def test_bad_arguments_are_one_line_messages(argv, msg, capsys):
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert msg in err and "Traceback" not in err


def test_demo_small_n_and_json_into_a_new_folder(tmp_path, capsys):
    path = tmp_path / "new" / "folder" / "demo.json"
    assert main(["demo", "--n", "512", "--window", "64", "--sink", "8", "--gamma", "32", "--json", str(path)]) == 0
    out = capsys.readouterr().out
    res = json.loads(path.read_text())
    assert [r["config"] for r in res] == ["dense", "streaming", "streaming + dense tail only", "streaming + recompute",
                                         "streaming + delta", "streaming + linear delta"]
    by = {r["config"]: r for r in res}
    assert by["dense"]["rel_err_all"] == 0 and by["dense"]["density"] == 1.0
    # the corrected configs are exact on their dense tail and computed fewer pairs than dense + anchors
    for c in ("streaming + recompute", "streaming + delta", "streaming + linear delta", "streaming + dense tail only"):
        assert by[c]["rel_err_last128"] < 1e-5 and by[c]["density"] < 1.0
    assert by["streaming"]["rel_err_all"] > by["streaming + delta"]["rel_err_all"]
    assert "| streaming + delta |" in out


def test_show_prints_the_pattern(capsys):
    assert main(["show", "streaming(window=64,sink=8)", "--n", "512", "--width", "16"]) == 0
    out = capsys.readouterr().out
    assert "band(window=64, sink=8)" in out and "density" in out
    picture = out.splitlines()[-16:]
    assert len(picture) == 16 and all(len(row) == 16 for row in picture)
    assert picture[-1].endswith("#") or picture[-1].endswith("+")  # the diagonal is kept
    assert picture[-1][0] in "#+:."  # so are the sinks


def test_version_and_list(capsys):
    with pytest.raises(SystemExit) as e:
        main(["--version"])
    assert e.value.code == 0
    assert "sparsekit" in capsys.readouterr().out
    assert main(["list"]) == 0
    out = capsys.readouterr().out
    assert "backends:" in out and "streaming" in out and "implementations:" in out and "reference" in out
    assert "hip_attn" not in out


def test_list_into_a_closed_pipe_is_quiet():
    code = ("import subprocess, sys; p = subprocess.Popen([sys.executable, '-m', 'sparsekit.cli', 'list'], "
            "stdout=subprocess.PIPE, stderr=subprocess.PIPE); p.stdout.close(); "
            "err = p.stderr.read().decode(); p.wait(); print(p.returncode, 'Traceback' in err or 'BrokenPipe' in err)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120).stdout.split()
    assert out == ["0", "False"], out


def test_structured_inputs_have_the_structure_sparse_backends_use():
    """On structured inputs a data-dependent backend keeps few keys and the mass that matters; on i.i.d.
    random inputs it keeps almost everything (vertical-slash) or misses the mass (HiP)."""
    import torch

    from sparsekit import SparseAttention
    from sparsekit.bench.inputs import make_inputs

    N = 4096
    res = {}
    for kind in ("structured", "random"):
        q, k, v = make_inputs(kind, N, q_heads=4, kv_heads=2, head_dim=64, dtype=torch.float32, device="cpu")
        vs = SparseAttention.from_string("vertical_slash(vertical_size=100,slash_size=200)").plan(q, k)
        hip = SparseAttention.from_string("hip(k=256,sink=64,window=128)")
        dense = SparseAttention("dense")(q, k, v)
        out = hip(q, k, v)
        cos = torch.nn.functional.cosine_similarity(out[:, :, N // 2:], dense[:, :, N // 2:], dim=-1).mean().item()
        res[kind] = (vs.cost().density, cos)
    assert res["structured"][0] < 0.5 * res["random"][0], res
    assert res["random"][0] > 0.9, res
    assert res["structured"][1] > res["random"][1] + 0.2, res
    # deterministic for a seed
    a = make_inputs("structured", 256, q_heads=2, kv_heads=1, head_dim=32, dtype=torch.float32, device="cpu", seed=3)
    b = make_inputs("structured", 256, q_heads=2, kv_heads=1, head_dim=32, dtype=torch.float32, device="cpu", seed=3)
    assert all(torch.equal(x, y) for x, y in zip(a, b))
