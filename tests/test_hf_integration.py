"""sparsekit as a transformers attention implementation, on a tiny random Llama (no download)."""

import pytest

transformers = pytest.importorskip("transformers")
torch = pytest.importorskip("torch")

import sparsekit.hf as skhf  # noqa: E402
from sparsekit.integrations.transformers import layer_state  # noqa: E402

N = 200  # prompt tokens
SPARSE = "streaming(window=16,sink=4)"


@pytest.fixture(scope="module")
def model():
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    cfg = LlamaConfig(
        vocab_size=128,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=4,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=512,
        attn_implementation="sdpa",
    )
    m = LlamaForCausalLM(cfg).eval()
    # larger q/k weights make attention peaky, so a sparse pattern visibly changes the output
    with torch.no_grad():
        for layer in m.model.layers:
            layer.self_attn.q_proj.weight.mul_(4.0)
            layer.self_attn.k_proj.weight.mul_(4.0)
    return m


@pytest.fixture(scope="module")
def ids():
    g = torch.Generator().manual_seed(1)
    return torch.randint(1, 128, (1, N), generator=g)  # no pad id (0): generate would mask it


@torch.no_grad()
def logits(model, ids, **kw):
    return model(ids, **kw).logits


def test_dense_spec_reproduces_sdpa(model, ids):
    ref = logits(model, ids)
    with skhf.use(model, "dense") as states:
        got = logits(model, ids)
    assert all(s.calls["sparse"] == 1 for s in states.values())  # really went through sparsekit
    torch.testing.assert_close(got, ref, rtol=1e-5, atol=1e-5)


def test_dense_spec_generates_sdpa_tokens(model, ids):
    kw = dict(max_new_tokens=8, do_sample=False, pad_token_id=0)
    ref = model.generate(ids, **kw)
    with skhf.use(model, "dense"):
        got = model.generate(ids, **kw)
    assert torch.equal(got, ref)


def test_sparse_spec_changes_logits(model, ids):
    ref = logits(model, ids)
    with skhf.use(model, SPARSE):
        got = logits(model, ids)
    # rows inside the window see every key: unchanged; later rows differ
    torch.testing.assert_close(got[:, :16], ref[:, :16], rtol=1e-5, atol=1e-5)
    assert (got[:, 32:] - ref[:, 32:]).abs().max() > 1e-2


def test_corrector_and_dense_layers(model, ids):
    ref = logits(model, ids)
    with skhf.use(model, SPARSE):
        sparse = logits(model, ids)
    with skhf.use(model, SPARSE + "+delta(gamma=8)") as states:
        delta = logits(model, ids)
    assert all(s.attn.corrector is not None for s in states.values())
    # the dense tail (last 200 % 8 + 128 rows) and Δ pull the output back towards dense
    err_sparse = (sparse - ref)[:, -64:].abs().mean()
    err_delta = (delta - ref)[:, -64:].abs().mean()
    assert err_delta < 0.5 * err_sparse
    with skhf.use(model, SPARSE, dense_layers=range(4)) as states:
        all_dense = logits(model, ids)
    assert all(s.attn is None and s.calls["dense"] == 1 for s in states.values())
    torch.testing.assert_close(all_dense, ref, rtol=1e-6, atol=1e-6)
    with skhf.use(model, None, layers={2: SPARSE}) as states:
        logits(model, ids)
    assert [s.calls["sparse"] for _, s in sorted(states.items())] == [0, 0, 1, 0]


def test_decode_after_sparse_prefill_is_dense(model, ids):
    """Prefill sparse, then one decode step: the step's attention must see the whole cache."""
    with skhf.use(model, SPARSE) as states:
        out = model(ids, use_cache=True)
        cache = out.cache
        nxt = out.logits[:, -1:].argmax(-1)
        step = model(nxt, cache=cache, use_cache=True).logits
    assert all(s.calls == {"sparse": 1, "dense": 1} for s in states.values())
    # reference: the same sparse-prefilled cache, decode step under plain SDPA
    with skhf.use(model, SPARSE):
        cache2 = model(ids, use_cache=True).cache
    ref = model(nxt, cache=cache2, use_cache=True).logits
    torch.testing.assert_close(step, ref, rtol=1e-5, atol=1e-5)
    # and it differs from a decode step restricted to the streaming window
    with skhf.use(model, SPARSE):
        cache3 = model(ids, use_cache=True).cache
    with skhf.use(model, SPARSE, decode_rows=1) as st:
        for s in st.values():  # force the single row through the sparse path
            s.decode_rows = 0
        windowed = model(nxt, cache=cache3, use_cache=True).logits
    assert (windowed - step).abs().max() > 1e-3


