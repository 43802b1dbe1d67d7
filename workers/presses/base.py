"""The press contract: a small frozen dataclass that scores keys; the engine does the rest.

A press never evicts and never counts. The engine calls :meth:`Press.score` once per
(layer, chunk) with a :class:`LayerContext` holding what it captured for that layer, writes
the returned scores into its score buffer, and decides each key once, when the key leaves the
protected window (docs/DESIGN.md, "Eviction policies"). Higher score = keep.
"""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass
from typing import Any, ClassVar

import torch

from workers.rope import LayerRotary


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


@dataclass
class ChunkTensors:
    """What the compiled chunk step (workers/chunk_step.py) gives a press for one layer: the same
    facts as :class:`LayerContext`, with every chunk-dependent bound a tensor, so one traced graph
    serves every chunk and document.

    Keys are the whole preallocated cache (``N`` positions, padded past the document; entries at
    or after ``end`` are not real yet). The chunk has a static ``c`` query rows; those at or past
    ``end`` pad the document's last chunk and must not count. Shapes as in LayerContext.
    """

    layer: int
    start: torch.Tensor  # 0-d int64: first position of the chunk
    end: torch.Tensor  # 0-d int64: one past its last real position
    score_from: torch.Tensor  # 0-d int64: first position whose score a rescoring press must return
    positions: torch.Tensor  # [N] int64: key positions (0..N-1)
    query_positions: torch.Tensor  # [c] int64: start + 0..c-1 (pad rows past ``end``)
    keys: torch.Tensor  # [B, Hkv, N, D] post-RoPE keys, this chunk's already written
    values: torch.Tensor  # [B, Hkv, N, D]
    new_keys: torch.Tensor  # [B, Hkv, c, D] this chunk's keys
    queries: torch.Tensor  # [B, H, c, D] post-RoPE
    doc_seed: torch.Tensor  # 0-d int64
    # [S] int64: the positions whose scores the press returns, S static. The chunk's own positions
    # for a press that does not rescore; for one that does, ``score_from`` onward, as many as can
    # be undecided (clamped to N - 1: repeats, like positions at or past ``end``, are ignored).
    scored: torch.Tensor | None = None
    # With needs_attention: [B, H, q, N] probabilities of the press's q observing queries (the last
    # ``attention_queries`` real ones, or all c), rows that are not real queries all zero.
    attention: torch.Tensor | None = None
    attention_rows: torch.Tensor | None = None  # [q] bool: which attention rows are real queries
    prerope_queries: torch.Tensor | None = None  # [B, H, c, D] with needs_prerope_queries
    hidden_states: torch.Tensor | None = None  # [B, c, hidden] with needs_hidden_states
    rotary: LayerRotary | None = None

    @property
    def n_groups(self) -> int:
        return self.queries.shape[1] // self.keys.shape[1]

    @property
    def real_queries(self) -> torch.Tensor:
        """[c] bool: query rows that are document positions (not the last chunk's padding)."""
        return self.query_positions < self.end


