"""The press contract: a small frozen dataclass that scores keys; the engine does the rest.

A press never evicts and never counts. The engine calls :meth:`Press.score` once per
(layer, chunk) with a :class:`LayerContext` holding what it captured for that layer, writes
the returned scores into its score buffer, and decides each key once, when the key leaves the
protected window (docs/DESIGN.md, "Eviction policies"). Higher score = keep.

A press writes its math once, as tensor code, with one state initializer: the same method runs
compiled and uncompiled. A one-method press is a dozen lines (workers/presses/knorm.py).
"""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, ClassVar

import torch

from workers.modeling.rope import LayerRotary


@dataclass(frozen=True)
class StateShape:
    """What a press's compiled-step state is sized by: its batch rows, the model, the cache length."""

    rows: int
    layers: int
    heads: int
    kv_heads: int
    head_dim: int
    positions: int
    device: torch.device
    # The model's attention module of each layer (None where the engine found none), for a press
    # whose state derives from the weights (CriticalKV's output projection); read in init_state only.
    attention_modules: tuple[torch.nn.Module | None, ...] = ()


@dataclass
class LayerContext:
    """What the engine gives a press for one layer and one chunk, sliced to the press's rows.

    Every chunk-dependent bound is a 0-d tensor and every shape is fixed by the execution path,
    so a press's :meth:`Press.score` is one piece of branch-free tensor code that runs unchanged
    compiled (the cache padded to a length bucket, every chunk padded to the chunk size) and
    uncompiled (the cache exactly as long as the document so far, the last chunk exact).

    Shapes: ``B`` rows of this press, ``Hkv`` kv-heads, ``H`` query heads, ``T`` key positions
    the step attends over (``positions``: 0..T-1; entries at or after ``end`` are not real yet),
    ``c`` query rows (those at or past ``end`` pad the document's last chunk), ``D`` head dim.
    """

    # 0-d int64, not an int: one compiled layer serves every layer (workers/engine/layer_work.py), so
    # nothing a press computes may specialize on which layer it is. Untraceable presses may int() it.
    layer: torch.Tensor
    start: torch.Tensor  # 0-d int64: first position of the chunk
    end: torch.Tensor  # 0-d int64: one past its last real position
    score_from: torch.Tensor  # 0-d int64: first position whose score a rescoring press must return
    positions: torch.Tensor  # [T] int64: key positions (0..T-1)
    query_positions: torch.Tensor  # [c] int64: start + 0..c-1
    # keys_at(positions [S]) -> [B, Hkv, S, D]: the post-RoPE keys (values) at those positions,
    # this chunk's already written. The cache holds what each config keeps (workers/engine/
    # cache.py), so a key the config evicted reads as zeros under the held cache (the masked cache
    # still stores it): a press that reads other keys than those it scores masks them by ``kept``.
    keys_at: Callable[[torch.Tensor], torch.Tensor]
    values_at: Callable[[torch.Tensor], torch.Tensor]
    kv_heads: int
    new_keys: torch.Tensor  # [B, Hkv, c, D] this chunk's keys
    new_values: torch.Tensor  # [B, Hkv, c, D] this chunk's values
    queries: torch.Tensor  # [B, H, c, D] post-RoPE
    doc_seed: torch.Tensor  # 0-d int64
    # [S] int64: the positions whose scores the press returns, S fixed per layer. The chunk's own
    # positions for a press that does not rescore; for one that does, ``score_from`` onward, as
    # many as can be undecided (clamped to T - 1: repeats, like positions at or past ``end``, are
    # ignored).
    scored: torch.Tensor | None = None
    # [B, Hkv, T] bool: the keys the config still holds (evicted: False), whichever the cache
    # (a masked cache still stores evicted keys, so keys_at alone cannot tell); positions at or
    # past ``end`` are not real. For a press whose score of one key reads the others (KeyDiff's
    # mean key).
    kept: torch.Tensor | None = None
    # With needs_attention: [B, H, q, T] probabilities of the press's q observing queries (the last
    # ``attention_queries`` real ones, or all c) over positions, zero for keys the config no longer
    # holds; rows that are not real queries all zero.
    attention: torch.Tensor | None = None
    attention_rows: torch.Tensor | None = None  # [q] bool: which attention rows are real queries
    prerope_queries: torch.Tensor | None = None  # [B, H, c, D] with needs_prerope_queries
    hidden_states: torch.Tensor | None = None  # [B, c, hidden] with needs_hidden_states
    rotary: LayerRotary | None = None
    # The model's attention module of this layer: only for presses that are not traceable (the
    # kvpress adapter calls its projections).
    module: torch.nn.Module | None = None
    # Per chunk, shared by every layer and press: for results that depend only on the chunk
    # (e.g. an averaged RoPE matrix per rotary), computed once instead of once per layer.
    chunk_memo: dict = dataclasses.field(default_factory=dict)

    @property
    def n_groups(self) -> int:
        """Query heads per kv-head (GQA group size)."""
        return self.queries.shape[1] // self.kv_heads

    @property
    def rows(self) -> int:
        """Batch rows of this press (B)."""
        return self.queries.shape[0]

    @property
    def real_queries(self) -> torch.Tensor:
        """[c] bool: query rows that are document positions (not the last chunk's padding)."""
        return self.query_positions < self.end


