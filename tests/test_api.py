"""Validation, registry and plug-ins, specs, cost accounting, short inputs."""

from __future__ import annotations

import subprocess
import sys
import warnings
from importlib import metadata
from pathlib import Path

import pytest
import torch
from hypothesis import given, strategies as st

import sparsekit
from sparsekit import Delta, Recompute, SparseAttention, plan_rows
from sparsekit.registry import BACKENDS, INTERPOLATIONS, PluginConflictError, PluginLoadError, Registry
from sparsekit.spec import SpecError

from ref64 import attention64, causal_mask


def qkv(B=1, Hq=4, Hkv=2, Nq=40, Nk=None, D=16, dtype=torch.float32):
    Nk = Nq if Nk is None else Nk
    g = torch.Generator().manual_seed(0)
    return (
        torch.randn(B, Hq, Nq, D, generator=g).to(dtype),
        torch.randn(B, Hkv, Nk, D, generator=g).to(dtype),
        torch.randn(B, Hkv, Nk, D, generator=g).to(dtype),
    )


# ----------------------------------------------------------------------------- validation
def test_validation_errors_name_the_argument():
    attn = SparseAttention("streaming", corrector=Delta(gamma=8), window=8, sink=2)
    q, k, v = qkv()
    cases = [
        ((q[0], k, v), {}, ValueError, r"q must have 4 dimensions \[B, H, N, D\], got shape \[4, 40, 16\]"),
        ((q, k[0], v), {}, ValueError, r"k must have 4 dimensions"),
        ((q, k, v[:, :, :-1]), {}, ValueError, r"k and v must have the same shape"),
        ((q[:1].expand(2, -1, -1, -1), k, v), {}, ValueError, r"batch size differs"),
        ((q[..., :8], k, v), {}, ValueError, r"head_dim differs"),
        ((q[:, :3], k, v), {}, ValueError, r"q heads \(3\) must be a multiple of k/v heads \(2\)"),
        ((q, k, v), {"q_offset": 1}, ValueError, r"q_offset \+ q_len must be <= kv_len: 1 \+ 40 > 40"),
        ((q, k, v), {"q_offset": -1}, ValueError, r"q_offset must be >= 0"),
        ((q, k[:, :, :10], v[:, :, :10]), {}, ValueError, r"q has more rows \(40\) than k has keys \(10\)"),
        ((q, k.double(), v.double()), {}, TypeError, r"q, k, v must share one dtype"),
        ((q.int(), k, v), {}, TypeError, r"q has dtype torch.int32; supported"),
        ((q.tolist(), k, v), {}, TypeError, r"q must be a torch.Tensor"),
        ((q, k, v), {"scale": -1.0}, ValueError, r"scale must be a finite positive float"),
        ((q, k, v), {"q_offset": 1.5}, TypeError, r"q_offset must be an int"),
    ]
    for args, kwargs, exc, msg in cases:
        with pytest.raises(exc, match=msg):
            attn(*args, **kwargs)


def test_devices_must_match():
    q, k, v = qkv()
    with pytest.raises(ValueError, match="one device"):
        SparseAttention("dense")(q, k.to("meta"), v.to("meta"))


@pytest.mark.parametrize(
    "make, exc, msg",
    [
        (lambda: Delta(gamma=0), ValueError, r"delta: gamma must be >= 1, got 0"),
        (lambda: Recompute(gamma=2.5), TypeError, r"recompute: gamma must be an int"),
        (lambda: Delta(tail=-1), ValueError, r"tail must be >= 0"),
        (lambda: SparseAttention("streaming", window=0), ValueError, r"streaming: window must be >= 1"),
        (lambda: SparseAttention("streaming", sink=-2), ValueError, r"streaming: sink must be >= 0"),
        (lambda: SparseAttention("streaming", windw=8), TypeError, r"unknown option\(s\) 'windw' for backend 'streaming'; valid options: window, sink"),
        (lambda: SparseAttention("dense", corrector="delta(gama=3)"), TypeError, r"unknown option\(s\) 'gama' for corrector 'delta'"),
        (lambda: Delta(interpolation="lineer"), ValueError, r"unknown interpolation 'lineer'; did you mean 'linear'\?"),
        (lambda: SparseAttention("streamng"), ValueError, r"unknown backend 'streamng'; did you mean 'streaming'\? known backends: .*dense.*streaming"),
        (lambda: SparseAttention("dense", corrector=3), TypeError, r"corrector must be a name"),
        (lambda: SparseAttention(Delta()), TypeError, r"expected a backend, got the corrector 'delta'"),
        (lambda: sparsekit.correctors.delta.Delta(interpolation={"name": "ema", "beta": 2.0}), ValueError, r"ema: beta must be a float in \(0, 1\]"),
    ],
)
def test_option_errors(make, exc, msg):
    import sparsekit.correctors.delta  # noqa: F401  (for the attribute path used above)

    with pytest.raises(exc, match=msg):
        make()


