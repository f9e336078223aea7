"""RULER-style retrieval tasks, generated deterministically from a seed.

Filler is natural English prose nobody here wrote: the docstrings of the Python standard
library that ships with the running interpreter (prose paragraphs only; code examples,
doctests and tables are dropped). The corpus therefore depends on the Python version; the
committed results name theirs.

Tasks (Hsieh et al., "RULER", https://arxiv.org/abs/2404.06654, Sec. 3):

* ``passkey`` - single needle: a 5-digit pass key in the filler.
* ``multikey`` - multi-key needle: ``One of the special magic numbers for <key> is: <7 digits>.``
  (keys are UUIDs, RULER's hardest key type, or with ``key_type="word"`` two random words)
  for one target key and ``distractors`` other UUID keys; asked for the target.
* ``multivalue`` - one UUID key with ``values`` different numbers; asked for all of them.
* ``multiquery`` - ``queries`` UUID keys, each asked in its own question over the same context.
* ``vt`` - variable tracking: ``VAR ABCDE = 12345`` and a chain of ``VAR X = VAR Y``
  assignments; asked for every variable holding the value.

A :class:`Sample` is one context (filler plus the needles of one or more tasks) and a list
of questions; every question of a sample is answered over one shared prefill of the context.
Scoring is exact match on the parsed answer (all values for multivalue and vt).
"""

from __future__ import annotations

import ast
import random
import re
import string
import sysconfig
import uuid
from dataclasses import dataclass, field
from functools import lru_cache
from pathlib import Path
from typing import Sequence

__all__ = ["TASKS", "Question", "Sample", "filler_paragraphs", "make_samples", "score", "recall"]

TASKS = ("passkey", "multikey", "multivalue", "multiquery", "vt")

HEADER = (
    "Below is a long text. Some special facts are hidden in it. "
    "Memorize them; you will be asked about them afterwards.\n\n"
)


@dataclass(frozen=True)
class Question:
    """One question over a sample's context.

    task : task name; prompt : text appended after the context (ends with the answer prefix);
    answers : expected strings (all must appear for multi-answer tasks); max_new_tokens : decode budget.
    """

    task: str
    prompt: str
    answers: tuple
    max_new_tokens: int


@dataclass
class Sample:
    """One context and its questions. ``needles`` are (text, depth in [0, 1]) pairs.

    ``(index, context)`` identifies a sample within a length: with one context per task
    (``shared=False``) the same index exists once per task group."""

    index: int
    seed: int
    length: int
    context: str = ""  # "" when every task shares the context; else the task group, e.g. "passkey"
    needles: list = field(default_factory=list)
    questions: list = field(default_factory=list)
    text: str = ""
    n_tokens: int = 0


# ------------------------------------------------------------------------------ filler corpus
_PROSE = re.compile(r"^[A-Za-z0-9 ,.;:'\"()\-?!/]+$")


def _prose_paragraphs(doc: str) -> list:
    out = []
    for para in re.split(r"\n\s*\n", doc):
        lines = [ln.strip() for ln in para.strip().splitlines()]
        if not lines or any(ln.startswith((">>>", "...", "-", "*", "=", ":", "|", "+")) for ln in lines):
            continue
        text = " ".join(lines)
        words = text.split()
        if len(words) < 12 or not text[0].isupper() or not text.endswith("."):
            continue
        if not _PROSE.match(text) or "()" in text or "__" in text:
            continue
        out.append(text)
    return out


@lru_cache(maxsize=1)
def filler_paragraphs() -> tuple:
    """Prose paragraphs from the standard library's docstrings, in a fixed order.

    Deterministic for a given Python installation (files sorted, then docstrings in
    source order); duplicates removed.
    """
    root = Path(sysconfig.get_paths()["stdlib"])
    skip = {"test", "tests", "idlelib", "lib2to3", "site-packages", "dist-packages", "ensurepip", "turtledemo", "tkinter"}
    seen, paras = set(), []
    for path in sorted(root.rglob("*.py")):
        if skip & set(path.relative_to(root).parts):
            continue
        try:
            tree = ast.parse(path.read_text(encoding="utf-8"))
        except (SyntaxError, UnicodeDecodeError, ValueError):
            continue
        for node in ast.walk(tree):
            if isinstance(node, (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)):
                doc = ast.get_docstring(node)
                if doc:
                    for p in _prose_paragraphs(doc):
                        if p not in seen:
                            seen.add(p)
                            paras.append(p)
    if len(paras) < 200:
        raise RuntimeError(f"found only {len(paras)} prose paragraphs in the standard library at {root}")
    return tuple(paras)


