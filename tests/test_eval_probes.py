"""Fidelity and locality statistics on synthetic q/k/v and Δ with known answers (no transformers)."""

import pytest
import torch


def test_fidelity_effective_rows_reconstruct_outputs():
    from sparsekit import SparseAttention
    from sparsekit.eval.fidelity import effective_rows, rankdata, spearman

    g = torch.Generator().manual_seed(0)
    N = 300
    q, k, v = (torch.randn(1, h, N, 8, generator=g) for h in (4, 2, 2))
    rows = torch.arange(100, 140)
    for spec in ["streaming(window=16,sink=2)", "streaming(window=16,sink=2)+recompute(gamma=8)",
                 "streaming(window=16,sink=2)+tailonly(gamma=8)", "streaming(window=16,sink=2)+delta(gamma=8)",
                 "streaming(window=16,sink=2)+delta(gamma=8,interpolation=linear)"]:
        a = SparseAttention.from_string(spec)
        out = a(q, k, v, scale=0.5)[:, :, rows].double()
        A = effective_rows(a, q, k, scale=0.5, rows=rows)
        torch.testing.assert_close(A @ v.double().repeat_interleave(2, 1), out, rtol=1e-5, atol=1e-5)
    assert rankdata(torch.tensor([[3.0, 1.0, 1.0, 2.0, 0.0]])).tolist() == [[4.0, 1.5, 1.5, 3.0, 0.0]]
    x = torch.randn(2, 30, generator=g, dtype=torch.float64)
    assert torch.allclose(spearman(x, x), torch.ones(2, dtype=torch.float64))
    assert torch.allclose(spearman(x, -x), -torch.ones(2, dtype=torch.float64))




def test_delta_locality_statistics():
    from sparsekit.eval.locality import delta_locality

    g = torch.Generator().manual_seed(0)
    B, H, nb, gamma, D = 1, 2, 6, 8, 16
    # Δ constant within each block: repeat removes all the error
    blocks = torch.randn(B, H, nb, 1, D, generator=g).expand(B, H, nb, gamma, D).reshape(B, H, nb * gamma, D)
    st = delta_locality(blocks, gamma)
    assert st["pooled_ratio_repeat"] < 1e-20 and st["pooled_helped_repeat"] == 1.0 and st["pooled_cos"] > 1 - 1e-6
    # Δ varying linearly between anchors: linear interpolation is exact except the last block (held constant)
    a = torch.randn(B, H, nb + 1, 1, D, generator=g)
    beta = torch.arange(gamma, dtype=a.dtype)[:, None] / gamma
    ramp = ((1 - beta) * a[:, :, :-1] + beta * a[:, :, 1:]).reshape(B, H, nb * gamma, D)
    st = delta_locality(ramp, gamma)
    assert max(st["ratio_linear"]) < 1.0 and st["pooled_ratio_linear"] < st["pooled_ratio_repeat"]
    a[:, :, nb] = a[:, :, nb - 1]  # last block constant, as linear holds it: then linear is exact everywhere
    exact = ((1 - beta) * a[:, :, :-1] + beta * a[:, :, 1:]).reshape(B, H, nb * gamma, D)
    assert delta_locality(exact, gamma)["pooled_ratio_linear"] < 1e-12
    # i.i.d. noise: the anchor says nothing about the next row, repeat doubles the error energy
    noise = torch.randn(4, 8, 64 * 16, 64, generator=g)
    st = delta_locality(noise, 64)
    assert abs(st["pooled_ratio_repeat"] - 2.0) < 0.05 and st["ratio_repeat"][0] == 0.0
    assert abs(st["pooled_cos"]) < 0.02 and abs(st["cos"][0] - 1.0) < 1e-6
    with pytest.raises(ValueError, match="multiple of gamma"):
        delta_locality(noise[:, :, :100], 64)


