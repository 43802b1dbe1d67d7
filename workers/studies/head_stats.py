"""Per-(layer, query head) attention statistics of a document, measured inside the engine.

:class:`HeadStatsProbe` is a press that keeps every key (so the model runs exactly as the
baseline) and reads the attention probabilities the engine computes for presses that observe
attention. For each chunk (the bootstrap unit of ``kvorch heads analyze``) and every query at
position >= ``min_position`` it sums, per head:

- normalized entropy: H(p) / log(visible keys), 0 = one key, 1 = uniform;
- mean distance i - j (tokens) under p;
- sink mass: attention on the first ``n_sink`` positions;
- recent mass: attention on non-sink keys less than ``recent`` tokens back;
- the non-sink attention mass by distance bin (bin 0: distance 0; bin b: [2^(b-1), 2^b)), from
  which the smallest window holding all but a given share of attention is read.

Queries earlier than ``min_position`` are skipped: near the document start every key is
"recent", which would make every head look positional.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from workers.presses.base import LayerContext, Press, StateShape, constant_scores

N_DISTANCE_BINS = 21  # up to 2^20 tokens back
# Feature layout of the per-unit sums: these scalars, then the distance bins.
SCALAR_FEATURES = ("entropy", "mean_distance", "sink_mass", "recent_mass")
N_FEATURES = len(SCALAR_FEATURES) + N_DISTANCE_BINS


@dataclass
class HeadStatsState:
    """Sums per unit (chunk) and layer: [heads, N_FEATURES] each, and the queries they cover."""

    sums: dict[int, list[torch.Tensor]] = field(default_factory=dict)  # layer -> one tensor per unit
    queries: list[int] = field(default_factory=list)  # per unit
    n_kv_heads: int = 0

    def units(self, doc_id: str) -> DocumentHeadStats:
        layers = sorted(self.sums)
        if not layers:
            empty = torch.zeros(0, 0, 0, N_FEATURES, dtype=torch.float64)
            return DocumentHeadStats(doc_id, empty, torch.zeros(0, dtype=torch.float64), self.n_kv_heads)
        sums = torch.stack([torch.stack(self.sums[layer]) for layer in layers], dim=1).cpu()  # one copy per document
        return DocumentHeadStats(doc_id, sums, torch.tensor(self.queries, dtype=torch.float64), self.n_kv_heads)


@dataclass(frozen=True)
class DocumentHeadStats:
    """One document's statistics, ready to ship to the driver (tensors pickle through Ray)."""

    doc_id: str
    sums: torch.Tensor  # [units, layers, heads, N_FEATURES] float64
    queries: torch.Tensor  # [units] queries summed in each unit
    n_kv_heads: int


@dataclass(frozen=True)
class HeadStatsProbe(Press):
    """Measures, never evicts (every key scores +inf)."""

    name = "head_stats"
    needs_attention = True
    traceable = False

    n_sink: int = 4
    recent: int = 64
    min_position: int = 256

    def init_state(self, shape: StateShape) -> list[HeadStatsState]:
        """One state shared by every layer: the document's statistics, keyed by layer."""
        return [HeadStatsState()] * shape.layers

    def score(self, ctx: LayerContext, state: HeadStatsState) -> torch.Tensor:
        """Python lists of per-chunk sums: not traceable, so it runs uncompiled at exact shapes
        (query row i is position start + i, the keys are [0, end))."""
        state.n_kv_heads = ctx.kv_heads
        s, e = int(ctx.start), int(ctx.end)
        first = max(s, self.min_position)
        if first < e:
            probs = ctx.attention[0, :, first - s : e - s, :e].double()  # [H, q, end]
            layer = int(ctx.layer)
            state.sums.setdefault(layer, []).append(self.chunk_sums(probs, first))
            if layer == 0:
                state.queries.append(e - first)
        return constant_scores(ctx, float("inf"))

    def chunk_sums(self, probs: torch.Tensor, first: int) -> torch.Tensor:
        """[H, N_FEATURES] summed over the queries at positions first .. first + q - 1.

        Every feature but entropy is linear in p and depends on a key only through its distance
        (or its being a sink), so the non-sink mass is first summed by distance over all queries
        in one scatter: the full [H, q, end] tensor is touched a handful of times, not per feature.
        """
        h, q, end = probs.shape
        device = probs.device
        query_pos = torch.arange(first, first + q, device=device)
        visible_keys = (query_pos + 1).clamp(min=2).double()
        entropy = (-torch.special.xlogy(probs, probs).sum(-1) / visible_keys.log()).sum(-1)
        # Future keys have p = 0 exactly, so sending them to distance 0 adds nothing.
        distance = (query_pos[:, None] - torch.arange(self.n_sink, end, device=device)[None, :]).clamp(min=0)
        by_distance = torch.zeros(h, end, device=device, dtype=probs.dtype)
        by_distance.scatter_add_(-1, distance.flatten().expand(h, -1), probs[..., self.n_sink :].reshape(h, -1))
        sinks = probs[..., : self.n_sink]
        sink_distance = query_pos[:, None] - torch.arange(sinks.shape[-1], device=device)[None, :]
        d = torch.arange(end, device=device)
        mean_distance = (by_distance * d).sum(-1) + (sinks * sink_distance).sum((-1, -2))
        recent = by_distance[:, : self.recent].sum(-1)
        bin_of = torch.where(d > 0, d.clamp(min=1).double().log2().floor().long() + 1, 0).clamp(max=N_DISTANCE_BINS - 1)
        bins = torch.zeros(h, N_DISTANCE_BINS, device=device, dtype=probs.dtype)
        bins.scatter_add_(-1, bin_of.expand(h, -1), by_distance)
        scalars = torch.stack([entropy, mean_distance, sinks.sum((-1, -2)), recent], dim=-1)  # [H, 4]
        return torch.cat([scalars, bins], dim=-1)


def recommended_window(distance_mass: torch.Tensor, tail: float, longest: int) -> torch.Tensor:
    """Smallest power-of-two window (>= 8) leaving at most ``tail`` of the attention outside it.

    ``distance_mass`` [..., N_DISTANCE_BINS] is mean mass per query by distance bin; a window w =
    2^k covers bins 0..k. A head whose window would reach ``longest`` (the farthest distance
    analysed) needs the full context: -1.
    """
    beyond = distance_mass.flip(-1).cumsum(-1).flip(-1)  # beyond[..., b] = mass in bins >= b
    ks = torch.arange(3, N_DISTANCE_BINS - 1)
    fits = beyond[..., ks + 1] <= tail  # [..., len(ks)]
    k = ks[fits.float().argmax(-1)]  # first k that fits (argmax of the first True)
    window = 2**k
    return torch.where(fits.any(-1) & (window < longest), window, -1)
