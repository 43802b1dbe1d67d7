"""Every built-in press (each registers itself with ``@register`` next to its class:
workers/presses/registry.py) and the registry's API. The import order means nothing: which
methods ``--methods all`` runs, and in which order, is ``ALL_METHODS`` of
workers/contract/defaults.py, the one list (torch-free, so ``--help`` shows it fast).

The registry's API is bound first, before any press is imported: a press of your own, added
anywhere below, may then import ``register`` or ``parse_method`` from this package while it is
still being imported (docs/writing-a-press.md imports them from workers.presses.registry, which
needs nothing of this file)."""

from __future__ import annotations

from workers.presses.registry import REGISTRY, parse_method, register  # isort: split

from workers.contract.defaults import ALL_METHODS, METHOD_PRESETS
from workers.presses.base import LayerContext, Press, StateShape
from workers.presses.baseline import BaselinePress
from workers.presses.chunkkv import ChunkKVPress
from workers.presses.compactor import CompactorPress
from workers.presses.criticalkv import CriticalKVPress
from workers.presses.expected_attention import ExpectedAttentionPress
from workers.presses.h2o import H2OPress
from workers.presses.head_aware import HeadAwarePress
from workers.presses.keydiff import KeyDiffPress
from workers.presses.knorm import KnormPress
from workers.presses.kvpress_adapter import KVPressAdapter
from workers.presses.kvzap import KVzapPress
from workers.presses.kvzip import KVzipPress
from workers.presses.lagkv import LagKVPress
from workers.presses.leverage import LeverageScorePress
from workers.presses.observed_attention import ObservedAttentionPress
from workers.presses.qfilter import QFilterPress
from workers.presses.random import RandomPress
from workers.presses.snapkv import SnapKVPress
from workers.presses.streaming_llm import StreamingLLMPress
from workers.presses.tova import TOVAPress
from workers.presses.window import WindowPress

_unregistered = {name for names in METHOD_PRESETS.values() for name in names} - set(REGISTRY)
if _unregistered:  # a name in a preset with no press behind it: a bug, said at import
    raise ImportError(f"workers/contract/defaults.py METHOD_PRESETS name unregistered methods: {sorted(_unregistered)}")

__all__ = [
    "ALL_METHODS",
    "REGISTRY",
    "BaselinePress",
    "ChunkKVPress",
    "CompactorPress",
    "CriticalKVPress",
    "ExpectedAttentionPress",
    "H2OPress",
    "HeadAwarePress",
    "KVPressAdapter",
    "KVzapPress",
    "KVzipPress",
    "KeyDiffPress",
    "KnormPress",
    "LagKVPress",
    "LayerContext",
    "LeverageScorePress",
    "ObservedAttentionPress",
    "Press",
    "QFilterPress",
    "RandomPress",
    "SnapKVPress",
    "StateShape",
    "StreamingLLMPress",
    "TOVAPress",
    "WindowPress",
    "parse_method",
    "register",
]
