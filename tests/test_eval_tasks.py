"""RULER-style task generation and scoring with a stand-in tokenizer (no transformers)."""

import re

import pytest
import torch

from sparsekit.eval.tasks import HEADER, Question, make_samples, recall, score

from char_tokenizer import CharTokenizer




TOK = CharTokenizer()


def test_tasks_are_deterministic_and_scored():
    a = make_samples(TOK, ["passkey", "multikey", "multiquery", "vt"], 3000, 2, seed=5, key_type="word")
    b = make_samples(TOK, ["passkey", "multikey", "multiquery", "vt"], 3000, 2, seed=5, key_type="word")
    c = make_samples(TOK, ["passkey", "multikey", "multiquery", "vt"], 3000, 2, seed=6, key_type="word")
    assert [s.text for s in a] == [s.text for s in b] and a[0].text != c[0].text
    s = a[0]
    assert 2500 < s.n_tokens <= 3000 - 96 and s.n_tokens == len(s.text.encode())
    assert s.text.startswith(HEADER)
    for text, _ in s.needles:
        assert text in s.text
    assert [q.task for q in s.questions] == ["passkey", "multikey", "multiquery", "multiquery", "vt"]
    q = s.questions[0]
    assert q.task == "passkey" and score(q, f" {q.answers[0]}.") and not score(q, " 12.")
    vt = next(q for q in s.questions if q.task == "vt")
    assert score(vt, " " + ", ".join(vt.answers)) and not score(vt, " " + ", ".join(vt.answers[:-1]))
    assert recall("vt", vt.answers, " " + ", ".join(vt.answers[:-1])) == (len(vt.answers) - 1) / len(vt.answers)
    assert recall("passkey", q.answers, f"{q.answers[0]}") == 1.0 and recall("passkey", q.answers, "1") == 0.0


def test_needles_sit_at_their_depths_in_order():
    s = make_samples(TOK, ["multivalue"], 4000, 1, seed=2, values=4, key_type="word")[0]
    depths = [d for _, d in s.needles]
    assert depths == sorted(depths) and all(0.05 <= d <= 0.95 for d in depths)
    pos = [s.text.index(nd) for nd, _ in s.needles]
    assert pos == sorted(pos)
    # needle k sits after about depth * (number of paragraphs) paragraphs
    first = pos[0] / len(s.text)
    assert abs(first - depths[0]) < 0.15


def test_scoring_exact_match_and_partial_credit():
    q = Question("multikey", "...", ("1234567",), 10)
    assert score(q, " 1234567.\n") and not score(q, " 123456") and not score(q, " 7654321 1234567")
    assert not score(q, " no number")
    mv = Question("multivalue", "...", ("1111111", "2222222", "3333333", "4444444"), 40)
    out = " 2222222, 9999999, 4444444"
    assert recall("multivalue", mv.answers, out) == 0.5 and not score(mv, out)
    assert score(mv, " 4444444, 3333333, 2222222, 1111111")  # order does not matter
    assert recall("multivalue", mv.answers, "") == 0.0
    vt = Question("vt", "...", ("ABCDE", "FGHIJ", "KLMNO"), 22)
    assert recall("vt", vt.answers, " ABCDE, KLMNO and XYZZY") == pytest.approx(2 / 3)
    assert recall("multiquery", ("42",), " 42") == 1.0 and recall("multiquery", ("42",), " 420") == 0.0


def test_one_context_per_task_layout():
    samples = make_samples(TOK, ["passkey", "multikey"], 1000, 2, seed=0, shared=False, key_type="word")
    assert [(s.index, s.context) for s in samples] == [(0, "passkey"), (0, "multikey"), (1, "passkey"), (1, "multikey")]
    assert all(len({q.task for q in s.questions}) == 1 for s in samples)
    shared = make_samples(TOK, ["passkey", "multikey"], 1000, 2, seed=0, key_type="word")
    assert [s.context for s in shared] == ["", ""] and [len(s.questions) for s in shared] == [2, 2]


def test_uuid_and_word_keys():
    s = make_samples(TOK, ["multiquery"], 2000, 1, seed=0, queries=3)[0]
    uuid = r"[0-9a-f]{8}-[0-9a-f]{4}-4[0-9a-f]{3}-[89ab][0-9a-f]{3}-[0-9a-f]{12}"
    assert all(re.search(uuid, q.prompt) for q in s.questions)
    w = make_samples(TOK, ["multiquery"], 2000, 1, seed=0, queries=3, key_type="word")[0]
    assert not any(re.search(uuid, q.prompt) for q in w.questions)


def test_bad_arguments():
    with pytest.raises(ValueError, match="unknown task 'nope'"):
        make_samples(TOK, ["nope"], 3000, 1)
    with pytest.raises(ValueError, match="length must be >= 256"):
        make_samples(TOK, ["passkey"], 200, 1)
    with pytest.raises(ValueError, match="key_type"):
        make_samples(TOK, ["passkey"], 3000, 1, key_type="number")
    # 300 byte-tokens cannot hold the header and three UUID-keyed needles: refused, not silently over-long
    with pytest.raises(ValueError, match="length 300 is too short for the tasks passkey, multikey"):
        make_samples(TOK, ["passkey", "multikey"], 300, 1)
