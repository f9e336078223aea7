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


@st.composite
def _block_threshold_options(draw):
    """Small block grids, every scorer and keep rule, a short window, sometimes a budget or a dense
    fallback length, so patterns are sparse and every code path is drawn at N <= 600."""
    bq = draw(st.sampled_from([8, 16, 32]))
    bk = draw(st.sampled_from([8, 16, 32]))
    stride = draw(st.sampled_from([s for s in (1, 2, 4, 8) if bq % s == 0 and bk % s == 0]))
    scorer = draw(st.sampled_from(["pooled", "vslash", f"antidiagonal(stride={stride})"]))
    rule = draw(st.sampled_from(["relative(alpha=0.3)", "relative(alpha=0.9)", "relative(alpha=1.0)",
                                 "mass(tau=0.5)", "mass(tau=0.9)", "topk(k=2)"]))
    return {
        "scorer": scorer,
        "rule": rule,
        "block_q": bq,
        "block_k": bk,
        "sink": draw(st.integers(0, 40)),
        "window": draw(st.integers(1, 120)),
        "budget": draw(st.one_of(st.none(), st.integers(0, 64))),
        "min_len": draw(st.sampled_from([0, 0, 0, 200])),
        "dense_last": draw(st.integers(0, 2)),
        "share_kv": draw(st.booleans()),
    }


@st.composite
def _oracle_options(draw):
    bk = draw(st.sampled_from([8, 16, 32]))
    by_k = draw(st.booleans())
    return {
        "k": bk * draw(st.integers(1, 5)) if by_k else None,
        "density": None if by_k else draw(st.sampled_from([0.05, 0.2, 0.5, 1.0])),
        "block_q": draw(st.sampled_from([8, 16, 32])),
        "block_k": bk,
        "share_kv": draw(st.booleans()),
        "allocate": "block" if by_k else draw(st.sampled_from(["block", "global"])),
    }


BACKEND_OPTIONS["block_threshold"] = _block_threshold_options()
BACKEND_OPTIONS["oracle"] = _oracle_options()
PER_HEAD_OPTIONS["block_threshold"] = {"share_kv": False}
PER_HEAD_OPTIONS["oracle"] = {"share_kv": False}
