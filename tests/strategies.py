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
        # both the default group-shared selection and one selection per query head; the GQA ==
        # repeated-K/V property holds only for the latter (see PER_HEAD_OPTIONS)
        "share_kv": draw(st.booleans()),
    }


BACKEND_OPTIONS["hip"] = _hip_options()

# options that make a backend's selection per query head, for the property "GQA equals the same
# computation with K/V repeated to the query heads" (a selection shared by a KV group is, by
# design, not the same as one made per repeated head)
PER_HEAD_OPTIONS = {"hip": {"share_kv": False}}


@st.composite
def _vertical_slash_options(draw):
    """Small vertical-slash budgets: pages of 4-16 keys, a few tens of columns and diagonals,
    so at N <= 600 a row sees a small fraction of its prefix."""
    bk = draw(st.sampled_from([4, 8, 16]))
    return {
        "vertical_size": draw(st.integers(0, 40)),
        "slash_size": draw(st.integers(0, 24)),
        "last_q": draw(st.integers(1, 64)),
        "sink": draw(st.integers(0, 8)),
        "local": draw(st.integers(1, 16)),
        "block_k": bk,
        "block_q": bk * draw(st.sampled_from([1, 2, 4])),
    }


BACKEND_OPTIONS["vertical_slash"] = _vertical_slash_options()


@st.composite
def _strided_options(draw):
    """The third-party plug-in's block pattern, small blocks so it is sparse at N <= 600."""
    bk = draw(st.sampled_from([4, 8, 16]))
    return {
        "block_q": bk * draw(st.sampled_from([1, 2, 4])),
        "block_k": bk,
        "local": draw(st.integers(1, 4)),
        "stride": draw(st.integers(1, 12)),
    }


BACKEND_OPTIONS["strided"] = _strided_options()
