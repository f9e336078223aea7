"""A byte-level stand-in for a real tokenizer, shared by the eval tests: enough for the harness's plumbing."""

from __future__ import annotations

import torch


class CharTokenizer:
    """One token per byte (``tok(text)["input_ids"]``, ``decode``)."""

    eos_token_id = 0

    def __call__(self, text, return_tensors=None, add_special_tokens=False):
        ids = [1 + (b % 127) for b in text.encode()]
        return {"input_ids": torch.tensor([ids]) if return_tensors == "pt" else ids}

    def decode(self, ids, skip_special_tokens=True):
        return "".join(chr(i) for i in ids if i)