@dataclass
class LayerContext:
    """What the engine captured for one layer and one chunk, sliced to one press's batch rows.

    Shapes: ``B`` rows of this press, ``Hkv`` kv-heads, ``H`` query heads, ``c`` chunk
    length, ``D`` head dim. Positions are absolute document positions.
    """

    layer: int
    start: int  # first position of the chunk
    end: int  # one past the last position of the chunk
    score_from: int  # first position whose score the press must return
    # [B, Hkv, end - keys_from, D] post-RoPE keys of positions [keys_from, end): read them with
    # keys_at/values_at, which index by absolute position.
    keys: torch.Tensor
    values: torch.Tensor  # [B, Hkv, end - keys_from, D]
    queries: torch.Tensor  # [B, H, c, D] post-RoPE queries of the chunk
    visible: torch.Tensor  # [B, Hkv, end] bool: keys the chunk's queries could attend to
    doc_seed: int  # deterministic per document, for seeded presses
    # [B, H, q, end] attention probabilities of the chunk's last q queries (q = the press's
    # `attention_queries`, or c); only when the press sets `needs_attention`.
    attention: torch.Tensor | None = None
    # [B, H, c, D] queries before RoPE; only when the press sets `needs_prerope_queries`.
    prerope_queries: torch.Tensor | None = None
    # The model's attention module of this layer (for adapters that call its projections).
    module: torch.nn.Module | None = None
    # [B, c, hidden] input of the attention module; only when the press sets `needs_hidden_states`.
    hidden_states: torch.Tensor | None = None
    # This layer's RoPE: rotary(positions) -> (cos, sin) [len(positions), rotary_dim] of the
    # model's own rotary embedding (per layer type), plus its pairing (unrotate, mean_rotation).
    rotary: LayerRotary | None = None
    # First position whose key and value are held: 0 with the masked cache; with --compact the
    # first undecided position (earlier keys may have been evicted, and are really gone).
    keys_from: int = 0

    def keys_at(self, lo: int, hi: int) -> torch.Tensor:
        """Keys of absolute positions [lo, hi): [B, Hkv, hi - lo, D]."""
        return self._held(self.keys, lo, hi)

    def values_at(self, lo: int, hi: int) -> torch.Tensor:
        """Values of absolute positions [lo, hi): [B, Hkv, hi - lo, D]."""
        return self._held(self.values, lo, hi)

    def _held(self, tensor: torch.Tensor, lo: int, hi: int) -> torch.Tensor:
        if lo < self.keys_from:
            raise ValueError(
                f"this press reads keys from position {lo}, but --compact holds only keys from position "
                f"{self.keys_from} on (earlier ones may have been evicted); run it without --compact"
            )
        return tensor[:, :, lo - self.keys_from : hi - self.keys_from]

    @property
    def n_groups(self) -> int:
        """Query heads per kv-head (GQA group size)."""
        return self.queries.shape[1] // self.keys.shape[1]


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
    # rescoring press then reads old keys, which --compact may have dropped (EvalConfig.needs_evicted_keys).
    reads_keys: ClassVar[bool] = False
    # Whether `--methods all` includes the method (False for presses with required parameters).
    in_all: ClassVar[bool] = True

    n_sink: int = 0
    # Method-specific local window (H2O's 512): keys inside it are protected, like the DMS window.
    protected_window: int = 0

    def init_state(self, n_rows: int, n_layers: int, n_kv_heads: int, n_positions: int, device: torch.device) -> Any:
        """Per-document state, created fresh for every document (stateless presses: None)."""
        return None

    @property
    def in_graph(self) -> bool:
        """Whether the press has a tensor form (:meth:`score_chunk`), so its batches run in the one
        compiled chunk step; presses without one (the kvpress adapter, a user's press that only
        defines ``score``) run on the eager per-layer engine."""
        return type(self).score_chunk is not Press.score_chunk

    def head_windows(self, n_layers: int, n_heads: int, n_kv_heads: int) -> torch.Tensor | None:
        """Per-(layer, kv-head) windows [n_layers, n_kv_heads] that *replace* the engine's DMS
        window for this press (head-aware windows), or None for the uniform DMS window.

        A window of ``w`` protects the ``w`` most recent positions before a chunk; older keys are
        decided by score (and sinks are kept). Replacing rather than widening lets a head be
        given less than the DMS window, which is what the head-aware ablation needs.
        """
        return None

    def score(self, ctx: LayerContext, state: Any) -> torch.Tensor:
        """Scores of positions ``[ctx.score_from, ctx.end)``: shape [B, Hkv, end - score_from]."""
        raise NotImplementedError

    def init_chunk_state(self, shape: StateShape) -> Any:
        """State for :meth:`score_chunk`: tensors only, updated in place, so the compiled step keeps
        no Python state between chunks (stateless presses: None)."""
        return None

    def score_chunk(self, ctx: ChunkTensors, state: Any) -> torch.Tensor:
        """The same scores as :meth:`score`, as branch-free tensor code for the compiled step:
        [B, Hkv, S], the scores of positions ``ctx.scored`` (those outside ``[score_from, end)``
        are ignored and may be anything)."""
        raise NotImplementedError(f"{self.name} has no tensor form")

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
    b, h = ctx.keys.shape[:2]
    return torch.full((b, h, ctx.end - ctx.score_from), value, device=ctx.keys.device)


def constant_chunk_scores(ctx: ChunkTensors, value: float) -> torch.Tensor:
    """:func:`constant_scores` in the compiled step's shapes."""
    b, h = ctx.keys.shape[:2]
    return torch.full((b, h, ctx.scored.shape[0]), value, device=ctx.keys.device)
