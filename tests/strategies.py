"""Hypothesis strategies shared by the property tests.

``BACKEND_OPTIONS[name]`` draws the options a backend is built with in the backend x corrector
matrix, sized so patterns are genuinely sparse at the drawn lengths (N up to ~600). A backend
registered without an entry here is built with its defaults.
"""

from __future__ import annotations

from hypothesis import strategies as st

BACKEND_OPTIONS = {
    "dense": st.just({}),
    "streaming": st.fixed_dictionaries(
        {"window": st.integers(1, 300), "sink": st.integers(0, 40)}
    ),
}


@st.composite
def _hip_options(draw):
    """Small HiP geometries: key blocks of 8-32, a budget of 1-6 blocks, zero to two coarse stages."""
    bk = draw(st.sampled_from([8, 16, 32]))
    k = bk * draw(st.integers(1, 6))
    stages, nxt = [], k
    chunk = bk
    for _ in range(draw(st.integers(0, 2))):
        chunk *= draw(st.sampled_from([2, 4]))
        keep = chunk * (-(-nxt // chunk) + 1 + draw(st.integers(0, 3)))
        stages.append((chunk, keep))
        nxt = keep
    return {
        "k": k,
        "block_q": draw(st.sampled_from([8, 16, 32, 64])),
        "block_k": bk,
        "stages": "/".join(f"{c}:{n}" for c, n in reversed(stages)),
        "q_stride": draw(st.integers(1, 8)),
        "sink": draw(st.integers(0, 40)),
        "window": draw(st.integers(1, 120)),
        "share_kv": draw(st.booleans()),
    }


BACKEND_OPTIONS["hip"] = _hip_options()
