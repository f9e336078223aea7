"""``sparsekit eval --model PATH`` end to end on tiny random models saved with ``save_pretrained`` (CPU, offline).

A tiny byte-level BPE tokenizer is trained here on the filler corpus (no download) and saved next to a
2-layer Llama and a 4-layer Gemma-3 text model (layers 0 and 2 sliding-window, as Gemma 3's local layers).
"""

import json

import pytest

transformers = pytest.importorskip("transformers")
tokenizers = pytest.importorskip("tokenizers")
torch = pytest.importorskip("torch")

from sparsekit import models  # noqa: E402
from sparsekit.cli import main  # noqa: E402

VOCAB = 1000
GRID = ["--window", "32", "--sink", "4", "--gamma", "16", "--interpolations", "repeat", "--no-progress"]


def tiny_tokenizer():
    from tokenizers import Tokenizer, decoders, pre_tokenizers, trainers
    from tokenizers.models import BPE
    from transformers import PreTrainedTokenizerFast

    from sparsekit.eval.tasks import HEADER, filler_paragraphs

    tok = Tokenizer(BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=VOCAB, special_tokens=["<eos>"], show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(list(filler_paragraphs()[:600]) + [HEADER], trainer)
    return PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<eos>")


def tiny_llama():
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=VOCAB, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512,
                      bos_token_id=0, eos_token_id=0, pad_token_id=0)
    return LlamaForCausalLM(cfg).eval()


def tiny_gemma3():
    from transformers import Gemma3ForCausalLM, Gemma3TextConfig

    torch.manual_seed(1)
    cfg = Gemma3TextConfig(vocab_size=VOCAB, hidden_size=64, intermediate_size=128, num_hidden_layers=4,
                           num_attention_heads=4, num_key_value_heads=2, head_dim=16, max_position_embeddings=512,
                           sliding_window=64, layer_types=["sliding_attention", "full_attention"] * 2,
                           bos_token_id=0, eos_token_id=0, pad_token_id=0)
    return Gemma3ForCausalLM(cfg).eval()