# ----------------------------------------------------------------------------- specs
def test_spec_round_trips():
    specs = [
        "dense",
        "streaming(window=2048,sink=1024)",
        "streaming(window=7,sink=0)+delta(gamma=64,tail=None,interpolation=repeat)",
        "streaming(window=7,sink=0)+delta(gamma=16,tail=0,interpolation=ema(beta=0.5))",
        "streaming(window=7,sink=3)+recompute(gamma=3,tail=12)",
        "dense+delta(gamma=4,tail=None,interpolation=abg(alpha=0.1,beta=0.005,gamma=0.000166))",
    ]
    for s in specs:
        a = SparseAttention.from_string(s)
        assert SparseAttention.from_string(str(a)) == a
        assert SparseAttention.from_dict(a.to_dict()) == a
    a = SparseAttention.from_string("streaming(window=2048,sink=1024)+delta(gamma=64)")
    assert str(a) == "streaming(window=2048,sink=1024)+delta(gamma=64,tail=None,interpolation=repeat)"
    assert a.to_dict() == {
        "backend": {"name": "streaming", "window": 2048, "sink": 1024},
        "corrector": {"name": "delta", "gamma": 64, "tail": None, "interpolation": {"name": "repeat"}},
    }
    assert SparseAttention("streaming", corrector=Delta(gamma=64), window=2048, sink=1024) == a


@given(
    window=st.integers(1, 10**6),
    sink=st.integers(0, 10**6),
    gamma=st.integers(1, 4096),
    tail=st.one_of(st.none(), st.integers(0, 4096)),
    interp=st.sampled_from(["repeat", "linear", {"name": "ema", "beta": 0.95}, {"name": "abg", "alpha": 0.05}]),
    kind=st.sampled_from(["delta", "recompute", None]),
)
def test_spec_round_trip_property(window, sink, gamma, tail, interp, kind):
    corr = None
    if kind == "delta":
        corr = Delta(gamma=gamma, tail=tail, interpolation=interp)
    elif kind == "recompute":
        corr = Recompute(gamma=gamma, tail=tail)
    a = SparseAttention("streaming", corrector=corr, window=window, sink=sink)
    assert SparseAttention.from_string(str(a)) == a
    assert SparseAttention.from_dict(a.to_dict()) == a


@pytest.mark.parametrize(
    "text, msg",
    [
        ("", "non-empty"),
        ("streaming(window=8", "unbalanced"),
        ("streaming(window)", "expected key=value"),
        ("streaming(window=1,window=2)", "given twice"),
        ("a+b+c", "expected 'backend' or 'backend\\+corrector'"),
        ("str eaming", "bad plug-in name"),
    ],
)
def test_spec_errors(text, msg):
    with pytest.raises(SpecError, match=msg):
        SparseAttention.from_string(text)


