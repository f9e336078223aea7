"""The official HiP package (``hip-attn``), wrapped for comparison only.

DeepAuto-AI/hip-attention (https://github.com/DeepAuto-AI/hip-attention), pip ``hip-attn``;
license FSL-1.1-MIT ("not yet free for commercial use"), so it is never a dependency of
sparsekit: install it yourself (``pip install --no-deps hip-attn``) to compare. Our own
implementation is the ``hip`` backend.

What the wrapper does about the package (none of it edits the installed files):

* ``q`` is multiplied by the softmax scale before the call (the package has no scale argument);
* ``hip_attn/__init__.py`` and ``hip_attn/v1_2/__init__.py`` import model code written for
  transformers 4.x and every optional backend; the wrapper registers bare package objects for
  ``hip_attn`` and ``hip_attn.v1_2`` and imports only the modules the attention call needs;
* ``hip_attn.v1_2.triton_jit`` asserts ``triton == 3.4.0``; a stand-in module maps its
  ``triton_jit`` decorator to plain ``triton.jit`` / ``triton.autotune``;
* ``attention_extend_bsa_tilelang`` (an optional kernel) imports tilelang: a stand-in module
  leaves that backend unset; ``cv2`` (imported, not used on this path) gets a stand-in when missing.

These stand-ins are registered in ``sys.modules`` on the first call, never at import. The
package does not return the log-sum-exp: ``lse`` is NaN (the Δ corrector only needs ``out``).
Set ``HIP_DISABLE_AUTOTUNE=1`` in the environment to skip its autotuning.
"""

from __future__ import annotations

import importlib
import importlib.util
import os
import sys
import types
from dataclasses import dataclass
from typing import ClassVar, Optional

import torch

from sparsekit.base import Backend
from sparsekit.contract import AttentionResult
from sparsekit.validate import check_int_option

__all__ = ["HipAttn"]

_MODULES: Optional[tuple] = None


def _load():
    """(attention_extend, attention_metadata) modules of the installed package."""
    global _MODULES
    if _MODULES is not None:
        return _MODULES
    spec = importlib.util.find_spec("hip_attn")  # before any stand-in package is registered
    if spec is None or not spec.submodule_search_locations:
        raise ImportError("the hip_attn backend needs the official package: pip install --no-deps hip-attn (FSL-1.1 license)")
    import triton

    root = list(spec.submodule_search_locations)[0]
    for name, path in (("hip_attn", root), ("hip_attn.v1_2", os.path.join(root, "v1_2"))):
        if name not in sys.modules:
            pkg = types.ModuleType(name)
            pkg.__path__ = [path]
            sys.modules[name] = pkg

    def triton_jit(walk_dependency=None, version=None, repr=None, launch_metadata=None, do_not_specialize=None,
                   do_not_specialize_on_alignment=None, debug=None, noinline=None, do_autotune=None,
                   configs=None, key=None, restore_value=None):
        opts = dict(version=version, repr=repr, launch_metadata=launch_metadata, do_not_specialize=do_not_specialize,
                    do_not_specialize_on_alignment=do_not_specialize_on_alignment, debug=debug, noinline=noinline)
        opts = {k: v for k, v in opts.items() if v is not None}

        def decorator(fn):
            return triton.jit(fn, **opts)

        if do_autotune is None:
            do_autotune = configs is not None
        if do_autotune:
            return lambda fn: triton.autotune(configs=configs, key=key, restore_value=restore_value)(decorator(fn))
        return decorator

    tj = types.ModuleType("hip_attn.v1_2.triton_jit")
    tj.triton_jit = triton_jit
    sys.modules.setdefault("hip_attn.v1_2.triton_jit", tj)
    tlm = types.ModuleType("hip_attn.v1_2.attention_extend_bsa_tilelang")
    tlm.block_sparse_attention_tilelang = None
    sys.modules.setdefault("hip_attn.v1_2.attention_extend_bsa_tilelang", tlm)
    if importlib.util.find_spec("cv2") is None:
        sys.modules.setdefault("cv2", types.ModuleType("cv2"))
    ext = importlib.import_module("hip_attn.v1_2.attention_extend")
    meta = importlib.import_module("hip_attn.v1_2.attention_metadata")
    _MODULES = (ext, meta)
    return _MODULES