@dataclass(frozen=True)
class Press:
    """Base of every scorer. Subclasses add their parameters as typed dataclass fields."""

    name: ClassVar[str]
    # Thresholds used when the user gives none; ``(None,)`` for methods with no threshold.
    default_thresholds: ClassVar[tuple[float | None, ...]] = (None,)
    # True when the press recomputes scores of every undecided key each chunk (e.g.
    # accumulated attention); False when a key's score is fixed when the key arrives.
    rescores: ClassVar[bool] = False
    needs_attention: ClassVar[bool] = False
    # With needs_attention: probabilities of only the chunk's last N queries (None: all of them),
    # so a press that looks at a few queries does not pay for the whole chunk's.
    attention_queries: ClassVar[int | None] = None
    needs_prerope_queries: ClassVar[bool] = False
    needs_hidden_states: ClassVar[bool] = False
    # True when the score reads the keys or values of the positions it scores (ctx.keys_at): a
    # rescoring press then reads old keys, which a cache that drops evicted keys must still hold.
    reads_keys: ClassVar[bool] = False
    # The score a structural press gives every key (+inf: keeps all, -inf: keeps only its sinks and
    # protected window), None for one that scores: the held cache sizes itself by it.
    constant_score: ClassVar[float | None] = None
    # True for a press that scores the context from a replay of all of it before the first eviction
    # (KVzip): the engine's chunks cannot give that, so it runs only in question runs under
    # ``--protocol once``, bound per document to the replay's scores (workers/engine/replay.py).
    replays_context: ClassVar[bool] = False

    n_sink: int = 0
    # Method-specific local window (H2O's 512): keys inside it are protected, like the DMS window.
    protected_window: int = 0

    # False for a press whose score cannot be traced (the kvpress adapter calls a library's
    # Python; head statistics keep Python lists): its batches run the step uncompiled, and the run
    # names it once (orchestrator/sweep/compile_check.py).
    traceable: ClassVar[bool] = True

    def init_state(self, shape: StateShape) -> list[Any] | None:
        """Per-document state, created fresh for every document: None for a stateless press, else
        one entry per layer (``shape.layers`` of them), and :meth:`score` gets its layer's entry.

        An entry is tensors updated in place (a tensor, a tuple, or a dataclass registered with
        ``torch.utils._pytree.register_dataclass``) or a module, so the compiled step keeps no
        Python state between chunks, and, being per layer, so one compiled layer is reused by
        every layer: a state indexed by the layer inside ``score`` would specialize it."""
        return None

    def protected(self, window: int | torch.Tensor) -> int | torch.Tensor:
        """The window this press protects from eviction where the DMS window (or a head's own
        window) is ``window``: the larger of the two (a press's own local window, H2O's 512,
        widens it). The one place the rule is written: the spec's budget floor reads it for an
        int, the engine's per-(layer, kv-head) windows for a tensor."""
        if isinstance(window, torch.Tensor):
            return window.clamp(min=self.protected_window)
        return max(window, self.protected_window)

    def head_windows(self, n_layers: int, n_heads: int, n_kv_heads: int) -> torch.Tensor | None:
        """Per-(layer, kv-head) windows [n_layers, n_kv_heads] that *replace* the engine's DMS
        window for this press (head-aware windows), or None for the uniform DMS window.

        A window of ``w`` protects the ``w`` most recent positions before a chunk; older keys are
        decided by score (and sinks are kept). Replacing rather than widening lets a head be
        given less than the DMS window, which is what the head-aware ablation needs.
        """
        return None

    def score(self, ctx: LayerContext, state: Any) -> torch.Tensor:
        """Scores [B, Hkv, S] of positions ``ctx.scored``; those outside ``[score_from, end)``
        are ignored and may be anything. Branch-free tensor code (see :class:`LayerContext`)."""
        raise NotImplementedError(f"{self.name} defines no score")

    def first_stage(self, state: Any) -> tuple[float, torch.Tensor] | None:
        """(share, scores [B, Hkv, T]) for a press that selects in two stages (CriticalKV): under
        a ranked policy the top floor(share x limit) competing keys by these scores are kept
        before the rest of the limit goes by :meth:`score`. None (the default): one stage."""
        return None

    def params(self) -> dict[str, Any]:
        """The parameters that differ from the defaults: they label the config in the lake."""
        return {k: v for k, v in self.all_params().items() if v != self.__dataclass_fields__[k].default}

    def all_params(self) -> dict[str, Any]:
        """Every parameter that defines the press (fields excluded from equality are not)."""
        return {f.name: getattr(self, f.name) for f in dataclasses.fields(self) if f.compare}

    def label(self) -> str:
        """``name`` or ``name:k=v,...`` — the same grammar the CLI parses."""
        p = self.params()
        if not p:
            return self.name
        return self.name + ":" + ",".join(f"{k}={_fmt(v)}" for k, v in sorted(p.items()))

    def params_json(self) -> str:
        return json.dumps(self.all_params(), sort_keys=True)


def _fmt(value: Any) -> str:
    if isinstance(value, bool):
        return str(value).lower()
    return str(value)


def constant_scores(ctx: LayerContext, value: float) -> torch.Tensor:
    """Same score for every scored key: the structural presses (baseline, window, sinks)."""
    return torch.full((ctx.rows, ctx.kv_heads, ctx.scored.shape[0]), value, device=ctx.queries.device)