def save_gguf(model, tokenizer_json, path):
    """Write a Llama model and its byte-level BPE tokenizer as an unquantised GGUF file (as llama.cpp lays it out)."""
    gguf = pytest.importorskip("gguf")
    c = model.config
    tj = json.loads(tokenizer_json.read_text())
    tokens = [t for t, _ in sorted(tj["model"]["vocab"].items(), key=lambda kv: kv[1])]
    merges = [m if isinstance(m, str) else " ".join(m) for m in tj["model"]["merges"]]
    w = gguf.GGUFWriter(str(path), "llama")
    w.add_context_length(c.max_position_embeddings)
    w.add_embedding_length(c.hidden_size)
    w.add_block_count(c.num_hidden_layers)
    w.add_feed_forward_length(c.intermediate_size)
    w.add_head_count(c.num_attention_heads)
    w.add_head_count_kv(c.num_key_value_heads)
    w.add_rope_dimension_count(c.hidden_size // c.num_attention_heads)
    w.add_layer_norm_rms_eps(c.rms_norm_eps)
    w.add_rope_freq_base(10000.0)
    w.add_tokenizer_model("gpt2")
    w.add_token_list(tokens)
    w.add_token_merges(merges)
    w.add_token_types([1] * len(tokens))
    w.add_eos_token_id(0)
    w.add_bos_token_id(0)

    def interleave(x, heads):  # HF's rotary half-split layout -> GGUF's interleaved pairs
        return x.reshape(heads, 2, x.shape[0] // heads // 2, *x.shape[1:]).swapaxes(1, 2).reshape(x.shape)

    top = {"model.embed_tokens.weight": "token_embd.weight", "model.norm.weight": "output_norm.weight",
           "lm_head.weight": "output.weight"}
    per_layer = {"self_attn.q_proj.weight": "attn_q.weight", "self_attn.k_proj.weight": "attn_k.weight",
                 "self_attn.v_proj.weight": "attn_v.weight", "self_attn.o_proj.weight": "attn_output.weight",
                 "mlp.gate_proj.weight": "ffn_gate.weight", "mlp.up_proj.weight": "ffn_up.weight",
                 "mlp.down_proj.weight": "ffn_down.weight", "input_layernorm.weight": "attn_norm.weight",
                 "post_attention_layernorm.weight": "ffn_norm.weight"}
    for name, t in model.state_dict().items():
        t = t.float().numpy()
        if name in top:
            w.add_tensor(top[name], t)
            continue
        layer, rest = name.split(".")[2], ".".join(name.split(".")[3:])
        if rest == "self_attn.q_proj.weight":
            t = interleave(t, c.num_attention_heads)
        elif rest == "self_attn.k_proj.weight":
            t = interleave(t, c.num_key_value_heads)
        w.add_tensor(f"blk.{layer}.{per_layer[rest]}", t)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return path


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    """{"llama": folder, "gemma3": folder, "no-tokenizer": folder, "bad-tokenizer": folder}"""
    root = tmp_path_factory.mktemp("models")
    tok = tiny_tokenizer()
    out = {}
    for name, build in (("llama", tiny_llama), ("gemma3", tiny_gemma3)):
        model = build()
        model.save_pretrained(root / name)
        tok.save_pretrained(root / name)
        out[name] = root / name
    tiny_llama().save_pretrained(root / "no-tokenizer")
    out["no-tokenizer"] = root / "no-tokenizer"
    tiny_llama().save_pretrained(root / "bad-tokenizer")
    (root / "bad-tokenizer" / "tokenizer_config.json").write_text(json.dumps({"tokenizer_class": "NoSuchTokenizer"}))
    out["bad-tokenizer"] = root / "bad-tokenizer"
    return out


def run(capsys, *argv):
    rc = main(["eval", *argv])
    cap = capsys.readouterr()
    return rc, cap.out, cap.err


# ------------------------------------------------------------------------------ loading by path
def test_load_model_from_a_folder(saved):
    model, tok = models.load_model(saved["llama"], device="cpu")
    ref = tiny_llama()  # same seed: the same weights
    ids = tok("The pass key is 12345.", return_tensors="pt")["input_ids"]
    assert tok.decode(ids[0]) == "The pass key is 12345."
    assert next(model.parameters()).dtype == torch.float32 and not model.training
    assert model.config._attn_implementation == "sdpa"
    with torch.no_grad():
        torch.testing.assert_close(model(ids).logits, ref(ids).logits, rtol=1e-5, atol=1e-5)
    half, _ = models.load_model(str(saved["llama"]), dtype="bfloat16", device="cpu")
    assert next(half.parameters()).dtype == torch.bfloat16
    assert models.max_positions(models.model_config(saved["gemma3"])) == 512
    with pytest.raises(ValueError, match="dtype must be one of float32, bfloat16, float16"):
        models.load_model(saved["llama"], dtype="int8")


def test_load_model_from_a_gguf_file(saved, tmp_path, capsys):
    path = save_gguf(tiny_llama(), saved["llama"] / "tokenizer.json", tmp_path / "tiny.gguf")
    assert models.resolve_model(str(path)).kind == "gguf"
    assert models.max_positions(models.model_config(path)) == 512
    model, tok = models.load_model(path, device="cpu")
    ref_tok = transformers.AutoTokenizer.from_pretrained(saved["llama"], local_files_only=True)
    text = "The special magic number for apple-badger is: 1234567."
    ids = ref_tok(text, return_tensors="pt")["input_ids"]
    assert tok(text)["input_ids"] == ids[0].tolist()
    with torch.no_grad():
        torch.testing.assert_close(model(ids).logits, tiny_llama()(ids).logits, rtol=1e-5, atol=1e-5)
    rc, stdout, err = run(capsys, "ppl", "--model", str(path), "--out", str(tmp_path / "out"), "--length", "300",
                          "--last", "32", "--texts", "argparse.py", "--configs", "dense", "--no-progress")
    assert rc == 0, err
    assert f"model {path} (gguf {path}), float32 on cpu, max positions 512" in stdout
    rc, _, err = run(capsys, "ppl", "--model", str(path), "--out", str(tmp_path / "out"), "--length", "4096")
    assert rc == 2 and "--length 4096 exceeds the model's 512 positions" in err


def test_folder_tokenizer_errors(saved):
    with pytest.raises(FileNotFoundError, match="has no tokenizer"):
        models.load_model(saved["no-tokenizer"], device="cpu")
    with pytest.raises(OSError, match="could not load the tokenizer in model folder"):
        models.load_model(saved["bad-tokenizer"], device="cpu")


def test_layer_plan_of_gemma3(saved):
    from sparsekit.eval.plan import layer_plan

    model, _ = models.load_model(saved["gemma3"], device="cpu")
    plan = layer_plan(model, range(2))
    assert (plan.sparse, plan.sliding, plan.dense, plan.window) == ((3,), (0, 2), (1,), 64)
    assert "the model's own sliding window (64 tokens), kept: 0, 2" in plan.describe()
    with pytest.raises(ValueError, match="--dense-layers: the model has 4 attention layers"):
        layer_plan(model, range(6))


# ------------------------------------------------------------------------------ the CLI on a folder
def test_eval_a_llama_folder_retrieval_then_ppl(saved, tmp_path, capsys):
    out = tmp_path / "out"
    rc, stdout, err = run(capsys, "retrieval", "--model", str(saved["llama"]), "--out", str(out), "--lengths", "256",
                          "--n", "2", "--tasks", "passkey", "multiquery", "--key-type", "word", *GRID)
    assert rc == 0, err
    assert "attention layers: 2\n  sparse (the config's spec): 0-1\n" in stdout
    assert "the model's own sliding window, kept: none" in stdout
    recs = [json.loads(line) for line in (out / "retrieval.jsonl").read_text().splitlines()]
    labels = ["dense", "streaming", "streaming+tail", "streaming+recompute", "streaming+delta"]
    # 2 samples x 5 configs x (1 passkey + 2 multiquery questions)
    assert sorted({r["config"] for r in recs}) == sorted(labels) and len(recs) == 2 * 5 * 3
    assert all(r["length"] == 256 and r["n_tokens"] <= 256 - 96 for r in recs)
    meta = json.loads((out / "retrieval_meta.json").read_text())
    assert meta["model"] == str(saved["llama"]) and meta["dtype"] == "float32"
    assert meta["max_positions"] == 512 and meta["layers"]["sparse"] == [0, 1]
    summary = (out / "summary.md").read_text()
    assert "### 256 tokens (2 samples per task and config, paired)" in summary
    assert "## Retrieval at 256 tokens (6 questions over 2 contexts" in (out / "verdict.md").read_text()
    assert "# Verdict" in stdout and "* **streaming+delta**" in stdout
    rc, stdout, err = run(capsys, "ppl", "--model", str(saved["llama"]), "--out", str(out), "--length", "256",
                          "--last", "64", "--texts", "argparse.py", *GRID)
    assert rc == 0, err
    ppl = json.loads((out / "ppl.json").read_text())
    assert [r["config"] for r in ppl["rows"]] == labels and all(len(r["nll_tokens"]) == 64 for r in ppl["rows"])
    assert "## Perplexity" in (out / "summary.md").read_text()
    verdict = (out / "verdict.md").read_text()
    assert "## Perplexity over the last 64 of the first 256 tokens of argparse.py (64 scored tokens)" in verdict
    assert verdict.strip() in stdout
    assert (out / "commands.txt").read_text().count("[") == 2


def test_eval_a_gemma3_folder_keeps_its_sliding_layers(saved, tmp_path, capsys):
    out = tmp_path / "out"
    rc, stdout, err = run(capsys, "ppl", "--model", str(saved["gemma3"]), "--out", str(out), "--length", "256",
                          "--last", "32", "--texts", "argparse.py", "--dense-layers", "2",
                          "--configs", "dense", "s=streaming(window=32,sink=4)", "--no-progress")
    assert rc == 0, err
    assert "attention layers: 4\n  sparse (the config's spec): 3\n" in stdout
    assert "the model's own sliding window (64 tokens), kept: 0, 2\n  dense (--dense-layers): 1" in stdout
    rows = json.loads((out / "ppl.json").read_text())["rows"]
    assert [r["config"] for r in rows] == ["dense", "s"] and rows[0]["ppl"] != rows[1]["ppl"]
    assert "Sparse configs run on 1 of 4 attention layers (2 are the model's own sliding window, 1 kept dense)" in stdout


@pytest.mark.parametrize("argv, asked", [
    (["retrieval", "--lengths", "256", "1024"], "--lengths 1024"),
    (["retrieval", "--lengths", "600", "256", "1024"], "--lengths 600 1024"),
    (["ppl"], "--length 8192"),
    (["fidelity", "--length", "600"], "--length 600"),
    (["locality", "--length", "513"], "--length 513"),
])
def test_lengths_beyond_the_models_positions_are_refused(saved, tmp_path, capsys, argv, asked):
    rc, stdout, err = run(capsys, *argv, "--model", str(saved["llama"]), "--out", str(tmp_path / "out"))
    assert rc == 2 and stdout == ""
    verb = "exceed" if asked.count(" ") > 1 else "exceeds"
    assert err.strip() == (f"sparsekit eval {argv[0]}: error: {asked} {verb} the model's 512 positions "
                           f"(config.max_position_embeddings of --model {saved['llama']}); use lengths up to 512")
    assert not (tmp_path / "out").exists()


def test_folder_without_tokenizer_is_refused(saved, tmp_path, capsys):
    rc, _, err = run(capsys, "ppl", "--model", str(saved["no-tokenizer"]), "--out", str(tmp_path / "out"))
    assert rc == 2 and "has no tokenizer" in err and "tokenizer.save_pretrained(folder)" in err


def test_length_too_short_for_the_tasks_is_refused_before_any_prefill(saved, tmp_path, capsys):
    rc, _, err = run(capsys, "retrieval", "--model", str(saved["llama"]), "--out", str(tmp_path / "out"),
                     "--lengths", "256", "--tasks", "multikey", "multivalue", "multiquery", *GRID)
    assert rc == 2 and "length 256 is too short for the tasks multikey, multivalue, multiquery" in err
    assert not (tmp_path / "out").exists()
