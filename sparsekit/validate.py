"""Every input check, before any kernel runs. Errors name the argument and what was expected."""

from __future__ import annotations

import torch

__all__ = ["SUPPORTED_DTYPES", "check_qkv", "check_int_option"]

SUPPORTED_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)


def _shape(t: torch.Tensor) -> str:
    return "[" + ", ".join(str(s) for s in t.shape) + "]"


def check_qkv(q, k, v, *, q_offset=None, scale=None) -> tuple[int, float]:
    """Validate one attention call and return ``(q_offset, scale)`` with defaults filled in.

    Parameters
    ----------
    q : (batch, q_heads, q_len, head_dim)
    k, v : (batch, kv_heads, kv_len, head_dim), ``q_heads % kv_heads == 0``
    q_offset : int, optional
        Absolute position of query row 0; default ``kv_len - q_len`` (bottom-right causal).
    scale : float, optional
        Softmax scale; default ``head_dim ** -0.5``.
    """
    for name, t in (("q", q), ("k", k), ("v", v)):
        if not isinstance(t, torch.Tensor):
            raise TypeError(f"{name} must be a torch.Tensor of shape [B, H, N, D], got {type(t).__name__}")
        if t.dim() != 4:
            raise ValueError(f"{name} must have 4 dimensions [B, H, N, D], got shape {_shape(t)}")
        if t.dtype not in SUPPORTED_DTYPES:
            raise TypeError(
                f"{name} has dtype {t.dtype}; supported: float16, bfloat16, float32, float64"
            )
    if k.shape != v.shape:
        raise ValueError(f"k and v must have the same shape, got k {_shape(k)} and v {_shape(v)}")
    if not (q.dtype == k.dtype == v.dtype):
        raise TypeError(f"q, k, v must share one dtype, got q {q.dtype}, k {k.dtype}, v {v.dtype}")
    if not (q.device == k.device == v.device):
        raise ValueError(f"q, k, v must be on one device, got q {q.device}, k {k.device}, v {v.device}")
    B, Hq, Nq, D = q.shape
    Bk, Hkv, Nk, Dk = k.shape
    if Bk != B:
        raise ValueError(f"batch size differs: q {_shape(q)} has B={B}, k {_shape(k)} has B={Bk}")
    if Dk != D:
        raise ValueError(f"head_dim differs: q {_shape(q)} has D={D}, k {_shape(k)} has D={Dk}")
    if Hkv < 1 or Hq % Hkv != 0:
        raise ValueError(
            f"q heads ({Hq}) must be a multiple of k/v heads ({Hkv}) for grouped-query attention"
        )
    if Nq < 1 or D < 1 or B < 1:
        raise ValueError(f"q must be non-empty [B, H, N, D], got shape {_shape(q)}")
    if q_offset is None:
        q_offset = Nk - Nq
        if q_offset < 0:
            raise ValueError(
                f"q has more rows ({Nq}) than k has keys ({Nk}); causal attention needs q_len <= kv_len"
            )
    else:
        if isinstance(q_offset, bool) or not isinstance(q_offset, int):
            raise TypeError(f"q_offset must be an int or None, got {type(q_offset).__name__}")
        if q_offset < 0:
            raise ValueError(f"q_offset must be >= 0, got {q_offset}")
        if q_offset + Nq > Nk:
            raise ValueError(
                f"q_offset + q_len must be <= kv_len: {q_offset} + {Nq} > {Nk} "
                "(query row i sits at absolute position q_offset + i and needs keys 0..q_offset + i)"
            )
    if scale is None:
        scale = D ** -0.5
    else:
        if isinstance(scale, bool) or not isinstance(scale, (int, float)):
            raise TypeError(f"scale must be a float or None, got {type(scale).__name__}")
        scale = float(scale)
        if not scale > 0 or scale != scale or scale == float("inf"):
            raise ValueError(f"scale must be a finite positive float, got {scale}")
    return int(q_offset), float(scale)


def check_int_option(owner: str, name: str, value, minimum: int, allow_none: bool = False) -> None:
    """Raise a clear error unless ``value`` is an int >= minimum (or None when allowed)."""
    if value is None and allow_none:
        return
    if isinstance(value, bool) or not isinstance(value, int):
        expected = "an int or None" if allow_none else "an int"
        raise TypeError(f"{owner}: {name} must be {expected}, got {value!r}")
    if value < minimum:
        raise ValueError(f"{owner}: {name} must be >= {minimum}, got {value}")
