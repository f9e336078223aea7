"""meancorr beyond the property matrix: where the mean correction is exact, its options, its spec, its
place in eval (the backend x meancorr matrix against ref64 is in tests/test_properties.py, its pair count
too; the Triton kernel in tests/test_kernels_interpret.py and tests/test_gpu.py)."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given, strategies as st

import sparsekit
from sparsekit import SparseAttention

from ref64 import attention64, causal_mask


def _constant_per_block(x, M, g):
    """x [B, H, N, D] with every block of M keys replaced by one random key (the last block may be short)."""
    B, H, N, D = x.shape
    nb = -(-N // M)
    one = torch.randn(B, H, nb, D, generator=g, dtype=x.dtype)
    return one.repeat_interleave(M, dim=2)[:, :, :N]


@given(data=st.data())
def test_constant_keys_per_block_make_meancorr_exact(data):
    """Keys constant within every key block: a skipped block's summary len * exp(q . kbar) * vbar is its
    exact contribution, so on a block pattern whose listed blocks are whole (the plug-in's strided pattern,
    the row's own block always listed) meancorr reproduces dense attention on every row, for any v (and
    with v constant per block too); the same backend without the correction does not."""
    B = data.draw(st.integers(1, 2), label="B")
    Hkv = data.draw(st.integers(1, 2), label="Hkv")
    G = data.draw(st.sampled_from([1, 2, 4]), label="G")
    bk = data.draw(st.sampled_from([4, 8, 16]), label="block_k")
    bq = bk * data.draw(st.sampled_from([1, 2, 4]), label="block_q / block_k")
    Nq = data.draw(st.integers(1, 300), label="Nq")
    off = data.draw(st.one_of(st.just(0), st.integers(1, 60)), label="q_offset")
    stride = data.draw(st.integers(2, 9), label="stride")
    local = data.draw(st.integers(1, 3), label="local")
    gamma = data.draw(st.integers(1, 80), label="gamma")
    tail = data.draw(st.one_of(st.none(), st.integers(0, 40)), label="tail")
    const_v = data.draw(st.booleans(), label="v constant per block")
    g = torch.Generator().manual_seed(data.draw(st.integers(0, 2**31 - 1), label="seed"))
    Nk = Nq + off
    D = 16
    q = torch.randn(B, Hkv * G, Nq, D, generator=g) * 2
    k = _constant_per_block(torch.empty(B, Hkv, Nk, D), bk, g)
    v = _constant_per_block(torch.empty(B, Hkv, Nk, D), bk, g) if const_v else torch.randn(B, Hkv, Nk, D, generator=g)
    backend = dict(block_q=bq, block_k=bk, local=local, stride=stride)
    attn = SparseAttention("strided", corrector={"name": "meancorr", "gamma": gamma, "tail": tail}, **backend)
    out, lse = attn(q, k, v, q_offset=off, return_lse=True)
    dense, dense_lse = attention64(q, k, v, causal_mask(Nq, Nk, off), D**-0.5)
    err = (out.double() - dense).abs().max().item()
    assert err <= 2e-5 * max(1.0, dense.abs().max().item()), f"{attn}: max err {err:.3e} vs dense"
    assert (lse.double() - dense_lse).abs().max().item() <= 1e-5 + 2e-6 * dense_lse.abs().max().item()
    # a meaningful check: the plain backend misses the skipped blocks wherever some row skips one
    plain = SparseAttention("strided", **backend)(q, k, v, q_offset=off)
    plan = attn.plan(q, k, q_offset=off)
    if plan.pattern is not None and attn.corrector.complement_pairs(plan.pattern) > 0:
        assert (plain.double() - dense).abs().max().item() > 1e-3


def test_meancorr_is_tailonly_plus_the_correction():
    """Tail rows and row 0 are tailonly's dense rows; a body row differs from tailonly only where a block
    was corrected; the plan's cost adds the (row, corrected block) pairs to tailonly's dense rows."""
    g = torch.Generator().manual_seed(0)
    q = torch.randn(2, 4, 300, 16, generator=g)
    k = torch.randn(2, 2, 310, 16, generator=g)
    v = torch.randn(2, 2, 310, 16, generator=g)
    be = "streaming(window=32,sink=8)"
    mc = SparseAttention.from_string(f"{be}+meancorr(gamma=16,block=8)")
    to = SparseAttention.from_string(f"{be}+tailonly(gamma=16)")
    a, b = mc(q, k, v), to(q, k, v)
    rows = mc.corrector.rows(300)
    assert rows.n_body == 300 - (300 % 16 + 128)
    assert torch.equal(a[:, :, rows.n_body:], b[:, :, rows.n_body:]) and torch.equal(a[:, :, 0], b[:, :, 0])
    # body rows whose band covers every fully visible block (p < sink + window, roughly) are not corrected
    assert torch.equal(a[:, :, 1:20], b[:, :, 1:20])
    assert (a[:, :, 100:rows.n_body] - b[:, :, 100:rows.n_body]).abs().amin(-1).gt(0).all()
    pm, pt = mc.plan(q, k).cost(), to.plan(q, k).cost()
    assert pm.backend_pairs == pt.backend_pairs
    assert pm.corrector_pairs == pt.corrector_pairs + mc.corrector.complement_pairs(mc.plan(q, k).pattern) > 0
    assert mc.cost(300, 310) == pm  # data-independent backend: the same without inputs


def test_meancorr_options_spec_and_flags():
    from sparsekit.correctors.meancorr import MeanCorr
    from sparsekit.correctors.tailonly import TailOnly

    c = MeanCorr(gamma=32, block=48)
    assert isinstance(c, TailOnly) and c.name == "meancorr"
    assert c.row_linear is False and c.control is False and TailOnly.control is True
    attn = SparseAttention.from_string("streaming(window=64,sink=4)+meancorr(gamma=64,block=32)")
    assert str(attn) == "streaming(window=64,sink=4)+meancorr(gamma=64,tail=None,block=32)"
    assert SparseAttention.from_dict(attn.to_dict()) == attn
    assert "meancorr" in sparsekit.available_correctors()
    for bad, msg in (({"block": 0}, "meancorr: block must be >= 1, got 0"),
                     ({"block": "x"}, "block"), ({"gamma": 0}, "meancorr: gamma must be >= 1"),
                     ({"tail": -1}, "meancorr: tail must be >= 0")):
        with pytest.raises((ValueError, TypeError), match=msg):
            MeanCorr(**bad)
    # the mean-block size: block_k by default; rounded up to a multiple of block_k with block lists only
    q, k = torch.zeros(1, 1, 100, 8), torch.zeros(1, 1, 100, 8)
    band = SparseAttention("streaming", window=8, sink=0).backend.pattern(q, k, scale=1.0, q_offset=0)
    lists = SparseAttention("strided", block_q=16, block_k=16).backend.pattern(q, k, scale=1.0, q_offset=0)
    assert MeanCorr().mean_block(band) == band.block_k and MeanCorr(block=5).mean_block(band) == 5
    assert MeanCorr().mean_block(lists) == 16 and MeanCorr(block=5).mean_block(lists) == 16
    assert MeanCorr(block=17).mean_block(lists) == 32 and MeanCorr(block=48).mean_block(lists) == 48


def test_meancorr_layouts_and_torch_path_on_cpu():
    """BNHD tensors give the same result; on CPU (no interpreter) the torch path runs, and says why."""
    g = torch.Generator().manual_seed(1)
    q = torch.randn(1, 4, 90, 16, generator=g)
    k = torch.randn(1, 2, 90, 16, generator=g)
    v = torch.randn(1, 2, 90, 16, generator=g)
    attn = SparseAttention.from_string("vertical_slash(vertical_size=6,slash_size=4,last_q=16,block_q=16,"
                                       "block_k=8,local=1)+meancorr(gamma=8,tail=3)")
    out, lse = attn(q, k, v, return_lse=True)
    o2, l2 = attn(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), layout="BNHD", return_lse=True)
    torch.testing.assert_close(o2.transpose(1, 2), out, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(l2, lse, rtol=1e-6, atol=1e-6)
    plan = attn.plan(q, k)
    which, why = attn.corrector.path(plan.pattern, sparsekit.AttentionResult(q, q[..., 0]), q, k)
    assert which == "torch" and why


def test_fidelity_probe_reads_meancorr_directly():
    """sparsekit eval's fidelity probe measures a non-row-linear corrector through its effective rows."""
    from sparsekit.eval.fidelity import effective_rows

    g = torch.Generator().manual_seed(0)
    N = 300
    q, k, v = (torch.randn(1, h, N, 8, generator=g) for h in (4, 2, 2))
    for spec in ("streaming(window=16,sink=2)+meancorr(gamma=8,block=8)",
                 "strided(block_q=16,block_k=8,local=1,stride=4)+meancorr(gamma=8)"):
        a = SparseAttention.from_string(spec)
        rows = torch.cat([torch.arange(0, 3), torch.arange(100, 140), torch.arange(N - 5, N)])
        out = a(q, k, v, scale=0.5)[:, :, rows].double()
        A = effective_rows(a, q, k, scale=0.5, rows=rows)
        assert A is not None
        torch.testing.assert_close(A.sum(-1), torch.ones_like(A.sum(-1)), rtol=1e-9, atol=1e-9)
        torch.testing.assert_close(A @ v.double().repeat_interleave(2, 1), out, rtol=1e-5, atol=1e-5)


