"""``fa3_rows``' request arrays, checked on the CPU by running them through a float64 simulation of the
ragged fa3 launch (non-causal, one key range per request) plus the per-row remainder, against dense
causal attention of every gathered row. The GPU test ``tests/test_gpu.py`` runs the kernels themselves."""

import pytest
import torch

from sparsekit.kernels.fa3 import ragged_requests, rows_per_request


def _attend(q, k, v, scale):
    """q [n, D], k/v [m, D] float64 -> (out [n, D], lse [n]); m = 0 gives lse -inf, out 0."""
    if k.shape[0] == 0:
        return torch.zeros_like(q), torch.full(q.shape[:1], float("-inf"), dtype=q.dtype)
    s = q @ k.T * scale
    lse = torch.logsumexp(s, -1)
    return torch.softmax(s, -1) @ v, lse


def _simulate(q_rows, k, v, positions, scale):
    """What fa3_rows computes from ``ragged_requests``: packed rows, request ranges, remainders, merge."""
    B, Hq, R, D = q_rows.shape
    Hkv, Nk = k.shape[1], k.shape[2]
    G = Hq // Hkv
    ix = ragged_requests(positions, group=G)
    H = B * Hkv
    qp = q_rows.reshape(B, Hkv, G, R, D).permute(3, 2, 0, 1, 4).reshape(R * G, H, D)
    kh = k.reshape(H, Nk, D)
    vh = v.reshape(H, Nk, D)
    qo = ix["qo_indptr"].tolist()
    out = torch.zeros(R * G, H, D, dtype=torch.float64)
    lse = torch.zeros(R * G, H, dtype=torch.float64)
    pos_p = positions.repeat_interleave(G)
    lo_p = ix["lo"].repeat_interleave(G)
    for i in range(len(qo) - 1):
        a, b = qo[i], qo[i + 1]
        k0, n = int(ix["kv_start"][i]), int(ix["kv_len"][i])
        assert b - a <= 128, "a request exceeds one FA3 tile"
        for h in range(H):
            o_m, l_m = _attend(qp[a:b, h], kh[h, k0:k0 + n], vh[h, k0:k0 + n], scale)
            for r in range(a, b):  # the remainder (lo, pos] of each packed row
                keys = torch.arange(int(lo_p[r]), int(pos_p[r]) + 1)
                o_t, l_t = _attend(qp[r:r + 1, h], kh[h, keys], vh[h, keys], scale)
                m = torch.logaddexp(l_m[r - a], l_t[0])
                out[r, h] = torch.exp(l_m[r - a] - m) * o_m[r - a] + torch.exp(l_t[0] - m) * o_t[0]
                lse[r, h] = m
    o = out.view(R, G, B, Hkv, D).permute(2, 3, 1, 0, 4).reshape(B, Hq, R, D)
    lo = lse.view(R, G, B, Hkv).permute(2, 3, 1, 0).reshape(B, Hq, R)
    return o, lo


@pytest.mark.parametrize("B,Hq,Hkv", [(1, 8, 2), (2, 4, 4), (1, 6, 1)])
@pytest.mark.parametrize("kind", ["anchors+tail", "scattered", "one row"])
def test_ragged_requests_compute_each_rows_causal_prefix(B, Hq, Hkv, kind):
    g = torch.Generator().manual_seed(B * 100 + Hq * 10 + Hkv)
    N, D = 300, 8
    if kind == "anchors+tail":
        pos = torch.unique(torch.cat([torch.arange(0, N - 40, 7), torch.arange(N - 40, N)]))
    elif kind == "scattered":
        pos = torch.sort(torch.randperm(N, generator=g)[:37]).values
    else:
        pos = torch.tensor([N - 1])
    q = torch.randn(B, Hq, pos.numel(), D, generator=g, dtype=torch.float64)
    k = torch.randn(B, Hkv, N, D, generator=g, dtype=torch.float64)
    v = torch.randn(B, Hkv, N, D, generator=g, dtype=torch.float64)
    got_o, got_l = _simulate(q, k, v, pos, 0.3)
    G = Hq // Hkv
    for r, p in enumerate(pos.tolist()):
        for b in range(B):
            for h in range(Hq):
                o, l = _attend(q[b, h, r:r + 1], k[b, h // G, :p + 1], v[b, h // G, :p + 1], 0.3)
                torch.testing.assert_close(got_o[b, h, r], o[0], rtol=1e-10, atol=1e-10)
                torch.testing.assert_close(got_l[b, h, r], l[0], rtol=1e-10, atol=1e-10)


def test_requests_fill_one_tile_with_the_packed_heads():
    """128 packed rows per request: 32 gathered rows of a 4-head group, 128 rows without GQA,
    and the remainder of a request spans fewer than its rows x their spacing."""
    assert [rows_per_request(g) for g in (1, 4, 8, 128, 256)] == [128, 32, 16, 1, 1]
    pos = torch.arange(0, 64 * 100, 64)
    ix = ragged_requests(pos, group=4)
    assert torch.equal(ix["qo_indptr"][:4], torch.tensor([0, 128, 256, 384], dtype=torch.int32))
    assert int((pos - (ix["lo"] - 1)).max()) == 31 * 64
    assert bool((ix["kv_start"] == 0).all()) and torch.equal(ix["kv_len"].long(), ix["p0"] + 1)
