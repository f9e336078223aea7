"""Density of a vertical_slash config on the SmolLM2 fidelity input (argparse.py, 4096 tokens).

Usage: HF_HUB_OFFLINE=1 python bench/vertical_slash_eval_density.py OUT.json
"""
import json, os, sys, time
import torch
torch.set_num_threads(1)
from sparsekit.models import smollm2
from sparsekit.hf import use, attention_modules
from sparsekit.eval.perplexity import stdlib_text
from sparsekit.backends.vertical_slash import VerticalSlash
from sparsekit.rows import causal_pairs as _cp
dense_causal_pairs = lambda n, o: _cp(n, o)
model, tok = smollm2(device="cpu")
ids = tok(stdlib_text("argparse.py"), return_tensors="pt", add_special_tokens=False)["input_ids"][:, :4096]
cap = {}
def capture(layer, q, k, v):
    cap[layer] = (q.detach().float(), k.detach().float())
with use(model, None, capture=capture):
    model(ids, use_cache=False, logits_to_keep=1)
scales = {i: float(m.scaling) for i, m in attention_modules(model)}
be = VerticalSlash(vertical_size=64, slash_size=128, sink=16, local=64, block_q=64, block_k=64)
dens = {}
for layer, (q, k) in sorted(cap.items()):
    plan = be.plan(q, k, scale=scales[layer], q_offset=0)
    st = be.plan_stats(plan)
    dens[layer] = st["density"]
N = 4096
stream = (sum(min(p + 1, 16) + max(0, min(p + 1 - 16, 256)) for p in range(N))) / dense_causal_pairs(N, 0)
out = {"vs_spec": str(be), "density_per_layer": dens, "density_mean": sum(dens.values()) / len(dens),
       "streaming(window=256,sink=16)_density": stream}
json.dump(out, open(sys.argv[1], "w"), indent=1)
print(json.dumps({k: v for k, v in out.items() if k != "density_per_layer"}))
