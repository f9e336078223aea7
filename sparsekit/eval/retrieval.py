"""Retrieval accuracy of attention configs on a real model (RULER-style tasks, exact match).

Per (sample, config): one prefill of the context (sparse under the config), then for each
question: the question is prefilled as a second chunk over a copy of the cached context
(``q_offset`` = context length, through the same config) and the answer is decoded greedily
(decode steps are dense over the whole cache). The context's cache is copied rather than
cropped back, because sliding-window cache layers (Gemma 3) cannot be cropped. Results are appended to a JSONL file one line per question
as they come, so an interrupted run keeps what it measured and resumes where it stopped.
"""

from __future__ import annotations

import copy
import json
import time
from pathlib import Path
from typing import Sequence

import torch

from .configs import Config
from .tasks import Question, Sample, score

__all__ = ["run_retrieval", "answer_sample"]


def _cache_of(out):
    return getattr(out, "cache", None) if getattr(out, "cache", None) is not None else out.past_key_values


@torch.no_grad()
def _greedy(model, tok, cache, ids, q: Question, device) -> str:
    """Prefill ``ids`` (question) over ``cache``, decode up to ``q.max_new_tokens`` greedily."""
    eos = tok.eos_token_id
    out = model(ids.to(device), cache=cache, use_cache=True, logits_to_keep=1)
    cache = _cache_of(out)
    gen = []
    for step in range(q.max_new_tokens):
        nxt = int(out.logits[0, -1].argmax())
        if nxt == eos:
            break
        gen.append(nxt)
        text = tok.decode(gen, skip_special_tokens=True)
        if "\n" in text.lstrip():
            break
        if step + 1 < q.max_new_tokens:
            out = model(torch.tensor([[nxt]], device=device), cache=cache, use_cache=True, logits_to_keep=1)
            cache = _cache_of(out)
    return tok.decode(gen, skip_special_tokens=True)


@torch.no_grad()
def answer_sample(model, tok, sample: Sample, config: Config, device) -> list:
    """Run one sample under one config; returns one record per question."""
    from sparsekit.hf import use

    from .plan import prefill_pairs

    ids = tok(sample.text, return_tensors="pt", add_special_tokens=False)["input_ids"]
    n_ctx = ids.shape[1]
    records = []
    with use(model, config.attention(), dense_layers=config.dense_layers) as states:
        t0 = time.perf_counter()
        out = model(ids.to(device), use_cache=True, logits_to_keep=1)
        cache = _cache_of(out)
        if out.logits.is_cuda:
            torch.cuda.synchronize()
        prefill_s = time.perf_counter() - t0
        pairs = prefill_pairs(states)  # the context's prefill only (the questions' chunks come after)
        for qi, q in enumerate(sample.questions):
            t1 = time.perf_counter()
            q_ids = tok("Question: " + q.prompt, return_tensors="pt", add_special_tokens=False)["input_ids"]
            last = qi == len(sample.questions) - 1
            text = _greedy(model, tok, cache if last else copy.deepcopy(cache), q_ids, q, device)
            records.append(
                dict(
                    length=sample.length,
                    sample=sample.index,
                    context=sample.context,
                    seed=sample.seed,
                    n_tokens=n_ctx,
                    config=config.label,
                    spec=config.spec or "sdpa",
                    task=q.task,
                    q=qi,
                    answers=list(q.answers),
                    output=text,
                    correct=bool(score(q, text)),
                    prefill_s=round(prefill_s, 3),
                    answer_s=round(time.perf_counter() - t1, 3),
                    **({"pairs": pairs} if pairs else {}),
                )
            )
    return records


def _done(path: Path) -> set:
    done = set()
    if path.exists():
        for line in path.read_text().splitlines():
            if line.strip():
                r = json.loads(line)
                done.add((r["length"], r["sample"], r.get("context", ""), r["config"]))
    return done


def run_retrieval(
    model, tok, samples: Sequence[Sample], configs: Sequence[Config], out_path: Path, *, device, progress: bool = True
) -> Path:
    """Answer every sample under every config (sample-major, so configs stay paired), appending to ``out_path``."""
    out_path = Path(out_path)
    out_path.parent.mkdir(parents=True, exist_ok=True)
    done = _done(out_path)
    todo = [(s, c) for s in samples for c in configs if (s.length, s.index, s.context, c.label) not in done]
    bar = None
    if progress:
        from tqdm.auto import tqdm

        bar = tqdm(total=len(todo), desc="retrieval", unit="prefill", dynamic_ncols=True)
    correct: dict = {}
    with open(out_path, "a") as f:
        for s, c in todo:
            recs = answer_sample(model, tok, s, c, device)
            for r in recs:
                f.write(json.dumps(r) + "\n")
                correct.setdefault(c.label, []).append(r["correct"])
            f.flush()
            if bar is not None:
                bar.update(1)
                bar.set_postfix_str(
                    f"L={s.length} #{s.index} {c.label}: "
                    + " ".join(f"{k}={sum(v)}/{len(v)}" for k, v in correct.items())
                )
    if bar is not None:
        bar.close()
    return out_path
