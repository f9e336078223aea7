"""fa3 plans checked on the CPU: ``fa3_rows`` request arrays run through a float64 simulation of the
ragged fa3 launch (non-causal, one key range per request) plus the per-row remainder, against dense
causal attention of every gathered row; and the keys of the fused sink + window call, through fa3's masking rule.
The GPU test ``tests/test_gpu.py`` runs the kernels themselves."""

import pytest
import torch

from sparsekit.kernels.fa3 import ragged_requests, rows_per_request, sink_window_chunks, sink_window_keys


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


# ---------------------------------------------------------------- sink + window in one fa3 call
def _fa3_visible(keys: torch.Tensor, rows: int, window_left: int) -> list:
    """The key indices each row sees in fa3 single prefill over ``keys`` with ``causal=True`` and
    ``window_left`` (row i aligned bottom-right at ``i + len(keys) - rows``)."""
    n = keys.numel()
    out = []
    for i in range(rows):
        last = i + n - rows
        out.append(sorted(keys[max(0, last - window_left): last + 1].tolist()))
    return out


@pytest.mark.parametrize("window,sink", [(512, 64), (600, 1), (2048, 1024), (8, 3)])
def test_sink_window_keys_give_each_row_its_sinks_and_window(window, sink):
    for rows in sorted({1, 2, window // 2, window, window + 1}):
        for s in (sink + window - 1, sink + window + 37):
            keys = sink_window_keys(s, rows, window=window, sink=sink)
            assert keys.numel() == rows - 1 + sink + window
            for i, seen in enumerate(_fa3_visible(keys, rows, window + sink - 1)):
                p = s + i
                assert seen == list(range(sink)) + list(range(p - window + 1, p + 1)), (window, sink, rows, s, i)
    with pytest.raises(ValueError, match="out of range"):
        sink_window_keys(sink + window - 2, 4, window=window, sink=sink)  # the window would reach a sink
    with pytest.raises(ValueError, match="out of range"):
        sink_window_keys(sink + window, window + 2, window=window, sink=sink)


def test_sink_window_chunks_cover_the_rows_once_with_their_keys():
    for q_offset, r0, r1, window, sink in ((0, 3072, 3072 + 3 * 2048 + 5, 2048, 1024), (100, 600, 2000, 512, 64),
                                           (0, 40, 200, 20, 20)):
        seen = []
        for c0, c1, keys in sink_window_chunks(q_offset, r0, r1, window=window, sink=sink):
            assert c1 - c0 <= window
            assert torch.equal(keys, sink_window_keys(q_offset + c0, c1 - c0, window=window, sink=sink))
            seen.extend(range(c0, c1))
        assert seen == list(range(r0, r1))
