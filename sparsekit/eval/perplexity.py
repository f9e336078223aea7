"""Token-level NLL over the last part of a long window of real text, dense vs each config.

Texts are source files of the Python standard library that ships with the interpreter
(real text nobody here wrote, available offline). Each text's first ``length`` tokens form
one window; the model prefills it once per config (no cache) and the NLL of the last
``last`` tokens is averaged. Only the last ``last + 1`` positions' logits are materialised.
"""

from __future__ import annotations

import json
import math
import sysconfig
import time
from pathlib import Path
from typing import Sequence

import torch

from .configs import Config

__all__ = ["run_perplexity", "stdlib_text", "text_windows", "token_nll", "window_nll"]


def stdlib_text(name: str) -> str:
    """The text of a standard-library file, ``name`` relative to the stdlib folder."""
    path = Path(sysconfig.get_paths()["stdlib"]) / name
    if not path.is_file():
        raise FileNotFoundError(f"standard-library file {name!r} not found at {path}")
    return path.read_text(encoding="utf-8")


def text_windows(tok, texts: Sequence[str], length: int) -> dict:
    """``{name: ids [1, length]}``: the first ``length`` tokens of each standard-library text.

    Raises ``FileNotFoundError`` for a missing file and ``ValueError`` for a text shorter than ``length``
    tokens (naming the option ``--length``).
    """
    windows = {}
    for name in texts:
        if name in windows:
            continue
        ids = tok(stdlib_text(name), return_tensors="pt", add_special_tokens=False)["input_ids"]
        if ids.shape[1] < length:
            raise ValueError(f"{name} has only {ids.shape[1]} tokens with this tokenizer, fewer than --length {length}")
        windows[name] = ids[:, :length]
    return windows


def token_nll(logits: torch.Tensor, ids: torch.Tensor, last: int) -> torch.Tensor:
    """Per-token NLL (nats, float64, ``[last]``) of the last ``last`` tokens of ``ids``.

    Parameters
    ----------
    logits : ``[1, last + 1, V]`` (or longer: only the final ``last + 1`` positions are used)
        Next-token logits; position ``j`` predicts token ``j + 1``, so the last position (which
        predicts past the end) is dropped.
    ids : ``[1, N]`` token ids, ``N > last``
    last : number of scored tokens, ``>= 1``
    """
    if last < 1:
        raise ValueError(f"token_nll: last must be >= 1, got {last}")
    if ids.shape[1] <= last or logits.shape[1] < last + 1:
        raise ValueError(
            f"token_nll: need more than last={last} tokens and at least last + 1 logit positions, "
            f"got ids {tuple(ids.shape)} and logits {tuple(logits.shape)}"
        )
    pred = logits[0, -(last + 1) : -1].double()
    return torch.nn.functional.cross_entropy(pred, ids[0, -last:].to(pred.device), reduction="none")


@torch.no_grad()
def window_nll(model, ids: torch.Tensor, config: Config, last: int, pairs: dict | None = None) -> torch.Tensor:
    """Per-token NLL (float64, ``[last]``) of the last ``last`` tokens of ``ids`` ``[1, N]`` under ``config``.

    ``pairs``: a dict that receives the prefill's attended pairs summed over the sparse layers
    (:func:`~sparsekit.eval.plan.prefill_pairs`; left empty for dense SDPA).
    """
    from sparsekit.hf import use

    from .plan import prefill_pairs

    with use(model, config.attention(), dense_layers=config.dense_layers) as states:
        logits = model(ids, use_cache=False, logits_to_keep=last + 1).logits
        counted = prefill_pairs(states)
    if pairs is not None and counted is not None:
        pairs.update(counted)
    return token_nll(logits, ids, last)


def run_perplexity(model, tok, configs: Sequence[Config], out: Path, *, length: int, last: int,
                   texts: Sequence[str], device, progress: bool = True, meta: dict | None = None) -> Path:
    """Write ``ppl.json`` (per text and config: mean NLL, perplexity, the per-token NLLs), resuming.

    Rows already in ``ppl.json`` for the same ``length`` and ``last`` are kept and not recomputed.
    """
    if not 1 <= last < length:
        raise ValueError(f"ppl: --last ({last}) must be at least 1 and smaller than --length ({length})")
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    path = out / "ppl.json"
    result = json.loads(path.read_text()) if path.exists() else {}
    if result.get("length") not in (None, length) or result.get("last") not in (None, last):
        result = {}
    result.update(length=length, last=last, meta=meta or {})
    rows = result.setdefault("rows", [])
    done = {(r["text"], r["config"]) for r in rows}
    todo = [(t, c) for t in texts for c in configs if (t, c.label) not in done]
    bar = None
    if progress:
        from tqdm.auto import tqdm

        bar = tqdm(total=len(todo), desc="ppl", unit="prefill", dynamic_ncols=True)
    windows = text_windows(tok, [t for t, _ in todo], length)
    for name, c in todo:
        t0 = time.perf_counter()
        pairs: dict = {}
        nll = window_nll(model, windows[name].to(device), c, last, pairs=pairs).cpu()
        secs = time.perf_counter() - t0
        rows.append(dict(text=name, config=c.label, spec=c.spec or "sdpa", tokens=last,
                         nll=float(nll.mean()), ppl=math.exp(float(nll.mean())), seconds=round(secs, 2),
                         **({"pairs": pairs} if pairs else {}),
                         nll_tokens=[round(float(x), 4) for x in nll]))
        path.write_text(json.dumps(result))
        if bar is not None:
            bar.update(1)
            bar.set_postfix_str(f"{name} {c.label}: ppl {rows[-1]['ppl']:.3f}")
    if bar is not None:
        bar.close()
    path.write_text(json.dumps(result))
    return path
