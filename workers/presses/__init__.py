"""Every built-in press, imported in the order ``--methods all`` runs them (each registers itself
with ``@register`` next to its class: workers/presses/registry.py), and the registry's API."""

from __future__ import annotations

# isort: off
# The order of these imports is the order of the registry, so of `--methods all` and its rows.
from workers.presses.baseline import BaselinePress
from workers.presses.window import WindowPress
from workers.presses.streaming_llm import StreamingLLMPress
from workers.presses.random import RandomPress
from workers.presses.knorm import KnormPress
from workers.presses.expected_attention import ExpectedAttentionPress
from workers.presses.observed_attention import ObservedAttentionPress
from workers.presses.h2o import H2OPress
from workers.presses.snapkv import SnapKVPress
from workers.presses.tova import TOVAPress
from workers.presses.kvzap import KVzapPress
from workers.presses.head_aware import HeadAwarePress
from workers.presses.kvpress_adapter import KVPressAdapter

# isort: on
from workers.presses.base import LayerContext, Press, StateShape
from workers.presses.registry import REGISTRY, parse_method, register

# What `--methods all` means: every method that runs without required parameters.
ALL_METHODS: tuple[str, ...] = tuple(name for name, cls in REGISTRY.items() if cls.in_all)

__all__ = [
    "ALL_METHODS",
    "REGISTRY",
    "BaselinePress",
    "ExpectedAttentionPress",
    "H2OPress",
    "HeadAwarePress",
    "KVPressAdapter",
    "KVzapPress",
    "KnormPress",
    "LayerContext",
    "ObservedAttentionPress",
    "Press",
    "RandomPress",
    "SnapKVPress",
    "StateShape",
    "StreamingLLMPress",
    "TOVAPress",
    "WindowPress",
    "parse_method",
    "register",
]
