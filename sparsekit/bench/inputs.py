"""Benchmark inputs: i.i.d. random, and structured synthetic q/k/v that behave like real attention.

On i.i.d. random inputs every key scores about the same, so a data-dependent backend (HiP's top-k,
vertical-slash's estimation) keeps almost every key and its speed means nothing. The structured
generator gives attention the shapes real heads have:

* **topics**: keys come in segments (64-1024 tokens) that share a topic direction; queries come in
  spans of 128 rows that ask either about their own segment's topic or about an earlier segment's
  (retrieval at a distance), so the keys a query needs form a few blocks far back;
* **locality**: a component shared by a head's queries and keys, rotated by RoPE with frequencies
  from 1/256 to 1/65536 rad/token: ``q_i . k_j`` then peaks near the diagonal and decays with distance
  (the slash / local structure of real heads); the topic part is rotated too (Llama's RoPE,
  theta 500000), whose low frequencies keep far matches alive;
* **needles**: about 1 key in 200 carries a strong direction every query of its head likes (the
  vertical lines of vertical-slash);
* **a sink**: the first 4 keys carry a direction every query likes.

``structured_qkv(N, ...)`` builds it chunk by chunk in float32 and stores it in ``dtype`` (1M
tokens at 32 heads fit on one GPU). Deterministic for a seed on a given device.
"""

from __future__ import annotations

import math

import torch

__all__ = ["random_qkv", "structured_qkv", "INPUTS", "make_inputs"]


def random_qkv(n, *, batch=1, q_heads=32, kv_heads=8, head_dim=128, dtype=torch.bfloat16, device="cuda", seed=0):
    """i.i.d. standard normal q ``[B, Hq, n, D]``, k/v ``[B, Hkv, n, D]``."""
    g = torch.Generator(device=device).manual_seed(seed)
    q = torch.randn(batch, q_heads, n, head_dim, device=device, dtype=dtype, generator=g)
    k = torch.randn(batch, kv_heads, n, head_dim, device=device, dtype=dtype, generator=g)
    v = torch.randn(batch, kv_heads, n, head_dim, device=device, dtype=dtype, generator=g)
    return q, k, v


