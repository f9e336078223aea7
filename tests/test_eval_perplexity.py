"""Perplexity scoring pieces that need no model (no transformers): token NLL and text windows."""

import math

import pytest
import torch

from sparsekit.eval.perplexity import stdlib_text, text_windows, token_nll
from sparsekit.eval.plan import ranges


class ByteTokenizer:
    def __call__(self, text, return_tensors=None, add_special_tokens=False):
        ids = list(text.encode())
        return {"input_ids": torch.tensor([ids]) if return_tensors == "pt" else ids}


def test_token_nll_uniform_and_confident_logits():
    V, last = 7, 5
    ids = torch.tensor([[1, 2, 3, 4, 5, 6, 0, 1]])
    uniform = torch.zeros(1, last + 1, V)
    nll = token_nll(uniform, ids, last)
    assert nll.dtype == torch.float64 and nll.shape == (last,)
    torch.testing.assert_close(nll, torch.full((last,), math.log(V), dtype=torch.float64))
    # position j predicts token j + 1: a logit of 20 on exactly that token gives NLL ~ log(1 + 6 e^-20)
    logits = torch.zeros(1, last + 1, V)
    targets = ids[0, -last:]
    for j in range(last):
        logits[0, j, targets[j]] = 20.0
    logits[0, last, 3] = 1e4  # the last position predicts past the end: must be ignored
    nll = token_nll(logits, ids, last)
    torch.testing.assert_close(nll, torch.full((last,), math.log1p(6 * math.exp(-20)), dtype=torch.float64))
    # off by one (position j + 1 confident about token j + 1): no position predicts its own target
    wrong = torch.zeros(1, last + 1, V)
    for j in range(last):
        wrong[0, j + 1, targets[j]] = 20.0
    nll = token_nll(wrong, ids, last)
    assert nll[0] == pytest.approx(math.log(V)) and (nll[1:] > 19).all()


def test_token_nll_uses_only_the_final_positions():
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(0, 11, (1, 40), generator=g)
    logits = torch.randn(1, 40, 11, generator=g)
    full = torch.nn.functional.cross_entropy(logits[0, :-1].double(), ids[0, 1:], reduction="none")
    torch.testing.assert_close(token_nll(logits, ids, 16), full[-16:])
    torch.testing.assert_close(token_nll(logits[:, -17:], ids, 16), full[-16:])
    with pytest.raises(ValueError, match="last must be >= 1"):
        token_nll(logits, ids, 0)
    with pytest.raises(ValueError, match="more than last=40"):
        token_nll(logits, ids, 40)


def test_text_windows():
    w = text_windows(ByteTokenizer(), ["argparse.py", "argparse.py"], 100)
    assert list(w) == ["argparse.py"] and w["argparse.py"].shape == (1, 100)
    assert bytes(w["argparse.py"][0].tolist()) == stdlib_text("argparse.py").encode()[:100]
    with pytest.raises(ValueError, match="fewer than --length"):
        text_windows(ByteTokenizer(), ["argparse.py"], 10**8)
    with pytest.raises(FileNotFoundError, match="nosuchfile.py"):
        text_windows(ByteTokenizer(), ["nosuchfile.py"], 100)


def test_layer_ranges():
    assert ranges([0, 1, 2, 4, 6, 7]) == "0-2, 4, 6-7"
    assert ranges([5, 11, 17]) == "5, 11, 17"
    assert ranges([]) == "none"
    assert ranges([3, 2, 2, 1]) == "1-3"