# ------------------------------------------------------------------------------ needles
def _uuid(rng: random.Random) -> str:
    return str(uuid.UUID(int=rng.getrandbits(128), version=4))


_WORDS = (
    "apple anchor badger basket candle canyon copper dolphin ember falcon feather garden glacier harbor "
    "helmet island jacket kettle lantern meadow mirror needle orchard pebble pepper pillow quarry rabbit "
    "ribbon saddle salmon shadow silver spider summit thunder timber tomato tunnel velvet violin walnut "
    "whistle willow window winter zebra"
).split()


def _word_key(rng: random.Random, taken: set) -> str:
    while True:
        w = f"{rng.choice(_WORDS)}-{rng.choice(_WORDS)}"
        if w not in taken:
            taken.add(w)
            return w


def _number(rng: random.Random, digits: int) -> str:
    return str(rng.randint(10 ** (digits - 1), 10**digits - 1))


def _var(rng: random.Random, taken: set) -> str:
    while True:
        v = "".join(rng.choice(string.ascii_uppercase) for _ in range(5))
        if v not in taken:
            taken.add(v)
            return v


def _task_needles(task: str, rng: random.Random, opts: dict, keys_taken: set) -> tuple:
    """(needle texts, questions) of one task instance."""
    def magic(key, value):
        return f"One of the special magic numbers for {key} is: {value}."

    def ask(key):
        return (
            f"What is the special magic number for {key} mentioned in the text?\n"
            f"Answer: The special magic number for {key} is:"
        )

    if task == "passkey":
        key = _number(rng, 5)
        needle = f"The pass key is {key}. Remember it. {key} is the pass key."
        q = Question(task, "What is the pass key?\nAnswer: The pass key is", (key,), 8)
        return [needle], [q]
    def newkey():
        return _uuid(rng) if opts["key_type"] == "uuid" else _word_key(rng, keys_taken)

    if task == "multikey":
        keys = [newkey() for _ in range(1 + opts["distractors"])]
        vals = [_number(rng, 7) for _ in keys]
        needles = [magic(k, v) for k, v in zip(keys, vals)]
        return needles, [Question(task, ask(keys[0]), (vals[0],), 10)]
    if task == "multivalue":
        key = newkey()
        vals = []
        while len(vals) < opts["values"]:
            v = _number(rng, 7)
            if v not in vals:
                vals.append(v)
        needles = [magic(key, v) for v in vals]
        prompt = (
            f"What are all the special magic numbers for {key} mentioned in the text?\n"
            f"Answer: The special magic numbers for {key} are:"
        )
        return needles, [Question(task, prompt, tuple(vals), 9 * len(vals) + 4)]
    if task == "multiquery":
        keys = [newkey() for _ in range(opts["queries"])]
        vals = [_number(rng, 7) for _ in keys]
        needles = [magic(k, v) for k, v in zip(keys, vals)]
        return needles, [Question(task, ask(k), (v,), 10) for k, v in zip(keys, vals)]
    if task == "vt":
        value = _number(rng, 5)
        names = [_var(rng, keys_taken) for _ in range(opts["hops"] + 1)]
        needles = [f"VAR {names[0]} = {value}."] + [
            f"VAR {names[i + 1]} = VAR {names[i]}." for i in range(opts["hops"])
        ]
        prompt = (
            f"Find all variables that are assigned the value {value} in the text above.\n"
            f"Answer: The variables assigned the value {value} are:"
        )
        return needles, [Question(task, prompt, tuple(names), 6 * len(names) + 4)]
    raise ValueError(f"unknown task {task!r}; choose from {', '.join(TASKS)}")


