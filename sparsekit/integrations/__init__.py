"""Integrations with model libraries (optional extras; nothing is imported or registered here).

* :mod:`sparsekit.integrations.transformers` - Hugging Face transformers 5.x
  (``pip install "sparsekit-prefill[hf]"``), also reachable as :mod:`sparsekit.hf`.
"""
