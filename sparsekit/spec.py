"""Specs: plug-in objects <-> dicts <-> short strings.

String form: ``name(key=value,...)`` parts joined by ``+``, backend first, e.g.
``"streaming(window=2048,sink=1024)+delta(gamma=64,interpolation=ema(beta=0.75))"``.
Values are ints, floats, ``None``, ``true``/``false``, bare or quoted strings, or a nested
``name(...)`` call (a nested plug-in such as an interpolation).
"""

from __future__ import annotations

import dataclasses
from typing import Any

__all__ = ["parse_spec", "format_spec", "to_dict", "build", "instantiate", "option_names", "is_plugin", "SpecError"]

_KINDS = ("backend", "corrector", "interpolation")


class SpecError(ValueError):
    """A spec string or dict that cannot be understood."""


# ---------------------------------------------------------------------------- parsing
def _split_top(s: str, sep: str) -> list[str]:
    parts, depth, cur, quote = [], 0, [], None
    for ch in s:
        if quote:
            cur.append(ch)
            if ch == quote:
                quote = None
            continue
        if ch in "'\"":
            quote = ch
        elif ch == "(":
            depth += 1
        elif ch == ")":
            depth -= 1
            if depth < 0:
                raise SpecError(f"unbalanced ')' in spec {s!r}")
        if ch == sep and depth == 0:
            parts.append("".join(cur))
            cur = []
        else:
            cur.append(ch)
    if depth != 0 or quote:
        raise SpecError(f"unbalanced parentheses or quotes in spec {s!r}")
    parts.append("".join(cur))
    return [p.strip() for p in parts]


def _parse_value(text: str) -> Any:
    t = text.strip()
    if not t:
        raise SpecError("empty value in spec")
    if t[0] in "'\"" and t[-1] == t[0] and len(t) >= 2:
        return t[1:-1]
    low = t.lower()
    if low == "none":
        return None
    if low == "true":
        return True
    if low == "false":
        return False
    try:
        return int(t)
    except ValueError:
        pass
    try:
        return float(t)
    except ValueError:
        pass
    if "(" in t:
        return _parse_call(t)
    return t


def _parse_call(text: str) -> dict:
    t = text.strip()
    if "(" not in t:
        name, body = t, ""
    else:
        if not t.endswith(")"):
            raise SpecError(f"expected 'name(key=value,...)', got {text!r}")
        name, body = t[: t.index("(")].strip(), t[t.index("(") + 1 : -1]
    if not name or not name.replace("_", "").replace("-", "").isalnum():
        raise SpecError(f"bad plug-in name {name!r} in spec {text!r}")
    d: dict = {"name": name}
    if body.strip():
        for item in _split_top(body, ","):
            if "=" not in item:
                raise SpecError(f"expected key=value, got {item!r} in {text!r}")
            key, val = item.split("=", 1)
            key = key.strip()
            if not key.isidentifier():
                raise SpecError(f"bad option name {key!r} in {text!r}")
            if key in d:
                raise SpecError(f"option {key!r} given twice in {text!r}")
            d[key] = _parse_value(val)
    return d


def parse_spec(text: str) -> list[dict]:
    """``"a(x=1)+b(y=2)"`` -> ``[{"name": "a", "x": 1}, {"name": "b", "y": 2}]``."""
    if not isinstance(text, str) or not text.strip():
        raise SpecError(f"spec must be a non-empty string, got {text!r}")
    return [_parse_call(p) for p in _split_top(text, "+")]


# ---------------------------------------------------------------------------- formatting
def to_dict(obj) -> dict:
    """A plug-in instance as ``{"name": ..., option: value, ...}``; nested plug-ins recurse."""
    d = {"name": obj.name}
    if dataclasses.is_dataclass(obj):
        for f in dataclasses.fields(obj):
            val = getattr(obj, f.name)
            d[f.name] = to_dict(val) if is_plugin(val) else val
    return d


def _format_value(v: Any) -> str:
    if isinstance(v, dict):
        return _format_call(v)
    if v is None:
        return "None"
    if isinstance(v, bool):
        return "true" if v else "false"
    if isinstance(v, str):
        plain = v and all(c.isalnum() or c in "_-." for c in v)
        return v if plain and not _looks_numeric(v) else repr(v)
    return repr(v)


def _looks_numeric(s: str) -> bool:
    try:
        float(s)
        return True
    except ValueError:
        return s.lower() in ("none", "true", "false")


def _format_call(d: dict) -> str:
    opts = [f"{k}={_format_value(v)}" for k, v in d.items() if k != "name"]
    return d["name"] + (f"({','.join(opts)})" if opts else "")


def format_spec(*objs) -> str:
    """Instances (None skipped) -> ``"name(k=v,...)+name(...)"``."""
    return "+".join(_format_call(to_dict(o)) for o in objs if o is not None)


# ---------------------------------------------------------------------------- building
def is_plugin(obj) -> bool:
    """A plug-in instance: it has a ``name`` and a ``kind`` (backend, corrector or interpolation)."""
    return not isinstance(obj, type) and getattr(obj, "kind", None) in _KINDS and bool(getattr(obj, "name", ""))


def option_names(cls) -> list:
    """The dataclass fields of a plug-in class: its options."""
    return [f.name for f in dataclasses.fields(cls)] if dataclasses.is_dataclass(cls) else []


def build(kind: str, spec) -> Any:
    """Instantiate a plug-in of ``kind`` from a name, a dict, a string, or an instance."""
    from .registry import registry_for

    if is_plugin(spec):
        if spec.kind != kind:
            raise TypeError(f"expected a {kind}, got the {spec.kind} {spec.name!r}")
        return spec
    if isinstance(spec, str):
        parts = parse_spec(spec)
        if len(parts) != 1:
            raise SpecError(f"expected one {kind} in {spec!r}, got {len(parts)}")
        spec = parts[0]
    if isinstance(spec, dict):
        spec = dict(spec)
        if "name" not in spec:
            raise SpecError(f"{kind} dict needs a 'name' key, got {sorted(spec)}")
        cls = registry_for(kind).get(spec.pop("name"))
        return instantiate(cls, spec, kind=kind)
    raise TypeError(
        f"{kind} must be a name, a spec string, a dict or a {kind} instance, got {type(spec).__name__}"
    )


_BASES = {"backend": "Backend", "corrector": "Corrector", "interpolation": "Interpolation"}


def check_kind(cls, kind: str) -> None:
    """A registered class must subclass the base of its kind (``sparsekit.Backend`` ...)."""
    if getattr(cls, "kind", None) != kind or not isinstance(cls, type):
        where = f"{getattr(cls, '__module__', '?')}.{getattr(cls, '__qualname__', repr(cls))}"
        raise TypeError(
            f"{kind} plug-in {getattr(cls, 'name', '') or where!r} ({where}) must subclass sparsekit.{_BASES[kind]}"
        )


def instantiate(cls, options: dict, kind: str = None):
    """``cls(**options)`` with an error that lists the valid options when one is unknown."""
    if kind is not None:
        check_kind(cls, kind)
    valid = option_names(cls)
    unknown = [k for k in options if k not in valid]
    if unknown:
        raise TypeError(
            f"unknown option(s) {', '.join(map(repr, unknown))} for {cls.kind} {cls.name!r}; "
            f"valid options: {', '.join(valid) or '(none)'}"
        )
    return cls(**options)