def _rope(x, pos, theta=500000.0, inv=None):
    D = x.shape[-1]
    if inv is None:
        inv = theta ** (-torch.arange(0, D, 2, device=x.device, dtype=torch.float32) / D)
    ang = pos[:, None].float() * inv[None, :]
    cos, sin = ang.cos(), ang.sin()
    x1, x2 = x[..., : D // 2], x[..., D // 2:]
    return torch.cat([x1 * cos - x2 * sin, x1 * sin + x2 * cos], dim=-1)


def structured_qkv(n, *, batch=1, q_heads=32, kv_heads=8, head_dim=128, dtype=torch.bfloat16, device="cuda",
                   seed=0, chunk=1 << 16):
    """Structured synthetic q ``[B, Hq, n, D]``, k/v ``[B, Hkv, n, D]`` (see the module docstring)."""
    if head_dim < 16 or head_dim % 8:
        raise ValueError(f"structured_qkv: head_dim must be a multiple of 8 and >= 16, got {head_dim}")
    if q_heads % kv_heads:
        raise ValueError(f"structured_qkv: q_heads ({q_heads}) must be a multiple of kv_heads ({kv_heads})")
    dev = torch.device(device)
    G = q_heads // kv_heads
    Dl = head_dim // 4  # locality part (even), RoPE with log-spaced frequencies
    Dl -= Dl % 2
    Dr = head_dim // 2  # topic part (even), Llama's RoPE
    Dr -= Dr % 2
    Dn = head_dim - Dl - Dr  # needle / sink part
    g = torch.Generator(device=dev).manual_seed(seed)
    gc = torch.Generator().manual_seed(seed)
    n_topics = 256
    topics = torch.randn(batch, kv_heads, n_topics, Dr, device=dev, generator=g)
    topics = topics / topics.norm(dim=-1, keepdim=True) * math.sqrt(Dr)
    seg_len = torch.randint(64, 1024, (n // 64 + 2,), generator=gc)
    seg_of = torch.repeat_interleave(torch.arange(len(seg_len)), seg_len)[:n].to(dev)
    topic_of_seg = torch.randint(0, n_topics, (batch, len(seg_len)), device=dev, generator=g)
    span = torch.arange(n, device=dev) // 128
    n_span = int(span[-1]) + 1
    u_back = torch.rand(batch, n_span, device=dev, generator=g)[:, span]
    earlier = (torch.rand(batch, n_span, device=dev, generator=g) < 0.5)[:, span]
    needle_dir = torch.nn.functional.normalize(torch.randn(batch, kv_heads, Dn, device=dev, generator=g), dim=-1)
    sink_dir = torch.nn.functional.normalize(torch.randn(batch, kv_heads, Dn, device=dev, generator=g), dim=-1)
    needle = torch.rand(batch, n, device=dev, generator=g) < 0.005
    local = torch.randn(batch, kv_heads, Dl, device=dev, generator=g) * 2.0  # shared by a head's q and k
    inv_local = torch.logspace(math.log10(1 / 256), math.log10(1 / 65536), Dl // 2, device=dev)
    q = torch.empty(batch, q_heads, n, head_dim, device=dev, dtype=dtype)
    k = torch.empty(batch, kv_heads, n, head_dim, device=dev, dtype=dtype)
    bidx = torch.arange(batch, device=dev)[:, None, None]
    hidx = torch.arange(kv_heads, device=dev)[None, :, None]
    for s0 in range(0, n, chunk):
        s1 = min(n, s0 + chunk)
        m = s1 - s0
        pos = torch.arange(s0, s1, device=dev)
        z = topic_of_seg[:, seg_of[s0:s1]]  # [B, m] topic of each key's segment
        back = (u_back[:, s0:s1] * (seg_of[s0:s1].float() + 1)).long().clamp(max=len(seg_len) - 1)
        zq = torch.where(earlier[:, s0:s1], topic_of_seg.gather(1, back), z)  # [B, m]
        k_top = 0.8 * topics[bidx, hidx, z[:, None, :]] + 0.5 * torch.randn(batch, kv_heads, m, Dr, device=dev, generator=g)
        k_nee = 0.5 * torch.randn(batch, kv_heads, m, Dn, device=dev, generator=g)
        k_nee += 6.0 * needle[:, None, s0:s1, None].float() * needle_dir[:, :, None, :]
        if s0 == 0:
            k_nee[:, :, :4] += 6.0 * sink_dir[:, :, None, :]
        k_loc = local[:, :, None, :] + 0.3 * torch.randn(batch, kv_heads, m, Dl, device=dev, generator=g)
        k[:, :, s0:s1] = torch.cat([_rope(k_loc, pos, inv=inv_local), _rope(k_top, pos), k_nee], -1).to(dtype)
        q_top = 0.8 * topics[bidx, hidx, zq[:, None, :]].repeat_interleave(G, 1)
        q_top = q_top + 0.5 * torch.randn(batch, q_heads, m, Dr, device=dev, generator=g)
        q_nee = (1.5 * needle_dir + 1.0 * sink_dir).repeat_interleave(G, 1)[:, :, None, :]
        q_nee = q_nee + 0.5 * torch.randn(batch, q_heads, m, Dn, device=dev, generator=g)
        q_loc = local.repeat_interleave(G, 1)[:, :, None, :] + 0.3 * torch.randn(batch, q_heads, m, Dl, device=dev,
                                                                                   generator=g)
        q[:, :, s0:s1] = torch.cat([_rope(q_loc, pos, inv=inv_local), _rope(q_top, pos), q_nee], -1).to(dtype)
    v = torch.randn(batch, kv_heads, n, head_dim, device=dev, generator=g).to(dtype)
    return q, k, v


INPUTS = {"random": random_qkv, "structured": structured_qkv}


def make_inputs(kind: str, n: int, **kw):
    """``random`` or ``structured`` q, k, v (keyword arguments as :func:`random_qkv`)."""
    if kind not in INPUTS:
        raise ValueError(f"inputs must be one of {sorted(INPUTS)}, got {kind!r}")
    return INPUTS[kind](n, **kw)
