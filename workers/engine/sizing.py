"""The held cache's pools for one batch: per press group, per layer and row, the pages its
(row, kv-head)s may fill (workers/engine/pool.py), from the bounds of workers/engine/capacity.py.

Per row and layer, the keys the layer's kv-heads hold together at most:
- the ratio and budget policies: the keep limit at the document's end (it only grows with the
  chunk's end), or the floor (sinks + protected window) where larger, for every head under
  ``uniform`` and ``adakv`` (AdaKV moves a layer's budget between its heads, never adds to it);
  under ``pyramidkv`` the layer's own budget (the largest over every chunk end: the schedule
  reshapes as the document grows), under ``file`` each head's share of it;
- a press that keeps only its floor, or everything: that;
- the threshold policy: learned, per layer, from the documents the engine ran before
  (``densities``: the most the layer's heads held together, as a fraction of the document): the
  floor plus LEARNED_MARGIN x what the scores kept beyond it. A config not run yet starts with
  an empty pool that grows between chunks (exact shapes), or holds every position (static
  shapes, and question runs).

A group whose every row may hold every position is a full band instead (no pool to manage).
"""

from __future__ import annotations

import torch

from workers.contract.configs import RANKED_POLICIES, EvalConfig
from workers.engine import allocation, cache, capacity
from workers.engine.decisions import keep_limit
from workers.engine.layout import DocumentLayout, RowGroup


def group_pools(
    layout: DocumentLayout,
    n_positions: int,
    write: int,
    densities: dict[str, list[float]],
    static: bool,
    full: bool,
    grow: bool = False,
) -> list[cache.PoolBand | None]:
    """Each press group's pool, None for a group that holds every position (and for every group
    when ``full``: the masked cache). ``write``: the most keys a (row, kv-head) writes between
    two decisions; ``static``: one pool size for every layer (the largest layer's, rounded to few
    sizes: a layer of another shape would be a compiled region of its own); ``grow``
    (exact shapes): a pool whose keys' scores decide what it holds (the threshold policy) starts
    empty and grows between chunks to what it holds (ChunkStep.grow_pools), instead of every
    position or what its configs held in earlier documents."""
    if full:
        return [None] * len(layout.groups)
    pools: list[cache.PoolBand | None] = []
    for group in layout.groups:
        configs = layout.configs[group.rows]
        # a growing pool starts empty for the configs whose scores decide, whatever they held
        # before, so what it holds is the document's alone (a rerun elsewhere reads the same bytes)
        learned = {} if grow else densities
        totals = [_layer_totals(layout, group, config, n_positions, learned) for config in configs]
        scored = any(_scores_decide(group, config) for config in configs)
        everything = layout.n_kv_heads * n_positions
        if not grow:
            totals = [[everything] * layout.n_layers if total is None else total for total in totals]
        if all(total is not None and min(total) >= everything for total in totals):
            pools.append(None)
            continue
        grows = grow and scored
        page = _page_size(totals, layout, n_positions, write, 8 if static else 4)
        allotted = tuple(
            tuple(
                capacity.pages_for(0 if row is None else row[layer], layout.n_kv_heads, write, page) for row in totals
            )
            for layer in range(layout.n_layers)
        )
        if static:  # one size for every layer: layers of one shape share one compiled region
            pages = (capacity.rounded(max(map(sum, allotted))),) * layout.n_layers
        else:
            pages = tuple(map(sum, allotted))
        pools.append(cache.PoolBand(group.rows, allotted, pages, page, write, grows))
    return pools


def _page_size(totals: list[list[int] | None], layout: DocumentLayout, n: int, write: int, min_pages: int) -> int:
    """The group's page size, from what an owner holds on average over its rows and layers; a
    growing pool's rows (``None``: nothing learned yet) are taken to hold an eighth of the
    document (a threshold's typical density, in the figures of BENCHMARKS.md)."""
    guess = [layout.n_kv_heads * (n // 8)] * layout.n_layers
    held = sum(sum(guess if row is None else row) for row in totals)
    return capacity.page_size(held // layout.n_layers, len(totals) * layout.n_kv_heads, write, min_pages)


def _layer_totals(
    layout: DocumentLayout,
    group: RowGroup,
    config: EvalConfig,
    n: int,
    densities: dict[str, list[float]],
) -> list[int] | None:
    """Per layer, the most keys the config's kv-heads hold together once a chunk is decided (a
    learned bound); None for a threshold config never run (the scores decide, and
    nothing is learned yet)."""
    press, kv_heads, n_layers = group.press, layout.n_kv_heads, layout.n_layers
    floor = press.n_sink + int(group.windows.protected.max())
    if config.policy in RANKED_POLICIES:
        limit = capacity.policy_bound(config.policy, 1.0 - (config.ratio or 0.0), config.budget, None, None, 0, n)
        heads_by_layer = _head_limits(group, config, limit, n, floor)
        return [sum(min(n, max(floor, head)) for head in heads) for heads in heads_by_layer]
    bound = capacity.policy_bound(config.policy, 1.0, None, config.threshold, press.constant_score, floor, n)
    if bound is not None:
        return [kv_heads * bound] * n_layers
    learned = densities.get(config.label)
    if learned is None:
        return None
    return [kv_heads * capacity.learned_bound(density, floor, n) for density in learned]


def scores_decide(layout: DocumentLayout) -> list[EvalConfig]:
    """The batch's configs whose keys' scores, not the policy, decide how many they hold (threshold
    configs of presses that score): the ones whose pools are learned."""
    return [c for g in layout.groups for c in layout.configs[g.rows] if _scores_decide(g, c)]


def _scores_decide(group: RowGroup, config: EvalConfig) -> bool:
    if config.policy in RANKED_POLICIES:
        return False
    return capacity.policy_bound(config.policy, 1.0, None, config.threshold, group.press.constant_score, 0, 1) is None


def _head_limits(group: RowGroup, config: EvalConfig, limit: int, n: int, floor: int) -> list[list[int]]:
    """[layers][kv-heads] the most each head keeps under the group's allocation when the uniform
    limit at the document's end is ``limit``."""
    n_layers, kv_heads = group.windows.protected.shape
    if group.allocation.kind == "pyramidkv":
        ends = torch.arange(1, n + 1, dtype=torch.int64)  # the schedule at every chunk end
        keep_fraction = torch.tensor(1.0 - (config.ratio or 0.0), dtype=torch.float64)
        budget = torch.tensor(config.budget or torch.iinfo(torch.int64).max)
        limits = keep_limit(keep_fraction, budget, ends)
        beta = group.allocation.beta
        per_layer = [
            int(allocation.pyramid_limit(limits, ends, floor, torch.tensor(layer), n_layers, beta).max())
            for layer in range(n_layers)
        ]
        return [[budget] * kv_heads for budget in per_layer]
    if group.shares is not None:
        shares = group.shares.cpu()
        return [[round(limit * float(share)) for share in layer] for layer in shares]
    return [[limit] * kv_heads for _ in range(n_layers)]
