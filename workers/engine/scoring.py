"""Scoring and deciding: each press group's scores and keep decisions at one layer in one chunk.

A press scores the keys it is asked to (the chunk's new keys, or every undecided one for a press
that rescores) from a :class:`~workers.presses.LayerContext`; the group's policy then decides the
keys that just left its protected window (workers/engine/decisions.py: a threshold, or a keep
limit under ratio and budget). Everything is written in place into the layer's scores and
keep-mask, so the held cache can drop what was evicted right after (workers/engine/layer_work.py).
"""

from __future__ import annotations

import functools
from dataclasses import dataclass
from typing import Any

import torch

from workers.engine import cache, pool
from workers.engine.allocation import head_limits
from workers.engine.chunk_plan import ChunkBounds, GroupPlan, StepPlan
from workers.engine.decisions import (
    decide_by_budget,
    decide_by_layer_budget,
    decide_by_threshold,
    keep_limit,
    leaving_window,
)
from workers.modeling import attention
from workers.modeling.attention import AttentionVariant
from workers.presses import LayerContext


@dataclass
class BandView:
    """What one band's attention produced this chunk (for a shared chunk, band 0's first row,
    which holds what every row holds): the cache it read; for a full band the probabilities over
    its positions when the eager math ran and which positions each query saw (None under
    FlexAttention); for a pool the log-sum-exp of each query and the pages read, from which
    probabilities are recomputed for the queries a press observes."""

    cache: cache.LayerCache
    probs: torch.Tensor | None  # [R, H, c, S]
    seen: torch.Tensor | None  # [R, Hkv, c, S]
    lse: torch.Tensor | None = None  # [owners, G*c] float32 (a pool)
    n_pages: int = 0


@dataclass
class LayerTensors:
    """What one layer's attention hands every press group in this chunk."""

    query: torch.Tensor  # [B, H, c, D]
    new_keys: torch.Tensor  # [B, Hkv, c, D]
    new_values: torch.Tensor
    keep: torch.Tensor  # [B, Hkv, T] bool, a view of the layer's keep-mask (written in place)
    scores: torch.Tensor  # [B, Hkv, T] float32, a view of the layer's scores (written in place)
    views: list[BandView]  # per band (one for a shared chunk)
    pattern: torch.Tensor  # [c, T] causal (and sliding-window) band
    scaling: float
    variant: AttentionVariant