# ----------------------------------------------------------------------------- cost
def test_cost_matches_counted_pairs_and_readme_numbers():
    a = SparseAttention("streaming", corrector=Delta(gamma=64), window=2048, sink=1024)
    c = a.cost(131072)
    plan = plan_rows(131072, 64)
    assert plan.n_tail == 131072 % 64 + 128
    # streaming over the body rows (the tail is recomputed densely, so the backend skips it):
    # row p sees min(p+1, sink) + clamp(p+1-sink, 0, window)
    p1 = torch.arange(1, plan.n_body + 1, dtype=torch.int64)
    assert c.backend_pairs == int((p1.clamp(max=1024) + (p1 - 1024).clamp(0, 2048)).sum()) == 397_542_912
    rows = plan.dense_rows()
    assert c.corrector_pairs == int((rows + 1).sum())
    assert c.dense_pairs == 131072 * 131073 // 2
    assert 0.0 < c.density < 0.07
    # with q_offset: rows sit later
    c2 = a.cost(500, 1200, 700)
    assert c2.corrector_pairs == int((plan_rows(500, 64).dense_rows() + 701).sum())
    assert c2.dense_pairs == sum(700 + i + 1 for i in range(500))


def test_all_tail_skips_backend_and_counts_nothing_for_it():
    a = SparseAttention("streaming", corrector=Delta(gamma=64), window=4, sink=0)
    c = a.cost(100)
    assert c.backend_pairs == 0 and c.density == pytest.approx(1.0)


# ----------------------------------------------------------------------------- short / odd inputs
@pytest.mark.parametrize("nq", [1, 2, 63, 64, 65, 127, 128, 129, 191, 193, 257])
@pytest.mark.parametrize("corrector", [None, "delta", "recompute", "delta(gamma=64,interpolation=linear)"])
def test_short_and_odd_lengths(nq, corrector):
    q, k, v = qkv(B=2, Hq=6, Hkv=3, Nq=nq, Nk=nq + 3)
    out, lse = SparseAttention("streaming", corrector=corrector, window=5, sink=1)(q, k, v, return_lse=True)
    assert out.shape == q.shape and torch.isfinite(out).all() and torch.isfinite(lse).all()
    if corrector and nq <= 128 + nq % 64:  # everything is dense tail
        dn, _ = attention64(q, k, v, causal_mask(nq, nq + 3, 3), 16**-0.5)
        assert torch.allclose(out.double(), dn, atol=1e-5)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_half_precision_on_cpu(dtype):
    q, k, v = qkv(Nq=300, D=32)
    ref = SparseAttention("streaming", corrector="delta(gamma=16)", window=20, sink=4)(q, k, v)
    out = SparseAttention("streaming", corrector="delta(gamma=16)", window=20, sink=4)(q.to(dtype), k.to(dtype), v.to(dtype))
    assert out.dtype == dtype
    rel = (out.float() - ref).norm() / ref.norm()
    assert rel < (1e-2 if dtype == torch.bfloat16 else 2e-3)


# ----------------------------------------------------------------------------- registry
class _FakeEP:
    def __init__(self, name, value, dist, loader):
        self.name, self.value, self._loader = name, value, loader
        self.dist = type("D", (), {"name": dist})()

    def load(self):
        return self._loader()


def _registry_with(monkeypatch, eps):
    reg = Registry("backend", "sparsekit.test-group")
    monkeypatch.setattr(metadata, "entry_points", lambda group=None: eps if group == "sparsekit.test-group" else [])
    return reg


def test_registry_conflict_names_both_distributions(monkeypatch):
    Dense = BACKENDS.get("dense")
    reg = _registry_with(
        monkeypatch,
        [_FakeEP("twin", "a.mod:X", "dist-a", lambda: Dense), _FakeEP("twin", "b.mod:Y", "dist-b", lambda: Dense)],
    )
    with pytest.raises(PluginConflictError, match=r"'twin' is registered by more than one distribution: dist-a \(a.mod:X\) and dist-b \(b.mod:Y\)"):
        reg.get("twin")


def test_registry_broken_plugin_warns_and_others_work(monkeypatch):
    Dense = BACKENDS.get("dense")

    def boom():
        raise ImportError("no module named 'cuda_only_thing'")

    reg = _registry_with(
        monkeypatch,
        [_FakeEP("broken", "x:Y", "dist-broken", boom), _FakeEP("fine", "a:B", "dist-fine", lambda: Dense)],
    )
    with pytest.warns(RuntimeWarning, match=r"'broken' from dist-broken \(x:Y\) failed to import: ImportError"):
        names = reg.available()
    assert names == ["fine"]
    with pytest.raises(PluginLoadError, match="cuda_only_thing"):
        reg.get("broken")
    assert reg.get("fine") is Dense


