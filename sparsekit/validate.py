"""Every input check, before any kernel runs. Errors name the argument and what was expected."""

from __future__ import annotations

import numbers
import warnings

import torch

__all__ = ["SUPPORTED_DTYPES", "LAYOUTS", "check_qkv", "check_qk", "check_int_option", "check_lengths", "as_int",
           "to_bhnd"]

SUPPORTED_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)
LAYOUTS = ("BHND", "BNHD")


def _shape(t: torch.Tensor) -> str:
    return "[" + ", ".join(str(s) for s in t.shape) + "]"


def as_int(owner: str, name: str, value, *, allow_none: bool = False):
    """``value`` as a Python int (numpy and torch integer scalars accepted), or a clear TypeError."""
    if value is None and allow_none:
        return None
    if isinstance(value, torch.Tensor) and value.dim() == 0 and not value.dtype.is_floating_point \
            and value.dtype != torch.bool:
        return int(value)
    if isinstance(value, bool) or not isinstance(value, numbers.Integral):
        expected = "an int or None" if allow_none else "an int"
        raise TypeError(f"{owner}: {name} must be {expected}, got {value!r} ({type(value).__name__})")
    return int(value)


def check_int_option(owner: str, name: str, value, minimum: int, allow_none: bool = False, maximum=None):
    """Return ``value`` as an int >= minimum (and <= maximum), or None when allowed; else a clear error."""
    value = as_int(owner, name, value, allow_none=allow_none)
    if value is None:
        return None
    if value < minimum:
        raise ValueError(f"{owner}: {name} must be >= {minimum}, got {value}")
    if maximum is not None and value > maximum:
        raise ValueError(f"{owner}: {name} must be <= {maximum}, got {value}")
    return value


# options that are lengths in tokens: anything past this is meaningless and overflows int64 arithmetic
MAX_TOKENS = 1 << 40


def check_lengths(nq, nk=None, q_offset=None):
    """``(nq, nk, q_offset)`` for a cost query, with the defaults ``nk = nq`` and ``q_offset = nk - nq``."""
    nq = check_int_option("cost", "nq", nq, 1)
    nk = nq if nk is None else check_int_option("cost", "nk", nk, 1)
    q_offset = nk - nq if q_offset is None else check_int_option("cost", "q_offset", q_offset, 0)
    if q_offset + nq > nk:
        raise ValueError(f"cost: need q_offset + nq <= nk; got q_offset={q_offset}, nq={nq}, nk={nk}")
    return nq, nk, q_offset


def to_bhnd(t: torch.Tensor, layout: str) -> torch.Tensor:
    """A ``[B, N, H, D]`` tensor as a ``[B, H, N, D]`` view (``layout="BNHD"``), else unchanged."""
    return t.transpose(1, 2) if layout == "BNHD" else t


def _check_layout(layout):
    if layout is None:
        return "BHND", False
    if layout not in LAYOUTS:
        raise ValueError(f"layout must be 'BHND' (q [B, H, N, D]) or 'BNHD' (q [B, N, H, D]), got {layout!r}")
    return layout, True


def check_qk(q, k, *, q_offset=None, scale=None, layout=None, v=None):
    """Validate q, k (and v) of one call; return ``(q, k, v, q_offset, scale)`` in the ``[B, H, N, D]`` layout.

    Parameters
    ----------
    q : (batch, q_heads, q_len, head_dim), or (batch, q_len, q_heads, head_dim) with ``layout="BNHD"``
    k, v : (batch, kv_heads, kv_len, head_dim) likewise, ``q_heads % kv_heads == 0``
    q_offset : int, optional
        Absolute position of query row 0; default ``kv_len - q_len`` (bottom-right causal).
    scale : float, optional
        Softmax scale; default ``head_dim ** -0.5``.
    layout : "BHND" (default) or "BNHD" (transformers' and FlashInfer's order)
    """
    layout, explicit = _check_layout(layout)
    named = [("q", q), ("k", k)] + ([("v", v)] if v is not None else [])
    for name, t in named:
        if not isinstance(t, torch.Tensor):
            raise TypeError(f"{name} must be a torch.Tensor of shape [B, H, N, D], got {type(t).__name__}")
        if t.dim() != 4:
            raise ValueError(f"{name} must have 4 dimensions [B, H, N, D], got shape {_shape(t)}")
        if t.dtype not in SUPPORTED_DTYPES:
            raise TypeError(f"{name} has dtype {t.dtype}; supported: float16, bfloat16, float32, float64")
        if t.numel() == 0:
            raise ValueError(f"{name} must be non-empty [B, H, N, D], got shape {_shape(t)}")
    if v is not None and k.shape != v.shape:
        raise ValueError(f"k and v must have the same shape, got k {_shape(k)} and v {_shape(v)}")
    if not (q.dtype == k.dtype and (v is None or v.dtype == q.dtype)):
        raise TypeError(f"q, k, v must share one dtype, got q {q.dtype}, k {k.dtype}" +
                        (f", v {v.dtype}" if v is not None else ""))
    if not (q.device == k.device and (v is None or v.device == q.device)):
        raise ValueError(f"q, k, v must be on one device, got q {q.device}, k {k.device}" +
                         (f", v {v.device}" if v is not None else ""))
    if not explicit and 1 < q.shape[2] < q.shape[1] and k.shape[1] > k.shape[2]:
        warnings.warn(
            f"q {_shape(q)} and k {_shape(k)} have more heads than rows in the default [B, H, N, D] "
            "layout; if it is [B, N, H, D], pass layout='BNHD' (pass layout='BHND' to silence this warning)",
            UserWarning, stacklevel=3,
        )
    q, k = to_bhnd(q, layout), to_bhnd(k, layout)
    v = to_bhnd(v, layout) if v is not None else None
    B, Hq, Nq, D = q.shape
    Bk, Hkv, Nk, Dk = k.shape
    if Bk != B:
        raise ValueError(f"batch size differs: q {_shape(q)} has B={B}, k {_shape(k)} has B={Bk}")
    if Dk != D:
        raise ValueError(f"head_dim differs: q {_shape(q)} has D={D}, k {_shape(k)} has D={Dk}")
    if Hq % Hkv != 0:
        raise ValueError(f"q heads ({Hq}) must be a multiple of k/v heads ({Hkv}) for grouped-query attention")
    if q_offset is None:
        q_offset = Nk - Nq
        if q_offset < 0:
            raise ValueError(
                f"q has more rows ({Nq}) than k has keys ({Nk}); causal attention needs q_len <= kv_len"
            )
    else:
        q_offset = as_int("attention", "q_offset", q_offset)
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
        if isinstance(scale, bool) or not isinstance(scale, numbers.Real):
            raise TypeError(f"scale must be a float or None, got {type(scale).__name__}")
        scale = float(scale)
        if not scale > 0 or scale != scale or scale == float("inf"):
            raise ValueError(f"scale must be a finite positive float, got {scale}")
    return q, k, v, int(q_offset), float(scale)


def check_qkv(q, k, v, *, q_offset=None, scale=None, layout=None):
    """:func:`check_qk` with v required."""
    if v is None:
        raise TypeError("v must be a torch.Tensor of shape [B, H, N, D], got NoneType")
    return check_qk(q, k, q_offset=q_offset, scale=scale, layout=layout, v=v)
