"""Head-aware windows: each attention head keeps its own number of recent keys, plus sinks.

The policies of the head-aware ablation (docs/DESIGN.md, "The head-aware ablation"), with its letters:

- ``uniform``: every head ``base``. A is ``n_sink=0`` (window only), B the default (sinks + window).
- ``class``: a context per head class (``positional`` / ``mixed`` / ``gathering``): C/D (named
  ``C_..._no_sink`` without sinks).
- ``recommended``: each head's recommended context from the head table: F; E is the same
  without sinks (``n_sink=0``), as ``sql/head_ablation.sql`` names it.
- ``gated``: class contexts only for heads classified with confidence >= ``confidence``,
  ``base`` for the rest: G.
- ``inverse``: ``base`` everywhere, ``gathering`` for confidently gathering heads: H.

A head's *context* counts its sinks, as the study did: context c keeps the ``n_sink`` first
positions plus the c - n_sink most recent keys, so uniform 128 is StreamingLLM with 4 sinks and
a 124-key window; -1 is the full context. The engine masks per kv-head, so a kv-head gets the
widest window of its query heads (no query head sees less than its policy gives it).
Every key outside its head's window scores -inf: the press is structural and has no threshold.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass
from pathlib import Path

import pyarrow.parquet as pq
import torch

from workers.contract.schema import HEAD_CLASSES
from workers.presses.base import LayerContext, Press, constant_scores
from workers.presses.registry import register

HEAD_POLICIES = ("uniform", "class", "recommended", "gated", "inverse")
FULL_CONTEXT = -1
_UNBOUNDED = 2**31 - 1  # a window no document reaches; the engine clamps it to the length


@dataclass(frozen=True)
class HeadTable:
    """What the press needs from a ``kvorch heads analyze`` table, as [layers, heads] tensors."""

    head_class: torch.Tensor  # int64 index into HEAD_CLASSES
    confidence: torch.Tensor  # float64
    recommended_context: torch.Tensor  # int64, -1 = full


@functools.lru_cache(maxsize=8)
def read_head_table(path: str) -> HeadTable:
    """Read a heads table (a parquet file, or the run directory holding it) once per process."""
    table = pq.read_table(path).to_pydict()
    layers, heads = max(table["layer"]) + 1, max(table["head"]) + 1
    if len(table["layer"]) != layers * heads:
        raise ValueError(f"head table {path} has {len(table['layer'])} rows, not one per (layer, head)")
    head_class = torch.zeros(layers, heads, dtype=torch.int64)
    confidence = torch.zeros(layers, heads, dtype=torch.float64)
    recommended = torch.zeros(layers, heads, dtype=torch.int64)
    for i, (layer, head) in enumerate(zip(table["layer"], table["head"], strict=True)):
        head_class[layer, head] = HEAD_CLASSES.index(table["head_class"][i])
        confidence[layer, head] = table["confidence"][i]
        recommended[layer, head] = table["recommended_context"][i]
    return HeadTable(head_class, confidence, recommended)


@register
@dataclass(frozen=True)
class HeadAwarePress(Press):
    name = "head_aware"
    constant_score = float("-inf")

    policy: str = "uniform"
    heads: str = ""  # head table from `kvorch heads analyze` (all policies but uniform)
    base: int = 128
    positional: int = 64
    mixed: int = 128
    gathering: int = 512
    confidence: float = 0.6
    n_sink: int = 4

    def __post_init__(self) -> None:
        if self.policy not in HEAD_POLICIES:
            raise ValueError(f"head_aware: policy {self.policy!r} is unknown; use one of {', '.join(HEAD_POLICIES)}")
        if self.policy != "uniform":
            if not self.heads:
                raise ValueError(
                    f"head_aware: policy {self.policy} needs heads=<table>; run `kvorch heads analyze` to make one"
                )
            if not Path(self.heads).exists():
                raise ValueError(f"head_aware: head table {self.heads} not found; run `kvorch heads analyze`")
        for key in ("base", "positional", "mixed", "gathering"):
            if getattr(self, key) < FULL_CONTEXT:
                raise ValueError(f"head_aware: {key} must be a context >= 0, or -1 for the full context")
        if not 0.0 <= self.confidence <= 1.0:
            raise ValueError(f"head_aware: confidence must be in [0, 1], got {self.confidence}")
        if self.n_sink < 0:
            raise ValueError(f"head_aware: n_sink must be >= 0, got {self.n_sink}")

    def contexts(self, n_layers: int, n_heads: int) -> torch.Tensor:
        """The policy's context per (layer, query head), [n_layers, n_heads] int64."""
        if self.policy == "uniform":
            return torch.full((n_layers, n_heads), self.base, dtype=torch.int64)
        table = read_head_table(self.heads)
        if tuple(table.head_class.shape) != (n_layers, n_heads):
            raise ValueError(
                f"head_aware: head table {self.heads} is for {tuple(table.head_class.shape)} (layers, heads), "
                f"this model has ({n_layers}, {n_heads}); analyze this model with `kvorch heads analyze`"
            )
        if self.policy == "recommended":
            return table.recommended_context.clone()
        base = torch.full((n_layers, n_heads), self.base, dtype=torch.int64)
        confident = table.confidence >= self.confidence
        if self.policy == "inverse":
            gathering = table.head_class == HEAD_CLASSES.index("gathering")
            return torch.where(confident & gathering, self.gathering, base)
        by_class = torch.tensor([getattr(self, c) for c in HEAD_CLASSES], dtype=torch.int64)[table.head_class]
        if self.policy == "class":
            return by_class
        return torch.where(confident, by_class, base)  # gated

    def head_windows(self, n_layers: int, n_heads: int, n_kv_heads: int) -> torch.Tensor:
        contexts = self.contexts(n_layers, n_heads)
        windows = torch.where(contexts < 0, _UNBOUNDED, (contexts - self.n_sink).clamp(min=0))
        return windows.view(n_layers, n_kv_heads, n_heads // n_kv_heads).amax(dim=-1)

    def score(self, ctx: LayerContext, state: None) -> torch.Tensor:
        return constant_scores(ctx, float("-inf"))