def test_duplicate_metadata_for_one_target_is_not_a_conflict(monkeypatch):
    Dense = BACKENDS.get("dense")
    reg = _registry_with(
        monkeypatch, [_FakeEP("d", "a:B", "dist", lambda: Dense), _FakeEP("d", "a:B", "dist", lambda: Dense)]
    )
    assert reg.get("d") is Dense


def test_first_party_plugins_come_from_entry_points():
    eps = {ep.name: ep.value for ep in metadata.entry_points(group="sparsekit.backends")}
    assert eps["streaming"] == "sparsekit.backends.streaming:Streaming"
    assert {"dense", "streaming"} <= set(sparsekit.available_backends())
    assert {"delta", "recompute"} <= set(sparsekit.available_correctors())
    assert {"repeat", "linear", "ema", "abg"} <= set(sparsekit.available_interpolations())


def test_third_party_plugin_package_installs_and_works_by_name(tmp_path, monkeypatch):
    pkg = Path(__file__).parent / "plugin_pkg"
    target = tmp_path / "site"
    subprocess.run(
        [sys.executable, "-m", "pip", "install", "-q", "--no-deps", "--no-build-isolation", "--no-index",
         "--target", str(target), str(pkg)],
        check=True,
    )
    monkeypatch.syspath_prepend(str(target))
    local = BACKENDS._local.pop("strided", None)  # conftest's in-process registration: use the entry point
    sparsekit.registry.refresh()
    try:
        eps = [ep for ep in metadata.entry_points(group="sparsekit.backends") if ep.name == "strided"]
        assert [getattr(ep.dist, "name", None) for ep in eps] == ["sparsekit-toy-plugin"]
        assert "strided" in sparsekit.available_backends()
        assert sparsekit.registry.BACKENDS.get("strided").__module__ == "sparsekit_toy"
        assert "hold_first" in sparsekit.available_interpolations()
        q, k, v = qkv(B=2, Hq=4, Hkv=1, Nq=300)
        attn = SparseAttention.from_string("strided(block_q=16,block_k=8,local=2,stride=5)+delta(gamma=16,interpolation=hold_first)")
        out = attn(q, k, v)
        sparse = SparseAttention.from_string("strided(block_q=16,block_k=8,local=2,stride=5)")(q, k, v)
        mask = attn.backend.mask(q, k, q_offset=0)
        assert 0.1 < mask[0, 0].sum() / causal_mask(300, 300, 0).sum() < 0.5  # genuinely sparse
        ref, _ = attention64(q, k, v, mask, 16**-0.5)
        assert torch.allclose(sparse.double(), ref, atol=1e-5)
        # the plug-in wrote only pattern(): cost comes from sparsekit and counts the mask
        assert attn.cost(300).backend_pairs == int(mask[0, 0, : plan_rows(300, 16).n_body].sum())
        # hold_first: every body row carries anchor 0's delta
        dense, _ = attention64(q, k, v, causal_mask(300, 300, 0), 16**-0.5)
        d0 = dense[:, :, 0] - sparse[:, :, 0].double()
        body = plan_rows(300, 16).n_body
        assert torch.allclose(out[:, :, 17].double(), sparse[:, :, 17].double() + d0, atol=1e-5)
        assert body > 17
    finally:
        if local is not None:
            BACKENDS.register("strided", local)
        sparsekit.registry.refresh()


