"""sparsekit as an attention implementation of Hugging Face transformers 5.x.

Needs the ``hf`` extra (``pip install "sparsekit-prefill[hf]"``). Nothing is registered or patched
when this module is imported: :func:`register` adds the name ``"sparsekit"`` to
transformers' ``AttentionInterface`` (the attention function) and
``AttentionMaskInterface`` (transformers' SDPA mask builder, without which the function
would receive no mask), and :func:`use` switches one model to it for the duration of a
``with`` block::

    import sparsekit.hf
    model = AutoModelForCausalLM.from_pretrained(path)           # any attention, e.g. sdpa
    with sparsekit.hf.use(model, "streaming(window=512,sink=64)+delta(gamma=64)", dense_layers=range(3)):
        out = model.generate(ids, max_new_tokens=16)
    # here the model is exactly as before

A model loaded with ``attn_implementation="sparsekit"`` (call :func:`register` first)
runs dense SDPA everywhere until a :func:`use` block gives its layers a spec.

Inside a block, per attention call of a layer with a spec:

* **prefill** (more than ``decode_rows`` new query rows, default 1): the layer's
  :class:`~sparsekit.SparseAttention` (backend + corrector) over the whole KV cache, with
  ``q_offset = kv_len - q_len``, so chunked prefill over a cache is exact bottom-right causal;
* **decode** (``q_len <= decode_rows``): dense attention over the whole KV cache (transformers' SDPA),
  as in the Δ paper;
* layers the model defines as sliding-window (Gemma 3's local layers) and layers with spec
  ``None`` run transformers' SDPA with the model's own mask.

Shapes: the function receives query ``[B, Hq, Nq, D]`` and key/value ``[B, Hkv, Nk, D]``
(GQA not repeated) and returns ``([B, Nq, Hq, D], None)``.
"""

from __future__ import annotations

import contextlib
import weakref
from dataclasses import dataclass, field
from typing import Any, Callable, Iterable, Mapping, Optional, Union

import torch

from ..attention import SparseAttention

__all__ = ["NAME", "register", "use", "attention_forward", "LayerState", "layer_state", "attention_modules", "SpecLike"]

NAME = "sparsekit"
SpecLike = Union[str, dict, SparseAttention, None]


def _transformers():
    try:
        import transformers  # noqa: F401
        from transformers import AttentionInterface
        from transformers.masking_utils import AttentionMaskInterface, sdpa_mask
        from transformers.integrations.sdpa_attention import sdpa_attention_forward
    except ImportError as e:
        raise ImportError(
            f"sparsekit's transformers integration needs the hf extra: `pip install \"sparsekit-prefill[hf]\"` ({e})"
        ) from e
    major = int(transformers.__version__.split(".")[0])
    if major < 5:
        raise ImportError(
            f"sparsekit's transformers integration needs transformers >= 5 (found {transformers.__version__}): "
            "`pip install \"sparsekit-prefill[hf]\"`"
        )
    return AttentionInterface, AttentionMaskInterface, sdpa_mask, sdpa_attention_forward


# ---------------------------------------------------------------------------------- state
@dataclass
class LayerState:
    """What one attention module does while a :func:`use` block is active.

    attn : SparseAttention or None
        None = dense SDPA for this layer.
    decode_rows : int
        Calls with at most this many query rows are dense (decode).
    capture : callable or None
        ``capture(layer_idx, q, k, v)`` called before attention (probes); tensors as received.
    calls : dict
        Counters ``{"sparse": n, "dense": n}`` of how the layer's calls were routed.
    pairs : dict
        Sums over the sparse calls of their plans' exact pair counts per (batch item, query head):
        ``{"backend": ..., "corrector": ..., "dense": ...}`` (dense = causal attention of the same
        rows), so ``(backend + corrector) / dense`` is the layer's density even for backends whose
        pattern depends on the data.
    """

    attn: Optional[SparseAttention]
    decode_rows: int = 1
    capture: Optional[Callable] = None
    calls: dict = field(default_factory=lambda: {"sparse": 0, "dense": 0})
    pairs: dict = field(default_factory=lambda: {"backend": 0.0, "corrector": 0.0, "dense": 0})


