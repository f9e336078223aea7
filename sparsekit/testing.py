"""Test a backend the way sparsekit tests its own: ``check_backend(MyBackend(...))``.

For a few shapes (odd lengths, GQA, batch 2, a query offset for chunked prefill) it checks that

* ``pattern()`` returns a :class:`~sparsekit.Pattern` of the call's shapes that never sees a future key;
* the pattern's exact pair count (``plan.cost()``) equals its keep-mask's count;
* every implementation that runs on the inputs' device (the torch reference always; on CUDA the
  Triton, FlashInfer and Flex kernels that accept the pattern) matches an independent float64
  attention over the keep-mask, written here from the definition (scores, mask, softmax);
* with ``Delta(gamma)`` on top, the anchor and tail rows equal dense attention exactly.

It returns a :class:`BackendReport` (density and cosine to dense attention per shape, errors per
implementation) and raises ``AssertionError`` naming the shape, implementation and error when a check
fails. Use it in a plug-in's test suite::

    from sparsekit.testing import check_backend
    def test_my_backend():
        check_backend(MyBackend(window=64))
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

__all__ = ["check_backend", "BackendReport", "attention_over_mask"]

SHAPES = [  # (B, Hq, Hkv, Nq, q_offset, D)
    (1, 4, 2, 300, 0, 32),
    (2, 4, 1, 129, 37, 16),
    (1, 2, 2, 64, 0, 64),
    (1, 8, 2, 511, 5, 32),
]


def attention_over_mask(q, k, v, mask, scale):
    """float64 attention under a keep-mask broadcastable to ``[B, Hq, Nq, Nk]``; K/V repeated to the heads.

    Returns ``(out [B, Hq, Nq, D], lse [B, Hq, Nq])``; rows that see no key give out 0, lse -inf.
    """
    G = q.shape[1] // k.shape[1]
    kr = k.double().repeat_interleave(G, dim=1)
    vr = v.double().repeat_interleave(G, dim=1)
    s = torch.einsum("bhqd,bhkd->bhqk", q.double(), kr) * scale
    s = s.masked_fill(~torch.broadcast_to(mask, s.shape), float("-inf"))
    m = s.amax(-1, keepdim=True).nan_to_num(neginf=0.0)
    w = torch.exp(s - m)
    z = w.sum(-1, keepdim=True)
    return (w / z.clamp_min(1e-300)) @ vr, (m + torch.log(z)).squeeze(-1)


@dataclass
class BackendReport:
    """What :func:`check_backend` measured, per shape."""

    backend: str
    shapes: list = field(default_factory=list)

    def __str__(self) -> str:
        lines = [f"check_backend({self.backend}): all checks passed"]
        for s in self.shapes:
            errs = ", ".join(f"{k} {v:.1e}" for k, v in s["max_err"].items())
            lines.append(f"  {s['shape']}: density {s['density']:.1%}, cos to dense {s['cos_to_dense']:.4f}; "
                         f"max |err| vs float64: {errs}")
        return "\n".join(lines)


def check_backend(backend, *, device="cpu", dtype=torch.float32, shapes=None, gamma: int = 16, seed: int = 0,
                  tol=None) -> BackendReport:
    """Check ``backend`` (an instance) as the module docstring says; returns a :class:`BackendReport`."""
    from . import Delta, Pattern, SparseAttention
    from .executor import choose, execute, implementations

    dev = torch.device(device)
    tol = tol if tol is not None else (1e-9 if dtype == torch.float64 else 2e-5 if dtype == torch.float32 else 2e-2)
    report = BackendReport(str(backend))
    g = torch.Generator().manual_seed(seed)
    for shape in shapes or SHAPES:
        B, Hq, Hkv, Nq, off, D = shape
        q = torch.randn(B, Hq, Nq, D, generator=g).to(dev, dtype)
        k = torch.randn(B, Hkv, Nq + off, D, generator=g).to(dev, dtype)
        v = torch.randn(B, Hkv, Nq + off, D, generator=g).to(dev, dtype)
        scale = D ** -0.5
        where = f"{backend} on q {list(q.shape)}, k {list(k.shape)}, q_offset={off}"
        reason = backend.unsupported(q, k, v)
        if reason:
            raise AssertionError(f"{where}: the backend refuses these inputs: {reason}")
        pat = backend.pattern(q, k, scale=scale, q_offset=off)
        assert isinstance(pat, Pattern), f"{where}: pattern() returned {type(pat).__name__}, not a sparsekit.Pattern"
        assert (pat.batch, pat.q_heads, pat.kv_heads, pat.nq, pat.nk) == (B, Hq, Hkv, Nq, Nq + off), \
            f"{where}: pattern() is for other shapes: {pat!r}"
        mask = pat.expand(pat.mask()).cpu()
        pos = off + torch.arange(Nq)
        future = torch.arange(Nq + off)[None, :] > pos[:, None]
        assert not (mask & future).any(), f"{where}: the pattern lets a row see a future key"
        attn = SparseAttention(backend)
        plan = attn.plan(q, k, scale=scale, q_offset=off)
        counted = mask.sum((-1, -2)).double().mean().item()
        assert abs(float(plan.cost().backend_pairs) - counted) <= 1e-9 * max(1.0, counted), \
            f"{where}: plan.cost() counts {plan.cost().backend_pairs} pairs, the mask {counted}"
        want_out, want_lse = attention_over_mask(q.cpu(), k.cpu(), v.cpu(), mask, scale)
        errs = {}
        for impl in implementations():
            try:
                choose(pat, q, k, scale=scale, impl=impl.name)
            except RuntimeError:
                continue  # this implementation refuses the pattern or the device
            res = execute(pat, q, k, v, scale=scale, impl=impl.name)
            err = (res.out.double().cpu() - want_out).abs().max().item()
            fin = torch.isfinite(want_lse)
            assert torch.equal(torch.isfinite(res.lse.cpu()), fin), f"{where}, {impl.name}: rows that see no key differ"
            lerr = (res.lse.double().cpu()[fin] - want_lse[fin]).abs().max().item() if fin.any() else 0.0
            assert err <= tol * max(1.0, want_out.abs().max().item()), \
                f"{where}, {impl.name}: max |out - float64 reference| = {err:.3e} (tolerance {tol})"
            assert lerr <= 1e-3 * max(1.0, want_lse[fin].abs().max().item() if fin.any() else 1.0), \
                f"{where}, {impl.name}: lse error {lerr:.3e}"
            errs[impl.name] = err
        assert "reference" in errs, f"{where}: the reference implementation did not run"
        dense_out, _ = attention_over_mask(q.cpu(), k.cpu(), v.cpu(), ~future, scale)
        corrected = SparseAttention(backend, corrector=Delta(gamma=gamma))(q, k, v, scale=scale, q_offset=off)
        rows = Delta(gamma=gamma).rows(Nq).dense_rows()
        cerr = (corrected.double().cpu()[:, :, rows] - dense_out[:, :, rows]).abs().max().item()
        assert cerr <= tol * max(1.0, dense_out.abs().max().item()), \
            f"{where}: with Delta(gamma={gamma}) the anchor / tail rows differ from dense attention by {cerr:.3e}"
        cos = torch.nn.functional.cosine_similarity(want_out, dense_out, dim=-1).mean().item()
        report.shapes.append(dict(shape=shape, density=pat.density(), cos_to_dense=cos, max_err=errs))
    return report
