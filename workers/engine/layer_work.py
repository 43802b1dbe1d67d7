"""One layer's work in one chunk: write the chunk's keys into the cache, attend over what each band
holds, let every press group score and decide (workers/engine/scoring.py), then let the held
bands drop what was just evicted.

The model calls kvorch's attention function once per layer (workers/modeling/attention.py); it
hands the layer's tensors to the chunk's ``LayerRun`` (workers/engine/step.py), which calls
:func:`layer_work` with the step's :class:`StepPlan`. Compiled, ``layer_work`` is a nested
compile region (``torch.compiler.nested_compile_region``): traced and compiled once, then stamped
out for every layer whose :class:`LayerFacts` are equal, so compiling costs one layer's work, not
one per layer. Everything that differs between layers
is either a tensor handed in (the layer's cache, keep mask, scores, press state, index) or a
constant among the facts (the attention variant, the rotary, each group's windows).
"""

from __future__ import annotations

from typing import Any

import torch

from workers.engine import cache, pool
from workers.engine.chunk_plan import ChunkBounds, LayerFacts, StepPlan
from workers.engine.scoring import BandView, GroupScoring, LayerTensors
from workers.modeling import attention
from workers.modeling.attention import AttentionVariant


def layer_work(
    plan: StepPlan, inputs: dict[str, Any], facts: LayerFacts, memo: dict
) -> tuple[torch.Tensor, torch.Tensor]:
    """One layer's work in one chunk. Returns (attention output [rows, c, H, D], keys held per
    config [B]). The cache, keep mask, scores and press states in ``inputs`` are written in place;
    ``memo``: results that depend only on the chunk, keyed by constants."""
    variant = AttentionVariant(facts.sliding_window, facts.softcap)
    bounds = ChunkBounds(
        inputs["index"],
        inputs["start"],
        inputs["end"],
        inputs["query_positions"],
        inputs["positions"],
        facts.shared,
        facts.deferred,
    )
    query, key, value = inputs["query"], inputs["key"], inputs["value"]
    span = bounds.positions.shape[0]
    bands = inputs["cache"]
    _write(plan, bands, key, value, bounds, inputs["overflow"])
    keep = inputs["keep"][:, :, :span]
    kept = _held_before(keep, bounds, variant, inputs["peak"])
    pattern_key = ("pattern", facts.sliding_window)
    if pattern_key not in memo:  # shared by every layer of this variant in the chunk
        memo[pattern_key] = attention.band(bounds.query_positions, bounds.positions, variant)  # [c, T]
    pattern = memo[pattern_key]
    out, views = _attend(plan, bands, query, key, value, keep, pattern, bounds, facts.scaling, variant)
    if bounds.shared:
        query = query.expand(plan.batch, -1, -1, -1)
        key, value = key.expand(plan.batch, -1, -1, -1), value.expand(plan.batch, -1, -1, -1)
    scores = inputs["scores"][:, :, :span]
    tensors = LayerTensors(query, key, value, keep, scores, views, pattern, facts.scaling, variant)
    scoring = GroupScoring(plan, bounds, memo, tensors, inputs, plan.rotaries[facts.rotary_id], facts.rotary_id)
    for i, group in enumerate(plan.groups):
        scoring.score_and_decide(
            group, inputs["press_states"][i], inputs["protected"][i], *facts.windows[i], facts.decide, facts.rank
        )
    for band, band_cache in zip(plan.bands, bands, strict=True):
        if isinstance(band_cache, pool.PoolCache):
            pool.compact(band_cache, keep[band.rows], span, facts.next_write, band.grows)
    return out.transpose(1, 2), kept


def _write(
    plan: StepPlan,
    bands: list[cache.LayerCache],
    key: torch.Tensor,
    value: torch.Tensor,
    bounds: ChunkBounds,
    overflow: torch.Tensor,
) -> None:
    """The chunk's keys and values into every band (a shared chunk's one row into every row); a
    held band that runs out of pages marks its rows in ``overflow``."""
    for band, band_cache in zip(plan.bands, bands, strict=True):
        rows = band.rows if not bounds.shared else slice(0, 1)
        size = (band.size, -1, -1, -1)
        band_key, band_value = key[rows].expand(size), value[rows].expand(size)
        if isinstance(band_cache, pool.PoolCache):
            overflow[band.rows].logical_or_(pool.write(band_cache, band_key, band_value, bounds.query_positions))
        else:
            cache.write(band_cache, band_key, band_value, bounds.query_positions)


def _held_before(
    keep: torch.Tensor, bounds: ChunkBounds, variant: AttentionVariant, peak: torch.Tensor
) -> torch.Tensor:
    """[B] the keys each config holds before the chunk (a sliding-window layer holds, uncompressed,
    only what its window sees); raises ``peak`` [B] (this layer's) to the most its kv-heads held
    together (what the layer's pool is sized by, learned by the engine)."""
    s, positions = bounds.start, bounds.positions
    before = keep & (positions < s)
    per_head = before.sum(dim=-1)  # [B, Hkv]: what each (row, kv-head) holds before the chunk
    peak.copy_(torch.maximum(peak, per_head.sum(dim=-1)))
    if variant.sliding_window:
        return (before & (positions >= s - variant.sliding_window + 1)).sum(dim=(1, 2))
    return per_head.sum(dim=-1)


def _attend(
    plan: StepPlan,
    bands: list[cache.LayerCache],
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    keep: torch.Tensor,
    pattern: torch.Tensor,
    bounds: ChunkBounds,
    scaling: float,
    variant: AttentionVariant,
) -> tuple[torch.Tensor, list[BandView]]:
    """Attention over what each band holds, band by band: ([rows, H, c, D], each band's view).
    A pool reads the chunk's own ``key``/``value`` [rows, kv-heads, c, D] apart from its pages."""
    span = bounds.positions.shape[0]
    if plan.backend == "flex" and plan.static:  # one full band (the masked cache: ChunkStep)
        full = bands[0]
        out = attention.flex_grouped_attention(
            query, full.keys[:, :, :span], full.values[:, :, :span], keep, bounds.index, scaling, variant
        )
        return out, [BandView(full, None, None)]
    # flex at exact shapes runs sdpa's math (FlexAttention pays only compiled)
    outs, views = [], []
    # A shared chunk is one forward row: band 0's first row holds what every row holds.
    for band, band_cache in zip(plan.bands[:1] if bounds.shared else plan.bands, bands, strict=False):
        rows = slice(0, 1) if bounds.shared else band.rows
        if isinstance(band_cache, pool.PoolCache):
            n_pages = pool.pages_in_use(band_cache, span, band.write)
            out, lse = pool.attend(
                band_cache, query[rows], key[rows], value[rows], bounds.query_positions, scaling, variant, n_pages
            )
            views.append(BandView(band_cache, None, None, lse, n_pages))
        else:
            held = cache.first_row(band_cache) if bounds.shared else band_cache
            seen = keep[rows][:, :, None, :] & pattern
            out, probs = cache.attend(held, query[rows], seen, scaling, plan.backend, variant)
            views.append(BandView(held, probs, seen))
        outs.append(out)
    return (outs[0] if len(outs) == 1 else torch.cat(outs)), views