def make_samples(
    tokenizer,
    tasks: Sequence[str],
    length: int,
    n: int,
    *,
    seed: int = 0,
    shared: bool = True,
    distractors: int = 3,
    values: int = 4,
    queries: int = 2,
    hops: int = 4,
    key_type: str = "uuid",
    question_budget: int = 96,
) -> list:
    """``n`` samples per context ``length`` (tokens, context plus question), deterministic in ``seed``.

    shared=True: each sample's context holds the needles of every task in ``tasks`` (each
    at its own random depth) and carries one question set per task, all answered over one
    prefill. shared=False: one sample per (task, index), RULER's layout, ``n * len(tasks)``
    samples. Needle depths are uniform in [0.05, 0.95] of the context; the needles of one
    task are ordered. Each sample's context is filler paragraphs from a random starting point
    of the corpus, cut so that context + ``question_budget`` tokens is about ``length``.

    ``tokenizer`` is anything callable as ``tokenizer(text, add_special_tokens=False)`` returning a
    mapping with ``"input_ids"`` (a list of ids); a Hugging Face tokenizer is one.

    Raises ``ValueError`` for an unknown task or key type, a length below 256, or a length too short
    to hold the header and the needles of the tasks.
    """
    for t in tasks:
        if t not in TASKS:
            raise ValueError(f"make_samples: unknown task {t!r}; choose from {', '.join(TASKS)}")
    if length < 256:
        raise ValueError(f"make_samples: length must be >= 256 tokens, got {length}")
    if key_type not in ("uuid", "word"):
        raise ValueError(f"make_samples: key_type must be 'uuid' or 'word', got {key_type!r}")
    opts = dict(distractors=distractors, values=values, queries=queries, hops=hops, key_type=key_type)
    paras = filler_paragraphs()
    groups = [list(tasks)] if shared else [[t] for t in tasks]
    samples = []
    for i in range(n):
        for group in groups:
            s_seed = _mix(seed, length, i, group)
            rng = random.Random(s_seed)
            sample = Sample(index=i, seed=s_seed, length=length, context="" if shared else ",".join(group))
            taken: set = set()
            for task in group:
                needles, qs = _task_needles(task, rng, opts, taken)
                depths = sorted(rng.uniform(0.05, 0.95) for _ in needles)
                sample.needles += list(zip(needles, depths))
                sample.questions += qs
            _fill(sample, tokenizer, paras, rng, length - question_budget)
            samples.append(sample)
    return samples


def _mix(seed: int, length: int, i: int, group) -> int:
    """A stable 32-bit seed (Python's hash() of strings is salted per process)."""
    text = f"{seed}|{length}|{i}|{','.join(group)}"
    h = 2166136261
    for ch in text.encode():
        h = ((h ^ ch) * 16777619) & 0xFFFFFFFF
    return h


def _fill(sample: Sample, tokenizer, paras, rng: random.Random, budget: int) -> None:
    """Assemble header + filler (+ needles at their depths) to about ``budget`` tokens."""
    def ntok(text):
        return len(tokenizer(text, add_special_tokens=False)["input_ids"])

    fixed = ntok(HEADER) + sum(ntok(" " + nd) for nd, _ in sample.needles)
    if fixed > budget:
        tasks = ", ".join(dict.fromkeys(q.task for q in sample.questions))
        raise ValueError(
            f"make_samples: length {sample.length} is too short for the tasks {tasks}: the header and the needles "
            f"alone take {fixed} tokens of the {budget} left for the context (the rest is kept for the question); "
            "use a longer length, fewer tasks, or word keys (key_type='word')"
        )
    start = rng.randrange(len(paras))
    chosen, total, j = [], fixed, start
    while True:
        p = paras[j % len(paras)]
        t = ntok(p + "\n\n")
        if total + t > budget:
            break
        chosen.append(p)
        total += t
        j += 1
        if j - start > len(paras):
            raise RuntimeError("filler corpus too small for the requested length")
    while True:
        sample.text = _assemble(sample.needles, chosen)
        sample.n_tokens = ntok(sample.text)
        if sample.n_tokens <= budget or not chosen:
            return
        chosen.pop()  # piecewise counts can undercount the joined text by a few tokens


def _assemble(needles, chosen) -> str:
    # needle k goes after paragraph round(depth * len(chosen))
    slots: dict = {}
    for nd, depth in needles:
        slots.setdefault(min(len(chosen), round(depth * len(chosen))), []).append(nd)
    parts = [HEADER]
    for k in range(len(chosen) + 1):
        for nd in slots.get(k, []):
            parts.append(nd + "\n\n")
        if k < len(chosen):
            parts.append(chosen[k] + "\n\n")
    return "".join(parts)


# ------------------------------------------------------------------------------ scoring
def score(question: Question, generated: str) -> bool:
    """Exact match: the first answer token group equals the answer (all answers for multi-answer tasks)."""
    if question.task in ("multivalue", "vt"):
        return recall(question.task, question.answers, generated) == 1.0
    m = re.search(r"\d+", generated)
    return bool(m) and m.group(0) == question.answers[0]


def recall(task: str, answers: Sequence[str], generated: str) -> float:
    """Fraction of ``answers`` found in ``generated`` (partial credit for multivalue and vt, as
    RULER's ``string_match_all``); for single-answer tasks the exact match as 0.0 or 1.0."""
    if task in ("multivalue", "vt"):
        found = set(re.findall(r"[A-Z]{5}" if task == "vt" else r"\d+", generated))
        return sum(a in found for a in answers) / len(answers)
    m = re.search(r"\d+", generated)
    return float(bool(m) and m.group(0) == answers[0])