def test_chunked_prefill_equals_one_shot_dense(model, ids):
    from transformers import DynamicCache

    with skhf.use(model, "dense") as states:
        one = logits(model, ids)
        cache = DynamicCache(config=model.config)
        parts = []
        for a, b in [(0, 90), (90, 150), (150, N)]:
            out = model(ids[:, a:b], cache=cache, use_cache=True)
            cache = out.cache
            parts.append(out.logits)
    assert all(s.calls["sparse"] == 4 for s in states.values())  # one-shot + 3 chunks
    torch.testing.assert_close(torch.cat(parts, dim=1), one, rtol=1e-5, atol=1e-5)


def test_chunked_sparse_prefill_uses_offset(model, ids):
    """Streaming over a cache: the second chunk's rows sit at their absolute positions."""
    from transformers import DynamicCache

    with skhf.use(model, SPARSE):
        one = logits(model, ids)
        cache = DynamicCache(config=model.config)
        first = model(ids[:, :120], cache=cache, use_cache=True)
        second = model(ids[:, 120:], cache=first.cache, use_cache=True)
    # streaming's pattern depends only on absolute positions: chunking changes nothing
    torch.testing.assert_close(torch.cat([first.logits, second.logits], 1), one, rtol=1e-5, atol=1e-5)


def test_context_manager_restores(model, ids):
    ref = logits(model, ids)
    impl = model.config._attn_implementation
    mods = skhf.attention_modules(model)
    with pytest.raises(RuntimeError):
        with skhf.use(model, SPARSE):
            assert model.config._attn_implementation == "sparsekit"
            assert all(layer_state(m) is not None for _, m in mods)
            raise RuntimeError("boom")
    assert model.config._attn_implementation == impl
    assert all(layer_state(m) is None for _, m in mods)
    torch.testing.assert_close(logits(model, ids), ref, rtol=0, atol=0)
    # nesting restores the outer block
    with skhf.use(model, SPARSE):
        with skhf.use(model, "dense"):
            pass
        assert str(layer_state(mods[0][1]).attn) == "streaming(window=16,sink=4)"


def test_bad_arguments(model):
    with pytest.raises(ValueError, match="layers"):
        with skhf.use(model, SPARSE, layers={99: None}):
            pass
    with pytest.raises(ValueError, match="decode_rows"):
        with skhf.use(model, SPARSE, decode_rows=0):
            pass
    with pytest.raises(TypeError, match="spec"):
        with skhf.use(model, 3.5):
            pass


def test_padded_batch_is_refused(model, ids):
    batch = torch.cat([ids, ids])
    mask = torch.ones_like(batch)
    mask[1, :5] = 0
    with skhf.use(model, SPARSE):
        with pytest.raises(ValueError, match="plain causal mask"):
            model(batch, attention_mask=mask)


# ------------------------------------------------------------------------------ eval harness (tiny, no download)
# (the pieces that need no model are tested without transformers in tests/test_eval_*.py)
from char_tokenizer import CharTokenizer as _CharTokenizer  # noqa: E402


def test_retrieval_runner_pairs_and_resumes(model, tmp_path):
    from sparsekit.eval.configs import Config
    from sparsekit.eval.report import build_report
    from sparsekit.eval.retrieval import run_retrieval
    from sparsekit.eval.tasks import make_samples

    tok = _CharTokenizer()
    samples = make_samples(tok, ["passkey"], 400, 2, seed=0)
    cfgs = [Config("dense", None), Config("streaming", SPARSE), Config("streaming+tail", SPARSE + "+tailonly(gamma=16)")]
    path = tmp_path / "retrieval.jsonl"
    run_retrieval(model, tok, samples[:1], cfgs, path, device="cpu", progress=False)
    run_retrieval(model, tok, samples, cfgs, path, device="cpu", progress=False)  # resumes: sample 0 not redone
    import json

    recs = [json.loads(l) for l in path.read_text().splitlines()]
    assert sorted((r["sample"], r["config"]) for r in recs) == sorted((i, c.label) for i in range(2) for c in cfgs)
    md = build_report(tmp_path).read_text()
    assert "400 tokens (2 samples per task and config, paired)" in md


def test_one_context_per_task_resumes_and_reports_every_task(model, tmp_path):
    """shared=False: the same sample index exists once per task; resume and report must not merge them."""
    import json

    from sparsekit.eval.configs import Config
    from sparsekit.eval.report import build_report
    from sparsekit.eval.retrieval import run_retrieval
    from sparsekit.eval.tasks import make_samples

    tok = _CharTokenizer()
    samples = make_samples(tok, ["passkey", "multikey"], 400, 2, seed=0, shared=False, key_type="word", distractors=1)
    assert [(s.index, s.context) for s in samples] == [(0, "passkey"), (0, "multikey"), (1, "passkey"), (1, "multikey")]
    cfgs = [Config("dense", None), Config("streaming", SPARSE)]
    path = tmp_path / "retrieval.jsonl"
    run_retrieval(model, tok, samples[:1], cfgs, path, device="cpu", progress=False)  # passkey #0 only
    run_retrieval(model, tok, samples, cfgs, path, device="cpu", progress=False)  # must still do multikey #0
    recs = [json.loads(l) for l in path.read_text().splitlines()]
    got = sorted((r["sample"], r["context"], r["config"]) for r in recs)
    assert got == sorted((s.index, s.context, c.label) for s in samples for c in cfgs)
    md = build_report(tmp_path).read_text()
    assert "400 tokens (2 samples per task and config, paired)" in md
    assert "| config | passkey | multikey | all |" in md