@dataclass
class HipAttn(Backend):
    """The official ``hip-attn`` 1.2.x prefill (``dual_stage_quadratic_hip_attention``), for comparison.

    Lee et al., ICLR 2025 (https://arxiv.org/abs/2406.09827). Requires the package and CUDA.

    Parameters
    ----------
    k : int
        ``second_stage_k``: keys selected per query block beyond sink and window.
    sink, window : int
        ``sink_token_size`` and ``sliding_window_size``.
    preset : str
        ``"delta"``: the Δ paper's HiP stages (chunks 256 -> 8 -> 2 keeping all, 32768, 8192 keys,
        query blocks 128/64, landmark scan); ``"package"``: the package's own default stages.
    """

    name: ClassVar[str] = "hip_attn"
    k: int = 2048
    sink: int = 1024
    window: int = 1024
    preset: str = "delta"

    def __post_init__(self):
        check_int_option("hip_attn", "k", self.k, 1)
        check_int_option("hip_attn", "sink", self.sink, 0)
        check_int_option("hip_attn", "window", self.window, 0)
        if self.preset not in ("delta", "package"):
            raise ValueError(f"hip_attn: preset must be 'delta' or 'package', got {self.preset!r}")

    def unsupported(self, q, k, v) -> Optional[str]:
        if "hip_attn" not in sys.modules and importlib.util.find_spec("hip_attn") is None:
            return "the official hip-attn package is not installed (optional, FSL-1.1: pip install --no-deps hip-attn)"
        if not q.is_cuda:
            return "hip-attn runs on CUDA only"
        if q.dtype not in (torch.bfloat16, torch.float16):
            return f"hip-attn takes bf16/fp16, got {q.dtype}"
        return None

    def args(self, q_offset: int, nq: int, device):
        _, meta = _load()
        kw = dict(sink_token_size=self.sink, sliding_window_size=self.window, second_stage_k=self.k)
        if self.preset == "delta":
            S = meta.ScanStage
            kw.update(
                block_sparse_block_size_q=64,
                using_landmark=True,
                stages=[
                    S(stage_block_size_q=128, stage_block_stride_q=4, stage_chunk_size=256, stage_k=None, stage_stride=1),
                    S(stage_block_size_q=64, stage_block_stride_q=1, stage_chunk_size=8, stage_k=32768, stage_stride=1),
                    S(stage_block_size_q=64, stage_block_stride_q=1, stage_chunk_size=2, stage_k=8192, stage_stride=1),
                ],
            )
        if q_offset:
            kw["position_ids"] = (q_offset + torch.arange(nq, device=device))[None]
        return meta.HiPAttentionArgs(**kw)

    def prefill(self, q, k, v, *, scale: float, q_offset: int) -> AttentionResult:
        """q (B, Hq, Nq, D), k/v (B, Hkv, Nk, D) CUDA bf16/fp16 -> out (B, Hq, Nq, D), lse NaN."""
        reason = self.unsupported(q, k, v)
        if reason:
            raise ValueError(f"hip_attn: {reason}")
        ext, _ = _load()
        B, Hq, Nq, D = q.shape
        args = self.args(q_offset, Nq, q.device)
        if q_offset and args.position_ids is not None:
            args.position_ids = args.position_ids.expand(B, -1)
        out, _meta = ext.dual_stage_quadratic_hip_attention(
            (q * scale).transpose(1, 2).contiguous(), k.transpose(1, 2).contiguous(), v.transpose(1, 2).contiguous(),
            args=args,
        )
        out = out.reshape(B, Nq, Hq, -1).transpose(1, 2)
        lse = torch.full((B, Hq, Nq), float("nan"), dtype=torch.float32, device=q.device)
        return AttentionResult(out.to(q.dtype), lse)

    def pattern(self, q, k, *, scale=None, q_offset=0) -> torch.Tensor:
        raise NotImplementedError("hip_attn: the official package's pattern is not exposed; use the hip backend")

    def cost(self, nq: int, nk: int, q_offset: int) -> int:
        """Nominal pairs: each row sees up to sink + window + k keys (the package's exact count is internal)."""
        seen = torch.arange(q_offset + 1, q_offset + nq + 1, dtype=torch.int64)
        return int(torch.clamp(seen, max=self.sink + self.window + self.k).sum())
