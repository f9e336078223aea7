"""The public helper a plug-in author tests with: sparsekit.testing.check_backend."""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import pytest
import torch

from sparsekit import Backend, Pattern, SparseAttention
from sparsekit.backends.hip import HiP
from sparsekit.backends.streaming import Streaming
from sparsekit.testing import check_backend

from sparsekit_toy import Strided


@pytest.mark.parametrize("backend", [Strided(block_q=32, block_k=16, local=2, stride=4), Streaming(window=32, sink=4),
                                     HiP(k=64, block_q=32, block_k=16, stages="", sink=16, window=32)],
                         ids=["plugin", "streaming", "hip"])
def test_check_backend_passes_correct_backends(backend):
    report = check_backend(backend, shapes=[(1, 4, 2, 150, 0, 16), (2, 2, 1, 77, 9, 16)])
    assert len(report.shapes) == 2
    assert all("reference" in s["max_err"] and s["max_err"]["reference"] < 1e-5 for s in report.shapes)
    assert all(0 < s["density"] <= 1 for s in report.shapes)
    assert "all checks passed" in str(report)


@dataclass
class _Peeking(Backend):
    """Lists every key block, the future ones included: the pattern type keeps it causal anyway."""

    name: ClassVar[str] = "peeking"

    def pattern(self, q, k, *, scale, q_offset):
        nq, nk = q.shape[2], k.shape[2]
        nqb = -(-nq // 8)
        blocks = torch.arange(-(-nk // 8))[None, None, None, :].expand(1, 1, nqb, -1)
        return Pattern.from_blocks(q, k, q_offset=q_offset, block_q=8, block_k=8, blocks=blocks)


@dataclass
class _WrongShape(Backend):
    name: ClassVar[str] = "wrongshape"

    def pattern(self, q, k, *, scale, q_offset):
        return Pattern.causal(q[:, :, :1], k, q_offset=q_offset + q.shape[2] - 1)


def test_check_backend_catches_broken_backends():
    """A pattern that lists future blocks still runs causally, but check_backend compares against
    the mask; a pattern for the wrong rows is named."""
    with pytest.raises(AssertionError, match="wrongshape.*pattern\\(\\) is for other shapes"):
        check_backend(_WrongShape(), shapes=[(1, 2, 1, 40, 0, 8)])
    # causality is enforced by the pattern type itself: listed future blocks are never visible
    report = check_backend(_Peeking(), shapes=[(1, 2, 1, 40, 0, 8)])
    assert report.shapes[0]["density"] == pytest.approx(1.0)


def test_plugin_that_does_not_subclass_backend_gets_a_clear_error():
    import sparsekit

    class NotABackend:  # what following an incomplete recipe produces
        name = "oops"

        def pattern(self, q, k, *, scale, q_offset):
            return None

    sparsekit.register_backend("oops", NotABackend)
    try:
        with pytest.raises(TypeError, match="must subclass sparsekit.Backend"):
            SparseAttention("oops")
        with pytest.warns(RuntimeWarning, match="must subclass sparsekit.Backend"):
            names = sparsekit.available_backends()
        assert "oops" not in names and "streaming" in names
    finally:
        sparsekit.registry.BACKENDS.unregister("oops")