# ----------------------------------------------------------------------------- found by trying it as a user
def test_layout_bnhd_matches_bhnd_and_a_likely_transposed_call_warns():
    q, k, v = qkv(B=2, Hq=4, Hkv=2, Nq=50, D=16)
    attn = SparseAttention("streaming", corrector="delta(gamma=16)", window=8, sink=2)
    ref, ref_lse = attn(q, k, v, return_lse=True)
    out, lse = attn(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), layout="BNHD", return_lse=True)
    assert out.shape == (2, 50, 4, 16) and torch.allclose(out.transpose(1, 2), ref) and torch.allclose(lse, ref_lse)
    # a [B, N, H, D] tensor passed without layout: "heads" longer than "rows" in both q and k -> a warning
    qt, kt, vt = (torch.randn(1, 64, 4, 16), torch.randn(1, 64, 4, 16), torch.randn(1, 64, 4, 16))
    with pytest.warns(UserWarning, match="layout='BNHD'"):
        SparseAttention("dense")(qt, kt, vt)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        SparseAttention("dense")(qt, kt, vt, layout="BHND")  # explicit: no warning
        SparseAttention("dense")(q[:, :, :2], k, v)  # few rows over a long cache: not a transposed call
    with pytest.raises(ValueError, match="layout must be 'BHND'"):
        attn(q, k, v, layout="NHD")


@pytest.mark.parametrize("dim", [0, 1, 2, 3])
def test_any_empty_dimension_is_the_same_clear_error(dim):
    q, k, v = qkv()
    shape = list(q.shape)
    shape[dim] = 0
    with pytest.raises(ValueError, match=r"q must be non-empty \[B, H, N, D\]"):
        SparseAttention("dense")(q.new_zeros(shape), k, v)
    kshape = list(k.shape)
    kshape[dim] = 0
    with pytest.raises(ValueError, match=r"k must be non-empty"):
        SparseAttention("dense")(q, k.new_zeros(kshape), v.new_zeros(kshape))


def test_user_mistakes_get_messages():
    with pytest.raises(SpecError, match=r"use SparseAttention.from_string\('streaming\+delta'\)"):
        SparseAttention("streaming+delta")
    a = SparseAttention("streaming", window=8, sink=2)
    with pytest.raises(TypeError, match="cost: nq must be an int"):
        a.cost(10.5)
    huge = SparseAttention("streaming", window=2**70, sink=2**65)  # as good as dense, no overflow
    assert huge.cost(1000) == SparseAttention("dense").cost(1000)
    q, k, v = qkv(Nq=40)
    assert torch.allclose(huge(q, k, v), SparseAttention("dense")(q, k, v))
    np = pytest.importorskip("numpy")
    b = SparseAttention("streaming", corrector=Delta(gamma=np.int64(16)), window=np.int32(8), sink=np.int64(2))
    assert b.corrector.gamma == 16 and type(b.corrector.gamma) is int and str(b) == str(
        SparseAttention("streaming", corrector=Delta(gamma=16), window=8, sink=2))
    out = b(q, k, v, q_offset=np.int64(0))
    assert torch.allclose(out, SparseAttention.from_string(str(b))(q, k, v, q_offset=0))
    assert b.cost(np.int64(40)) == b.cost(40)


@pytest.mark.parametrize("interp", ["repeat", "linear"])
def test_a_non_finite_anchor_does_not_spread(interp):
    """NaN in one anchor row: dense gives one NaN row, and so does Δ (its block keeps the sparse rows)."""
    q, k, v = qkv(B=1, Hq=2, Hkv=1, Nq=400, D=16)
    q[0, 0, 64] = float("nan")  # an anchor of gamma=64
    dense = SparseAttention("dense")(q, k, v)
    out = SparseAttention("streaming", corrector=f"delta(gamma=64,interpolation={interp})", window=16, sink=2)(q, k, v)
    sparse = SparseAttention("streaming", window=16, sink=2)(q, k, v)
    bad_dense = torch.isnan(dense).any(-1)
    bad = torch.isnan(out).any(-1)
    assert int(bad_dense.sum()) == 1 and torch.equal(bad, bad_dense)
    if interp == "repeat":  # the bad anchor's block keeps its uncorrected rows
        assert torch.allclose(out[0, 0, 65:128], sparse[0, 0, 65:128])
    else:  # its Δ counts as zero; the next anchor's Δ still reaches the block's later rows
        d_next = out[0, 0, 128] - sparse[0, 0, 128]
        w = (torch.arange(65, 128) - 64).float()[:, None] / 64
        assert torch.allclose(out[0, 0, 65:128], sparse[0, 0, 65:128] + w * d_next, atol=1e-5)
    assert not torch.allclose(out[0, 1, 65:128], sparse[0, 1, 65:128])  # the other head is corrected as usual
