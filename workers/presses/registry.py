"""The method registry: one place that maps a method name to its press class.

Each press registers itself with ``@register`` above its class, in its own file; importing
``workers.presses`` imports every built-in press.
``parse_method("expected_attention:n_future_positions=256,use_vnorm=false")`` builds a press
from the CLI grammar ``name[:key=value,...]``; values are coerced to the dataclass field types.
"""

from __future__ import annotations

import dataclasses
from typing import TypeVar

from workers.contract.defaults import ALL_METHODS, METHOD_PRESETS
from workers.presses.base import Press

REGISTRY: dict[str, type[Press]] = {}

P = TypeVar("P", bound=type[Press])


def register(cls: P) -> P:
    """Make ``cls`` a method of ``--methods``, under ``cls.name``; a name taken twice is a bug."""
    if cls.name in REGISTRY and REGISTRY[cls.name] is not cls:
        raise ValueError(f"method name {cls.name!r} is taken by {REGISTRY[cls.name].__qualname__}")
    REGISTRY[cls.name] = cls
    return cls


def method_names() -> list[str]:
    """Every registered method: ``--methods all``'s, in its order, then the others by name."""
    return [*(n for n in ALL_METHODS if n in REGISTRY), *sorted(n for n in REGISTRY if n not in ALL_METHODS)]


def parse_method(text: str) -> Press:
    """Build a press from ``name[:key=value,...]``; ValueError with the fix on bad input."""
    name, _, arg_text = text.strip().partition(":")
    if name not in REGISTRY:
        presets = ", ".join(METHOD_PRESETS)
        raise ValueError(f"unknown method {name!r}; valid methods: {', '.join(method_names())} (or {presets})")
    cls = REGISTRY[name]
    if hasattr(cls, "parse"):  # kvpress:ClassName[:key=value,...] passes options through
        return cls.parse(arg_text)
    fields = {f.name: f for f in dataclasses.fields(cls)}
    kwargs = {}
    for item in filter(None, (part.strip() for part in arg_text.split(","))):
        key, eq, raw = item.partition("=")
        if not eq or key not in fields:
            raise ValueError(
                f"bad parameter {item!r} for method {name!r}; use key=value with key one of: {', '.join(fields)}"
            )
        kwargs[key] = _coerce(name, key, raw, type(fields[key].default))
    try:
        return cls(**kwargs)
    except ValueError as exc:
        raise ValueError(str(exc)) from None


def _coerce(method: str, key: str, raw: str, kind: type) -> object:
    if kind is bool:
        if raw.lower() in ("true", "1", "yes"):
            return True
        if raw.lower() in ("false", "0", "no"):
            return False
        raise ValueError(f"{method}: {key} must be true or false, got {raw!r}")
    try:
        return kind(raw)
    except ValueError:
        raise ValueError(f"{method}: {key} must be a {kind.__name__}, got {raw!r}") from None