@dataclass
class GroupScoring:
    """Each press group's scoring and keep decisions at one layer in one chunk. ``memo`` holds
    results that depend only on the chunk (shared by every group, and uncompiled by every layer)."""

    step_plan: StepPlan
    bounds: ChunkBounds
    memo: dict
    t: LayerTensors
    inputs: dict[str, Any]  # the layer region's tensors (workers/engine/layer_work.py)
    rotary: Any  # the layer's LayerRotary
    rotary_id: int

    def score_and_decide(
        self,
        plan: GroupPlan,
        press_state: Any,
        protected: torch.Tensor,
        narrowest: int,
        widest: int,
        decide: bool,
        rank: bool = True,
    ) -> None:
        """Score the chunk's keys (or every candidate, for a press that rescores), then, when
        ``decide``, decide the keys that left the window since the last decision (a ranked group
        only when ``rank``: its limit is re-applied every --decode-interval generated tokens)."""
        bounds, t = self.bounds, self.t
        score_from, scored = self._scored(plan, widest)
        press = plan.group.press
        # Positions in ``scored`` are distinct and start at score_from; those at or past ``end``
        # (future keys, a padded chunk's rows) get scores that are rewritten before any rule reads them.
        scores, keep = t.scores[plan.rows], t.keep[plan.rows]
        scores.index_copy_(2, scored, press.score(self._context(plan, score_from, scored), press_state).float())
        if not decide:
            return
        group = plan.group
        if plan.ranked:
            if not rank:
                return
            limit = keep_limit(group.keep_fraction, group.budgets, bounds.end)
            args = (keep, scores, bounds.positions, bounds.end, narrowest)
            if group.allocation.kind == "adakv":
                decide_by_layer_budget(*args, limit, plan.n_sink, group.allocation.alpha_safeguard)
                return
            floor = plan.n_sink + narrowest  # the keys a head always keeps (ranked: one window)
            layer = self.inputs["layer"]
            limit = head_limits(group.allocation, group.shares, limit, bounds.end, floor, layer, len(plan.widest))
            decide_by_budget(*args, limit, plan.n_sink, press.first_stage(press_state))
        else:
            leaving = self._leaving(narrowest, widest, protected)
            decide_by_threshold(keep, scores, leaving, group.thresholds, self._sinks(plan.n_sink))

    def _scored(self, plan: GroupPlan, widest: int) -> tuple[torch.Tensor, torch.Tensor]:
        """(the first position scored, the positions scored): the chunk's new keys, or every key
        still a candidate for a press that rescores."""
        bounds = self.bounds
        s, positions = bounds.start, bounds.positions
        if not plan.rescores:
            return s, bounds.query_positions
        if plan.ranked:  # every kept key stays a candidate under a keep limit, so all are rescored
            return torch.zeros_like(s), positions
        # keys older than the widest window were decided after earlier chunks, in every head
        span = positions.shape[0]
        score_from = (bounds.decided_from - widest).clamp(min=0)
        n_scored = min(span, widest + bounds.deferred + bounds.query_positions.shape[0])
        return score_from, (score_from + torch.arange(n_scored, device=s.device)).clamp(max=span - 1)

    def _context(self, plan: GroupPlan, score_from: torch.Tensor, scored: torch.Tensor) -> LayerContext:
        """What the press may read to score: the group's own held keys, the chunk's queries, and
        only what the press asks for (attention, pre-rotary queries, hidden states, the module)."""
        step_plan, bounds, rows, t = self.step_plan, self.bounds, plan.rows, self.t
        press = plan.group.press
        attention_probs = attention_rows = None
        if press.needs_attention:
            attention_probs, attention_rows = self._attention(plan)
        prerope = None
        if press.needs_prerope_queries:
            prerope = self.rotary.unrotate(t.query[rows], *self._chunk_rope())
        held = self.inputs["cache"][plan.band]
        if isinstance(held, pool.PoolCache):  # a pool is one group's
            keys_at, values_at = (functools.partial(pool.keys_at, held, t) for t in (held.keys, held.values))
        else:  # the group's own rows of a full band
            keys, values = held.keys[plan.local], held.values[plan.local]
            keys_at, values_at = (functools.partial(cache.keys_at, held, t) for t in (keys, values))
        hidden = self.inputs["hidden"]
        if hidden is not None and bounds.shared:
            hidden = hidden.expand(step_plan.batch, -1, -1)
        return LayerContext(
            layer=self.inputs["layer"],
            start=bounds.start,
            end=bounds.end,
            score_from=score_from,
            positions=bounds.positions,
            query_positions=bounds.query_positions,
            keys_at=keys_at,
            values_at=values_at,
            kv_heads=step_plan.n_kv_heads,
            new_keys=t.new_keys[rows],
            new_values=t.new_values[rows],
            queries=t.query[rows],
            doc_seed=self.inputs["doc_seed"],
            scored=scored,
            kept=t.keep[plan.rows],
            attention=attention_probs,
            attention_rows=attention_rows,
            prerope_queries=prerope,
            hidden_states=hidden[rows] if press.needs_hidden_states else None,
            rotary=self.rotary,
            module=None if press.traceable else self.inputs["module"],
            chunk_memo=self.memo,
        )

    def _observers(self, q: int) -> tuple[torch.Tensor, torch.Tensor]:
        """([q] query rows, [q] which are real): the chunk's last q real queries (rows of a padded
        last chunk that are not real point at row 0 and are zeroed). Once per chunk and q."""
        key = ("observers", q)
        if key not in self.memo:
            bounds = self.bounds
            index = (bounds.end - bounds.start) - q + torch.arange(q, device=bounds.start.device)
            self.memo[key] = (index.clamp(min=0), index >= 0)
        return self.memo[key]

    def _band_rows(self, tensor: torch.Tensor, plan: GroupPlan) -> torch.Tensor:
        """The group's rows of a band view's tensor (a shared chunk's one row, broadcast)."""
        if self.bounds.shared:
            return tensor[:1].expand(plan.rows.stop - plan.rows.start, *tensor.shape[1:])
        return tensor[plan.local]

    def _attention(self, plan: GroupPlan) -> tuple[torch.Tensor, torch.Tensor]:
        """([R, H, q, T] probabilities of the press's q observing queries over positions, [q] which
        are real): the last q real queries of the chunk; rows that are not real are zero."""
        t = self.t
        q = min(plan.attention_queries, self.bounds.query_positions.shape[0])  # exact shapes: no pad rows
        index, real = self._observers(q)
        view = t.views[0 if self.bounds.shared else plan.band]
        if isinstance(view.cache, pool.PoolCache):
            chosen = self._pool_attention(view, plan, index)
        elif view.probs is not None:
            chosen = self._band_rows(view.probs, plan).index_select(2, index)
        else:
            if view.seen is not None:
                seen = self._band_rows(view.seen, plan).index_select(2, index)
            else:  # flex computed no mask
                seen = t.keep[plan.rows, :, None, :] & t.pattern.index_select(0, index)
            n = seen.shape[-1]
            keys = self._band_rows(view.cache.keys, plan)[:, :, :n]
            chosen = attention.attention_probabilities(
                t.query[plan.rows].index_select(2, index), keys, seen, t.scaling, t.variant
            )
        if self.step_plan.static:  # only a padded last chunk has observer rows that are not real
            chosen = chosen * real[:, None].to(chosen.dtype)
        return chosen, real

    def _pool_attention(self, view: BandView, plan: GroupPlan, index: torch.Tensor) -> torch.Tensor:
        """[R, H, q, T] probabilities over positions of the group's observing queries (``index``),
        recomputed over its pool from the log-sum-exp its attention kept (a shared chunk's one
        row, broadcast)."""
        t, bounds = self.t, self.bounds
        rows = 1 if bounds.shared else plan.rows.stop - plan.rows.start
        query = t.query[plan.rows][:rows].index_select(2, index)
        owners, width = view.lse.shape
        lse = view.lse.view(owners, width // bounds.query_positions.shape[0], -1).index_select(2, index)
        probs = pool.probabilities(
            view.cache, query, bounds.query_positions.index_select(0, index), lse.reshape(owners, -1),
            t.scaling, t.variant, view.n_pages, t.keep.shape[-1],
        )  # fmt: skip
        return probs.expand(plan.rows.stop - plan.rows.start, -1, -1, -1)

    def _leaving(self, narrowest: int, widest: int, protected: torch.Tensor) -> torch.Tensor:
        """Keys that left the group's protected window since the last decision (in this chunk but
        after chunks that only scored): [T] for a window shared by every
        kv-head (once per chunk and window), [kv-heads, T] for per-head windows (``protected``)."""
        bounds = self.bounds
        if narrowest != widest:
            return leaving_window(bounds.positions, bounds.decided_from, bounds.end, protected)
        key = ("leaving", narrowest)
        if key not in self.memo:
            self.memo[key] = leaving_window(bounds.positions, bounds.decided_from, bounds.end, narrowest)
        return self.memo[key]

    def _sinks(self, n_sink: int) -> torch.Tensor:
        """[T] the document's first ``n_sink`` positions, always kept (once per chunk)."""
        key = ("sinks", n_sink)
        if key not in self.memo:
            self.memo[key] = self.bounds.positions < n_sink
        return self.memo[key]

    def _chunk_rope(self) -> tuple[torch.Tensor, torch.Tensor]:
        """(cos, sin) of the chunk's query positions under the layer's rotary (once per chunk)."""
        key = ("rope", self.rotary_id)
        if key not in self.memo:
            self.memo[key] = self.rotary(self.bounds.query_positions)
        return self.memo[key]
