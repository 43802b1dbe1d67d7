"""What the chunk step's code reads besides tensors, in four scopes:

- :class:`StepPlan`: the batch's facts, fixed for the step: its bands, press groups, kernel;
- :class:`GroupPlan`: one press group's facts, fixed for the step (a compiled graph specializes on
  its Python values once);
- :class:`ChunkBounds`: one chunk's bounds, as 0-d tensors (static shapes compute them inside the
  graph) plus the one static fact of a shared chunk;
- :class:`LayerFacts`: one layer's constants inside a chunk; a compiled layer region is reused by
  every layer whose facts are equal (workers/engine/layer_work.py).

Names: ``chunk_size`` is the chunk's length in tokens, ``index`` the chunk's number in the
document, ``start``/``end`` its bounds; nothing here is called just "chunk".
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, NamedTuple

import torch

from workers.engine import cache
from workers.engine.layout import RowGroup


@dataclass
class GroupPlan:
    """What the step knows of one press group: Python values per layer and constant tensors."""

    group: RowGroup
    rows: slice
    n_sink: int
    rescores: bool
    ranked: bool  # ratio or budget policy: keys ranked by score against a keep limit
    widest: list[int]  # per layer: the widest protected window (clamped to N)
    narrowest: list[int]
    protected: torch.Tensor  # [layers, kv-heads, 1] int64 on the device
    attention_queries: int  # observing queries per chunk (needs_attention)
    band: int  # which band of the cache holds the group's rows (workers/engine/cache.py)
    local: slice  # the group's rows within that band


@dataclass
class ChunkBounds:
    """One chunk's bounds as the step's code sees them: tensors, plus the static shape facts."""

    index: torch.Tensor  # 0-d int64: the chunk's number in the document
    start: torch.Tensor  # 0-d int64
    end: torch.Tensor  # 0-d int64: one past the last real position
    query_positions: torch.Tensor  # [c] int64
    positions: torch.Tensor  # [T] int64: the key positions attended over (0..T-1)
    # One forward row for every config: no key can have been evicted yet (exact shapes only).
    shared: bool = False
    # Positions before ``start`` run since the policy last decided (chunks that only scored: a
    # question read after the compressed part, a frozen generation); the keys that left the
    # window over them are decided with this chunk's. 0 but there (exact shapes only).
    deferred: int = 0

    @property
    def decided_from(self) -> torch.Tensor:
        """Where the positions run since the last decision start (``start`` but after deferrals)."""
        return self.start - self.deferred if self.deferred else self.start


class Span(NamedTuple):
    """One chunk of a document as the host plans it: positions [start, end), and whether the
    policy decides after it (False: its keys are scored, and the keys that leave the window are
    decided by the next chunk that decides: a question read after a context compressed once)."""

    start: int
    end: int
    decide: bool = True


class LayerFacts(NamedTuple):
    """One layer's constants in one chunk: what a compiled layer region specializes on. A layer
    that differs in any of them gets a region of its own, never a wrong one."""

    sliding_window: int | None
    softcap: float | None
    rotary_id: int  # index into ChunkStep.rotaries (layers of one rotary share it)
    shared: bool  # the chunk is one forward row for every config (ChunkBounds.shared)
    scaling: float
    windows: tuple[tuple[int, int], ...]  # per press group: (narrowest, widest) protected window
    # Decide after scoring (False: score only, the decisions wait for the next chunk that decides).
    decide: bool = True
    deferred: int = 0  # ChunkBounds.deferred
    # Ranked groups re-apply their keep limit (False: a decoding step between two of
    # --decode-interval's, where only thresholds decide the keys leaving their window).
    rank: bool = True
    # Keys the next chunk writes per (row, kv-head): the room a pool lays each segment out with
    # (workers/engine/pool.py); the chunk size, or a question's next span, or 1 while decoding.
    next_write: int = 1


@dataclass
class StepPlan:
    """The batch's facts that one layer's work reads (workers/engine/layer_work.py and
    workers/engine/scoring.py), fixed for the step's life: built once by the step."""

    batch: int  # rows of the forward: one per config
    n_kv_heads: int
    bands: list[cache.Band | cache.PoolBand]
    groups: list[GroupPlan]
    backend: str  # the attention kernel (--attn)
    static: bool  # static shapes: padded chunks, bounds as tensors (what torch.compile traces)
    rotaries: list[Any]  # each distinct LayerRotary once (LayerFacts.rotary_id indexes it)
