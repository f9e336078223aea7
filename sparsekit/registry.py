"""Plug-in discovery through Python entry points, loaded lazily on first use of a name.

Groups: ``sparsekit.backends``, ``sparsekit.correctors``, ``sparsekit.interpolations``.
First-party plug-ins register through the same groups (see pyproject.toml), so a
third-party package is a peer: it needs only a class and an entry point.

* An unknown name raises ``ValueError`` listing the known names and the closest match.
* Two distributions claiming one name raise ``PluginConflictError`` naming both.
* A plug-in that fails to import raises ``PluginLoadError`` when asked for by name, and
  is skipped with a warning by ``available_*()``; the others keep working.
"""

from __future__ import annotations

import difflib
import warnings
from importlib import metadata
from typing import Optional

__all__ = [
    "PluginLoadError",
    "PluginConflictError",
    "Registry",
    "BACKENDS",
    "CORRECTORS",
    "INTERPOLATIONS",
    "available_backends",
    "available_correctors",
    "available_interpolations",
    "register_backend",
    "register_corrector",
    "register_interpolation",
    "refresh",
]


class PluginLoadError(ImportError):
    """A registered plug-in could not be imported."""


class PluginConflictError(RuntimeError):
    """Two distributions register the same plug-in name."""


def _dist_name(ep) -> str:
    dist = getattr(ep, "dist", None)
    return getattr(dist, "name", None) or "<unknown distribution>"


class Registry:
    """Names -> plug-in classes for one kind (backend, corrector, interpolation)."""

    def __init__(self, kind: str, group: str):
        self.kind = kind
        self.group = group
        self._entry_points: Optional[dict[str, list]] = None
        self._loaded: dict[str, type] = {}
        self._local: dict[str, type] = {}

    # discovery -----------------------------------------------------------------
    def _discover(self) -> dict[str, list]:
        if self._entry_points is None:
            found: dict[str, list] = {}
            for ep in metadata.entry_points(group=self.group):
                name = ep.name.lower()
                same = [e for e in found.get(name, []) if e.value == ep.value]
                if not same:  # one target seen twice (e.g. stale metadata) is not a conflict
                    found.setdefault(name, []).append(ep)
            self._entry_points = found
        return self._entry_points

    def refresh(self) -> None:
        """Forget discovered entry points (after installing a plug-in at run time)."""
        self._entry_points = None
        self._loaded.clear()

    def register(self, name: str, cls: type) -> None:
        """Register a class in-process (tests, notebooks). Entry points are the normal way."""
        if not getattr(cls, "name", None):
            raise TypeError(f"{cls!r} needs a class attribute 'name'")
        self._local[name.lower()] = cls

    def unregister(self, name: str) -> None:
        self._local.pop(name.lower(), None)

    def names(self) -> list[str]:
        """Every registered name, without importing anything."""
        return sorted(set(self._discover()) | set(self._local))

    # lookup ----------------------------------------------------------------------
    def get(self, name: str) -> type:
        if not isinstance(name, str):
            raise TypeError(f"{self.kind} name must be a str, got {type(name).__name__}")
        key = name.lower()
        if key in self._local:
            return self._local[key]
        if key in self._loaded:
            return self._loaded[key]
        eps = self._discover().get(key)
        if not eps:
            known = self.names()
            close = difflib.get_close_matches(key, known, n=1)
            hint = f"; did you mean {close[0]!r}?" if close else ""
            raise ValueError(
                f"unknown {self.kind} {name!r}{hint} known {self.kind}s: {', '.join(known) or '(none)'}"
            )
        if len(eps) > 1:
            who = " and ".join(f"{_dist_name(e)} ({e.value})" for e in eps)
            raise PluginConflictError(
                f"{self.kind} name {name!r} is registered by more than one distribution: {who}; "
                "uninstall one of them"
            )
        ep = eps[0]
        try:
            cls = ep.load()
        except Exception as exc:  # a broken plug-in must not take the others down
            raise PluginLoadError(
                f"{self.kind} plug-in {name!r} from {_dist_name(ep)} ({ep.value}) failed to import: "
                f"{type(exc).__name__}: {exc}"
            ) from exc
        self._loaded[key] = cls
        return cls

    def available(self) -> list[str]:
        """Names that load; a plug-in that fails to import is skipped with a warning."""
        ok = []
        for name in self.names():
            try:
                cls = self.get(name)
                if self.kind in ("backend", "corrector", "interpolation"):
                    from .spec import check_kind

                    check_kind(cls, self.kind)
            except (PluginLoadError, PluginConflictError, TypeError) as exc:
                warnings.warn(str(exc), RuntimeWarning, stacklevel=2)
                continue
            ok.append(name)
        return ok


BACKENDS = Registry("backend", "sparsekit.backends")
CORRECTORS = Registry("corrector", "sparsekit.correctors")
INTERPOLATIONS = Registry("interpolation", "sparsekit.interpolations")
_BY_KIND = {"backend": BACKENDS, "corrector": CORRECTORS, "interpolation": INTERPOLATIONS}


def registry_for(kind: str) -> Registry:
    return _BY_KIND[kind]


def available_backends() -> list[str]:
    """Names of the backends that load (first- and third-party)."""
    return BACKENDS.available()


def available_correctors() -> list[str]:
    return CORRECTORS.available()


def available_interpolations() -> list[str]:
    return INTERPOLATIONS.available()


def register_backend(name: str, cls: type) -> None:
    BACKENDS.register(name, cls)


def register_corrector(name: str, cls: type) -> None:
    CORRECTORS.register(name, cls)


def register_interpolation(name: str, cls: type) -> None:
    INTERPOLATIONS.register(name, cls)


def refresh() -> None:
    """Re-read entry points of all groups (after ``pip install`` of a plug-in at run time)."""
    for r in _BY_KIND.values():
        r.refresh()