# module -> LayerState; weak so a deleted model takes its state with it
_STATE: "weakref.WeakKeyDictionary[torch.nn.Module, LayerState]" = weakref.WeakKeyDictionary()
# (weakref to the last mask checked, verdict): every layer of one forward gets the same mask object
_LAST_MASK: list = [None, False]


def layer_state(module) -> Optional[LayerState]:
    """The active :class:`LayerState` of an attention module, or None."""
    return _STATE.get(module)


def _is_plain_causal(mask: torch.Tensor, nq: int, nk: int) -> bool:
    """True when ``mask`` is exactly bottom-right causal (every batch item, no padding)."""
    last = _LAST_MASK[0]() if _LAST_MASK[0] is not None else None
    if last is mask:
        return _LAST_MASK[1]
    keep = mask if mask.dtype == torch.bool else (mask == 0)  # additive float mask: 0 keeps
    pq = (nk - nq) + torch.arange(nq, device=mask.device)
    want = torch.arange(nk, device=mask.device)[None, :] <= pq[:, None]
    ok = keep.shape[-2:] == want.shape and torch.equal(keep, want.expand_as(keep))
    _LAST_MASK[0], _LAST_MASK[1] = weakref.ref(mask), ok
    return ok


# ---------------------------------------------------------------------------------- the function
def attention_forward(
    module: torch.nn.Module,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attention_mask: Optional[torch.Tensor],
    dropout: float = 0.0,
    scaling: Optional[float] = None,
    **kwargs,
):
    """transformers attention function: sparse prefill, dense decode, SDPA otherwise.

    query (B, Hq, Nq, D); key, value (B, Hkv, Nk, D) -> ((B, Nq, Hq, D), None).
    """
    _, _, _, sdpa_attention_forward = _transformers()
    state = _STATE.get(module)
    if state is not None and state.capture is not None:
        state.capture(getattr(module, "layer_idx", None), query, key, value)
    nq, nk = query.shape[2], key.shape[2]
    sliding = kwargs.get("sliding_window") or getattr(module, "sliding_window", None)
    if state is None or state.attn is None or sliding or nq <= state.decode_rows:
        if state is not None:
            state.calls["dense"] += 1
        return sdpa_attention_forward(module, query, key, value, attention_mask, dropout=dropout, scaling=scaling, **kwargs)
    if kwargs.get("softcap") is not None:
        raise ValueError("sparsekit attention does not support attention logit softcapping (softcap)")
    if dropout and module.training:
        raise ValueError("sparsekit attention is for inference: attention dropout must be 0 (call model.eval())")
    if not getattr(module, "is_causal", True):
        raise ValueError("sparsekit sparse prefill is causal; this attention module is not (is_causal=False)")
    if attention_mask is not None and not _is_plain_causal(attention_mask, nq, nk):
        raise ValueError(
            "sparsekit sparse prefill needs a plain causal mask (no padding, no packing); "
            "run sequences one at a time or with equal lengths and no attention_mask"
        )
    state.calls["sparse"] += 1
    plan = state.attn.plan(query, key, scale=scaling, q_offset=nk - nq, layout="BHND")
    out = state.attn.run(plan, query, key, value, layout="BHND").out  # [B, Hq, Nq, D]
    cost = plan.cost()
    state.pairs["backend"] += float(cost.backend_pairs)
    state.pairs["corrector"] += float(cost.corrector_pairs)
    state.pairs["dense"] += cost.dense_pairs
    return out.transpose(1, 2).contiguous(), None


def register(name: str = NAME) -> str:
    """Register sparsekit's attention function and transformers' SDPA mask builder under ``name``.

    Idempotent. Call before ``from_pretrained(..., attn_implementation=name)``; :func:`use`
    calls it itself. Returns ``name``.
    """
    AttentionInterface, AttentionMaskInterface, sdpa_mask, _ = _transformers()
    AttentionInterface.register(name, attention_forward)
    AttentionMaskInterface.register(name, sdpa_mask)
    return name


# ---------------------------------------------------------------------------------- use()
def attention_modules(model) -> list:
    """``[(layer_idx, module)]`` of the model's attention modules, in layer order."""
    found = []
    for m in model.modules():
        idx = getattr(m, "layer_idx", None)
        if isinstance(idx, int) and hasattr(m, "q_proj") and hasattr(m, "config"):
            found.append((idx, m))
    if not found:
        raise ValueError(
            f"no attention modules with q_proj and layer_idx found in {type(model).__name__}; "
            "sparsekit.hf.use supports transformers models that dispatch through AttentionInterface"
        )
    return sorted(found, key=lambda t: t[0])


