"""Which layers of a model the sparse configs change: sparse, the model's own sliding window, kept dense.

:func:`sparsekit.hf.use` runs a spec on every attention layer except the layers the model itself
defines as sliding-window (Gemma 3's local layers: the attention module has a truthy
``sliding_window``), which keep the model's own window, and the ``dense_layers`` it is given.
:func:`layer_plan` reports that split before a run; :func:`ranges` formats layer lists;
:func:`prefill_pairs` sums the attended pairs the sparse layers counted during a prefill (the measured
density, also for backends whose pattern depends on the data).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Iterable, Optional, Sequence

__all__ = ["LayerPlan", "layer_plan", "ranges", "prefill_pairs"]


def ranges(layers: Sequence[int]) -> str:
    """Compact layer list: ``[0, 1, 2, 4, 6, 7] -> "0-2, 4, 6-7"``; ``"none"`` when empty."""
    xs = sorted(set(int(x) for x in layers))
    if not xs:
        return "none"
    parts, start, prev = [], xs[0], xs[0]
    for x in xs[1:] + [None]:
        if x is not None and x == prev + 1:
            prev = x
            continue
        parts.append(str(start) if start == prev else f"{start}-{prev}")
        if x is not None:
            start = prev = x
    return ", ".join(parts)


@dataclass(frozen=True)
class LayerPlan:
    """How the attention layers of a model run under a sparse config.

    n_layers : number of attention layers
    sparse : layers that run the config's spec
    sliding : layers the model runs with its own sliding window (kept as the model's)
    dense : layers kept dense (``--dense-layers``)
    window : the model's sliding window in tokens (the largest, when layers differ), or None
    """

    n_layers: int
    sparse: tuple
    sliding: tuple
    dense: tuple
    window: Optional[int] = None

    def to_dict(self) -> dict:
        d = asdict(self)
        return {k: list(v) if isinstance(v, tuple) else v for k, v in d.items()}

    def describe(self) -> str:
        """Three lines for the terminal, e.g. ``sparse (the config's spec): 5, 11, 17``."""
        win = f" ({self.window} tokens)" if self.window else ""
        lines = [
            f"attention layers: {self.n_layers}",
            f"  sparse (the config's spec): {ranges(self.sparse)}",
            f"  the model's own sliding window{win}, kept: {ranges(self.sliding)}",
            f"  dense (--dense-layers): {ranges(self.dense)}",
        ]
        if not self.sparse:
            lines.append("  warning: no layer runs the sparse configs; every config will equal dense")
        return "\n".join(lines)


def layer_plan(model, dense_layers: Iterable[int] = ()) -> LayerPlan:
    """The :class:`LayerPlan` of a transformers model under :func:`sparsekit.hf.use` with ``dense_layers``.

    A layer the model runs as sliding-window counts as sliding even when it is also in ``dense_layers``.
    Raises ``ValueError`` when ``dense_layers`` names a layer the model does not have.
    """
    from sparsekit.hf import attention_modules

    mods = attention_modules(model)
    idx = [i for i, _ in mods]
    dense_layers = sorted(set(int(i) for i in dense_layers))
    bad = [i for i in dense_layers if i not in idx]
    if bad:
        raise ValueError(f"--dense-layers: the model has {len(idx)} attention layers (0..{len(idx) - 1}), "
                         f"cannot keep layer(s) {ranges(bad)} dense")
    windows = {i: getattr(m, "sliding_window", None) for i, m in mods}
    sliding = tuple(i for i in idx if windows[i])
    dense = tuple(i for i in dense_layers if i not in sliding)
    sparse = tuple(i for i in idx if i not in sliding and i not in dense)
    sizes = [w for w in windows.values() if isinstance(w, int) and w > 0]
    return LayerPlan(len(idx), sparse, sliding, dense, max(sizes) if sizes else None)


def prefill_pairs(states) -> Optional[dict]:
    """Pairs counted by the layers of a :func:`sparsekit.hf.use` block so far, summed over its layers.

    ``states``: the ``{layer_idx: LayerState}`` the block yields. Returns
    ``{"backend": ..., "corrector": ..., "dense": ...}`` (per batch item and query head, summed over the
    layers that ran the spec and their calls; ``dense`` = causal pairs of the same rows), so
    ``(backend + corrector) / dense`` is the density per layer that runs the config, or None when no layer
    ran a sparse call (dense SDPA).
    """
    tot = {"backend": 0.0, "corrector": 0.0, "dense": 0}
    for st in states.values():
        for key in tot:
            tot[key] += st.pairs[key]
    if not tot["dense"]:
        return None
    return {"backend": float(tot["backend"]), "corrector": float(tot["corrector"]), "dense": int(tot["dense"])}
