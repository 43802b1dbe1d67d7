"""The method registry: one place that maps a method name to its press class.

``parse_method("expected_attention:n_future_positions=256,use_vnorm=false")`` builds a press
from the CLI grammar ``name[:key=value,...]``; values are coerced to the dataclass field types.
"""

from __future__ import annotations

import dataclasses

from workers.presses.base import LayerContext, Press, StateShape
from workers.presses.baseline import BaselinePress
from workers.presses.expected_attention import ExpectedAttentionPress
from workers.presses.h2o import H2OPress
from workers.presses.head_aware import HeadAwarePress
from workers.presses.knorm import KnormPress
from workers.presses.kvpress_adapter import KVPressAdapter
from workers.presses.kvzap import KVzapPress
from workers.presses.observed_attention import ObservedAttentionPress
from workers.presses.random import RandomPress
from workers.presses.snapkv import SnapKVPress
from workers.presses.streaming_llm import StreamingLLMPress
from workers.presses.tova import TOVAPress
from workers.presses.window import WindowPress

REGISTRY: dict[str, type[Press]] = {
    cls.name: cls
    for cls in (
        BaselinePress,
        WindowPress,
        StreamingLLMPress,
        RandomPress,
        KnormPress,
        ExpectedAttentionPress,
        ObservedAttentionPress,
        H2OPress,
        SnapKVPress,
        TOVAPress,
        KVzapPress,
        HeadAwarePress,
        KVPressAdapter,
    )
}

# What `--methods all` means: every method that runs without required parameters.
ALL_METHODS: tuple[str, ...] = tuple(name for name, cls in REGISTRY.items() if cls.in_all)

__all__ = ["ALL_METHODS", "REGISTRY", "LayerContext", "Press", "StateShape", "parse_method"]


def parse_method(text: str) -> Press:
    """Build a press from ``name[:key=value,...]``; ValueError with the fix on bad input."""
    name, _, arg_text = text.strip().partition(":")
    if name not in REGISTRY:
        raise ValueError(f"unknown method {name!r}; valid methods: {', '.join(REGISTRY)} (or 'all')")
    cls = REGISTRY[name]
    if cls is KVPressAdapter:  # kvpress:ClassName[:key=value,...] passes options through
        return KVPressAdapter.parse(arg_text)
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