def _build(spec: SpecLike) -> Optional[SparseAttention]:
    if spec is None:
        return None
    if isinstance(spec, SparseAttention):
        return spec
    if isinstance(spec, str):
        return SparseAttention.from_string(spec)
    if isinstance(spec, dict):
        return SparseAttention.from_dict(spec)
    raise TypeError(f"spec must be a spec string, a dict, a SparseAttention or None, got {type(spec).__name__}")


def _configs(model) -> list:
    """The model's config and its sub-configs (their ``_attn_implementation`` is switched together)."""
    seen, out = set(), []
    for m in model.modules():
        c = getattr(m, "config", None)
        if c is not None and id(c) not in seen and hasattr(c, "_attn_implementation"):
            seen.add(id(c))
            out.append(c)
    return out


def _get_impl(config):
    return getattr(config, "_attn_implementation_internal", config._attn_implementation)


def _set_impl(config, impl) -> None:
    # the internal attribute: the public setter also rewrites sub-configs, which we restore one by one
    if hasattr(config, "_attn_implementation_internal"):
        config._attn_implementation_internal = impl
    else:
        config._attn_implementation = impl


@contextlib.contextmanager
def use(
    model,
    spec: SpecLike,
    *,
    layers: Optional[Mapping[int, SpecLike]] = None,
    dense_layers: Iterable[int] = (),
    decode_rows: int = 1,
    capture: Optional[Callable] = None,
):
    """Run ``model`` with sparsekit attention inside the ``with`` block; restore it on exit.

    Parameters
    ----------
    model : a transformers ``PreTrainedModel`` (e.g. from ``AutoModelForCausalLM``)
    spec : str, dict, SparseAttention or None
        The default for every layer, e.g. ``"streaming(window=512,sink=64)+delta(gamma=64)"``;
        None = dense SDPA (useful with ``layers``).
    layers : mapping layer index -> spec, optional
        Per-layer overrides (None = dense SDPA for that layer).
    dense_layers : iterable of int
        Layers kept dense, e.g. ``range(3)`` (the HiP setting). Applied after ``layers``.
    decode_rows : int, >= 1
        Calls with at most this many new query rows are decode and run dense over the cache.
    capture : callable, optional
        ``capture(layer_idx, q, k, v)`` is called in every attention call (probes).

    Yields a dict ``{layer_idx: LayerState}`` (routing counters in ``state.calls``).
    """
    if not isinstance(decode_rows, int) or isinstance(decode_rows, bool) or decode_rows < 1:
        raise ValueError(f"use: decode_rows must be an int >= 1, got {decode_rows!r}")
    register()
    mods = attention_modules(model)
    n_layers = len(mods)
    per_layer = {idx: spec for idx, _ in mods}
    for idx, s in (layers or {}).items():
        if idx not in per_layer:
            raise ValueError(f"use: layers has index {idx}, the model's layers are 0..{n_layers - 1}")
        per_layer[idx] = s
    for idx in dense_layers:
        if idx not in per_layer:
            raise ValueError(f"use: dense_layers has index {idx}, the model's layers are 0..{n_layers - 1}")
        per_layer[idx] = None
    built: dict = {}  # one SparseAttention per distinct spec object
    states = {}
    for idx, m in mods:
        s = per_layer[idx]
        key = id(s) if not isinstance(s, str) else s
        if key not in built:
            built[key] = _build(s)
        states[idx] = LayerState(built[key], decode_rows=decode_rows, capture=capture)

    configs = _configs(model)
    previous_impl = [(c, _get_impl(c)) for c in configs]
    previous_state = [(m, _STATE.get(m)) for _, m in mods]
    try:
        for c in configs:
            _set_impl(c, NAME)
        for idx, m in mods:
            _STATE[m] = states[idx]
        yield states
    finally:
        for m, old in previous_state:
            if old is None:
                _STATE.pop(m, None)
            else:
                _STATE[m] = old
        for c, impl in previous_impl:
            _set_impl(c, impl)