def test_perplexity_runner_scores_the_last_tokens_and_resumes(model, tmp_path, monkeypatch):
    import json
    import math

    from sparsekit.eval import perplexity
    from sparsekit.eval.configs import Config
    from sparsekit.eval.report import build_report

    tok = _CharTokenizer()
    cfgs = [Config("dense", None), Config("streaming", SPARSE)]
    perplexity.run_perplexity(model, tok, cfgs, tmp_path, length=300, last=50, texts=["argparse.py"], device="cpu",
                              progress=False, meta={"model": "tiny"})
    res = json.loads((tmp_path / "ppl.json").read_text())
    assert (res["length"], res["last"]) == (300, 50) and [r["config"] for r in res["rows"]] == ["dense", "streaming"]
    # dense: the model's own next-token NLL of tokens 250..299 of the text's first 300 bytes
    ids = tok(perplexity.stdlib_text("argparse.py"), return_tensors="pt")["input_ids"][:, :300]
    with torch.no_grad():
        logits = model(ids).logits[0].double()
    want = torch.nn.functional.cross_entropy(logits[249:299], ids[0, 250:300], reduction="none")
    dense, sparse = res["rows"]
    torch.testing.assert_close(torch.tensor(dense["nll_tokens"], dtype=torch.float64), want, rtol=0, atol=1e-4)
    assert dense["ppl"] == pytest.approx(math.exp(float(want.mean())), rel=1e-5)
    assert abs(sparse["nll"] - dense["nll"]) > 1e-3  # the streaming window really changed the scored rows
    # resume: nothing is recomputed for (text, config) pairs already stored
    calls = []
    monkeypatch.setattr(perplexity, "window_nll", lambda *a, **k: calls.append(1))
    perplexity.run_perplexity(model, tok, cfgs, tmp_path, length=300, last=50, texts=["argparse.py"], device="cpu",
                              progress=False)
    assert calls == [] and len(json.loads((tmp_path / "ppl.json").read_text())["rows"]) == 2
    md = build_report(tmp_path).read_text()
    assert f"| argparse.py | dense | {dense['nll']:.4f} | {dense['ppl']:.3f} | +0.000 |  |" in md
    with pytest.raises(ValueError, match="--last"):
        perplexity.run_perplexity(model, tok, cfgs, tmp_path, length=50, last=50, texts=["argparse.py"], device="cpu")


def test_questions_of_a_sample_do_not_see_each_other(model, monkeypatch):
    """Each question is answered over the context alone: order of questions does not matter."""
    from dataclasses import replace

    from sparsekit.eval.configs import Config
    from sparsekit.eval.retrieval import answer_sample
    from sparsekit.eval.tasks import make_samples

    tok = _CharTokenizer()
    s = make_samples(tok, ["multiquery"], 400, 1, seed=1, queries=2, key_type="word")[0]
    cfg = Config("streaming+delta", SPARSE + "+delta(gamma=16)")
    fwd = answer_sample(model, tok, s, cfg, "cpu")
    rev = answer_sample(model, tok, replace(s, questions=s.questions[::-1]), cfg, "cpu")
    assert [r["output"] for r in fwd] == [r["output"] for r in rev][::-1]
    seen = []  # cache length when each question's prefill starts
    forward = model.forward

    def spy(*args, **kw):
        ids = kw.get("input_ids", args[0] if args else None)
        cache = kw.get("cache", kw.get("past_key_values"))
        if cache is not None and ids.shape[1] > 1:
            seen.append(cache.get_seq_length())
        return forward(*args, **kw)

    monkeypatch.setattr(model, "forward", spy)
    answer_sample(model, tok, s, cfg, "cpu")
    assert seen == [fwd[0]["n_tokens"]] * 2


def test_capture_skips_the_models_own_sliding_layers(model, monkeypatch):
    from sparsekit.eval.fidelity import capture_qkv
    from sparsekit.hf import attention_modules

    tok = _CharTokenizer()
    captured, scales, _ = capture_qkv(model, tok, text="argparse.py", length=300, device="cpu")
    assert sorted(captured) == [0, 1, 2, 3] and captured[0][0].shape == (1, 4, 300, 16)
    assert captured[0][1].shape == (1, 2, 300, 16)  # K/V keep their KV heads (GQA not repeated)
    module = dict(attention_modules(model))[2]
    monkeypatch.setattr(module, "sliding_window", 64, raising=False)
    captured, _, _ = capture_qkv(model, tok, text="argparse.py", length=300, device="cpu")
    assert sorted(captured) == [0, 1, 3]