def test_fidelity_probe_skips_other_nonlinear_correctors():
    """A non-row-linear corrector without effective rows is skipped (None), never a crash."""
    from dataclasses import dataclass
    from typing import ClassVar

    from sparsekit.correctors.tailonly import TailOnly
    from sparsekit.eval.fidelity import effective_rows

    @dataclass
    class Odd(TailOnly):
        name: ClassVar[str] = "odd_nonlinear"
        row_linear: ClassVar[bool] = False

    g = torch.Generator().manual_seed(0)
    q, k = torch.randn(1, 2, 64, 8, generator=g), torch.randn(1, 2, 64, 8, generator=g)
    a = SparseAttention("streaming", corrector=Odd(gamma=8), window=8, sink=0)
    assert effective_rows(a, q, k, scale=0.5, rows=torch.arange(10, 20)) is None


def test_report_says_when_rho_is_not_measured(tmp_path):
    import json

    from sparsekit.eval.report_extra import _fidelity_section

    none = dict(rho_mean=[None, None], rho_p10=[None, None], rho_median=[None, None], recon_err=[None, None])
    fid = dict(length=512, text="a.py", rows=[300, 363], capture_s=0.1, meta={}, layers=[1, 3],
               configs={"plain": dict(spec="streaming", cos_mean=[0.9, 0.8], cos_p10=[0.8, 0.7], cos_median=[0.9, 0.8],
                                      rho_mean=[0.5, 0.4], rho_p10=[0.4, 0.3], rho_median=[0.5, 0.4],
                                      recon_err=[1e-5, 1e-5]),
                        "odd": dict(spec="streaming+odd", cos_mean=[0.95, 0.85], cos_p10=[0.9, 0.8],
                                    cos_median=[0.95, 0.85], **none)})
    (tmp_path / "fidelity.json").write_text(json.dumps(fid))
    text = "\n".join(_fidelity_section(tmp_path))
    assert "| odd | 0.900 | 0.850 | nan | nan |" in text
    assert "not measured for `odd`: the corrector is not a fixed linear mix" in text and "`plain`" not in text
