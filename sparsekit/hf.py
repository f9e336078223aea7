"""Hugging Face transformers integration, short name (``pip install "sparsekit-prefill[hf]"``).

``import sparsekit.hf`` imports transformers; ``import sparsekit`` does not::

    import sparsekit.hf
    with sparsekit.hf.use(model, "streaming(window=512,sink=64)+delta(gamma=64)"):
        out = model.generate(ids, max_new_tokens=16)

See :mod:`sparsekit.integrations.transformers` for the details.
"""

from .integrations.transformers import (  # noqa: F401
    NAME,
    LayerState,
    attention_forward,
    attention_modules,
    layer_state,
    register,
    use,
)

__all__ = ["NAME", "LayerState", "attention_forward", "attention_modules", "layer_state", "register", "use"]
