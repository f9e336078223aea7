"""StreamingLLM prefill: attention sinks plus a sliding window.

Xiao et al., "Efficient Streaming Language Models with Attention Sinks", ICLR 2024
(https://arxiv.org/abs/2309.17453). Defaults follow the Δ paper's setting: window 2048,
sink 1024.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

from sparsekit.base import Backend
from sparsekit.pattern import Pattern
from sparsekit.validate import check_int_option


@dataclass
class Streaming(Backend):
    """Sink + sliding window: row at position p sees keys ``[0, sink)`` and ``(p - window, p]``.

    Parameters
    ----------
    window : int, >= 1
        Keys ending at (and including) the query's own position.
    sink : int, >= 0
        Leading keys every query sees.
    """

    name: ClassVar[str] = "streaming"
    window: int = 2048
    sink: int = 1024

    def __post_init__(self):
        self.window = check_int_option("streaming", "window", self.window, 1)
        self.sink = check_int_option("streaming", "sink", self.sink, 0)

    @classmethod
    def sweep(cls, n: int) -> list:
        """``sparsekit sweep``'s settings: sink ``n / 1024`` (at least 16), windows for 0.5..30% of ``n``."""
        sink = max(16, n // 1024)
        out = []
        for x in (0.005, 0.01, 0.02, 0.05, 0.1, 0.2, 0.3):
            w = max(16, int(x * n) - sink)
            out.append(dict(series=cls.name, label=f"window={w}", options=dict(window=w, sink=sink)))
        return out

    def pattern(self, q, k, *, scale: float, q_offset: int) -> Pattern:
        return Pattern.band(q, k, q_offset=q_offset, window=self.window, sink=self.sink)
