"""Evaluation configs: named attention setups, and the default ablation grid.

A config is ``(label, spec)``: ``spec`` None means the model's own dense SDPA attention (the
exact baseline; ``tests/test_hf_integration.py`` checks sparsekit's ``dense`` backend
reproduces it), otherwise a :class:`~sparsekit.SparseAttention` spec string run through
:func:`sparsekit.hf.use`.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Optional, Sequence

__all__ = ["Config", "default_grid", "parse_configs", "read_configs_file"]


@dataclass(frozen=True)
class Config:
    """label: short name used in tables; spec: SparseAttention spec string or None (dense SDPA);
    dense_layers: layers kept dense (e.g. (0, 1, 2), the HiP setting)."""

    label: str
    spec: Optional[str]
    dense_layers: tuple = field(default=())

    def attention(self):
        from sparsekit import SparseAttention

        return None if self.spec is None else SparseAttention.from_string(self.spec)



def default_grid(
    windows: Sequence[int],
    sink: int,
    gammas: Sequence[int],
    *,
    interpolations: Sequence[str] = ("repeat", "linear"),
    backend: str = "streaming",
    tail_control: bool = True,
    dense_layers: tuple = (),
) -> list:
    """dense, then for each window: backend, backend+tailonly(γ), backend+recompute(γ), backend+Δ(γ, interp)."""
    out = [Config("dense", None)]
    for w in windows:
        b = f"{backend}(window={w},sink={sink})"
        suffix = f"w{w}" if len(windows) > 1 else ""
        def lab(s):
            return f"{s}@{suffix}" if suffix else s
        out.append(Config(lab(backend), b, dense_layers))
        for g in gammas:
            gs = f"g{g}" if len(gammas) > 1 else ""
            def glab(s):
                return lab(f"{s}{'-' + gs if gs else ''}")
            if tail_control:
                out.append(Config(glab(f"{backend}+tail"), f"{b}+tailonly(gamma={g})", dense_layers))
            out.append(Config(glab(f"{backend}+recompute"), f"{b}+recompute(gamma={g})", dense_layers))
            for interp in interpolations:
                name = "delta" if interp == "repeat" else f"{interp}-delta"
                spec = f"{b}+delta(gamma={g})" if interp == "repeat" else f"{b}+delta(gamma={g},interpolation={interp})"
                out.append(Config(glab(f"{backend}+{name}"), spec, dense_layers))
    return out


def parse_configs(items: Sequence[str]) -> list:
    """``["dense", "label=spec", "spec"]`` -> configs; ``dense``/``sdpa`` alone is the SDPA baseline."""
    out = []
    for it in items:
        it = it.strip()
        if it in ("dense", "sdpa"):
            out.append(Config("dense", None))
            continue
        if "=" in it.split("(")[0]:
            label, spec = it.split("=", 1)
        else:
            label, spec = it, it
        out.append(Config(label.strip(), spec.strip()))
    labels = [c.label for c in out]
    if len(set(labels)) != len(labels):
        raise ValueError(f"duplicate config labels: {labels}")
    return out


def read_configs_file(path) -> list:
    """The config items of a grid file: one ``dense`` or ``label=spec`` (or bare spec) per line.

    Blank lines are skipped and ``#`` starts a comment (to the end of the line; specs never contain
    ``#``). Returns the items as strings, for :func:`parse_configs`. Raises ``FileNotFoundError`` when
    the file does not exist and ``ValueError`` when it holds no config.
    """
    from pathlib import Path

    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"--configs-file: no such file {str(path)!r}")
    items = [line.split("#", 1)[0].strip() for line in path.read_text(encoding="utf-8").splitlines()]
    items = [it for it in items if it]
    if not items:
        raise ValueError(f"--configs-file {str(path)!r} holds no config (one 'dense' or 'label=spec' per line)")
    return items
