"""Q-Filters measured from a model's own queries (workers/presses/qfilter.py reads them).

:class:`QueryMomentsProbe` is a press that keeps every key (the model runs as the baseline) and
sums, per layer and query head, the post-RoPE queries' outer products q q^T and the queries
themselves over a document's real positions. Over a corpus, the first eigenvector u of the
summed q q^T is the head's first right singular vector; signed so the mean query projects
positively on it, the group's directions are averaged per kv-head and stored as f = -u in
kvpress's ``QFilters`` format (``q_filters`` [layers, kv-heads, head_dim] in ``model.safetensors``).
"""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import save_file

from workers.presses.base import LayerContext, Press, StateShape, constant_scores
from workers.presses.qfilter import WEIGHTS_FILE

# Engine.observe: (document id, token ids, probe) -> the probe's final state (studies sit beside the
# engine, so they take it as a callable rather than import it).
Observe = Callable[[str, torch.Tensor, Any], Any]


@dataclass
class QueryMoments:
    """Per layer: summed q q^T [H, D, D] and q [H, D] in float64 (layer -> tensors); the model's
    kv-heads, which group the query heads' directions into filters."""

    outer: dict[int, torch.Tensor] = field(default_factory=dict)
    total: dict[int, torch.Tensor] = field(default_factory=dict)
    kv_heads: int = 0

    def cpu(self) -> QueryMoments:
        """These moments on the CPU: what an actor sends back to the driver."""
        return QueryMoments(
            {k: v.cpu() for k, v in self.outer.items()}, {k: v.cpu() for k, v in self.total.items()}, self.kv_heads
        )

    def add(self, other: QueryMoments) -> None:
        """Sum ``other`` (another document's moments) into these."""
        self.kv_heads = other.kv_heads
        for layer in other.outer:
            self.outer[layer] = self.outer.get(layer, 0) + other.outer[layer]
            self.total[layer] = self.total.get(layer, 0) + other.total[layer]


@dataclass(frozen=True)
class QueryMomentsProbe(Press):
    """Measures, never evicts (every key scores +inf); Python state, so it runs uncompiled."""

    name = "query_moments"
    traceable = False

    def init_state(self, shape: StateShape) -> list[QueryMoments]:
        return [QueryMoments(kv_heads=shape.kv_heads)] * shape.layers  # one shared object, keyed by layer

    def score(self, ctx: LayerContext, state: QueryMoments) -> torch.Tensor:
        layer = int(ctx.layer)
        q = ctx.queries[0, :, : int(ctx.end - ctx.start)].double()  # [H, c, D] the chunk's real queries
        outer, total = q.transpose(1, 2) @ q, q.sum(dim=1)
        state.outer[layer] = state.outer.get(layer, 0) + outer
        state.total[layer] = state.total.get(layer, 0) + total
        return constant_scores(ctx, float("inf"))


def measure_qfilters(observe: Observe, documents: list[torch.Tensor], n_kv_heads: int) -> torch.Tensor:
    """[layers, kv-heads, head_dim] Q-Filters from the queries of ``documents`` (token id
    tensors), each run through ``observe`` (an engine's ``Engine.observe``: the model runs as the
    baseline would, and the probe's final state comes back)."""
    moments = QueryMoments()
    for index, tokens in enumerate(documents):
        moments.add(observe(f"qfilter-{index}", tokens, QueryMomentsProbe()))
    return filters_from_moments(moments, n_kv_heads)


def filters_from_moments(moments: QueryMoments, n_kv_heads: int) -> torch.Tensor:
    """[layers, kv-heads, D]: per head the top eigenvector of sum q q^T, signed so the summed
    query projects positively, averaged over the kv-head's group, negated (kvpress's -(f . k))."""
    filters = []
    for layer in sorted(moments.outer):
        _, vectors = torch.linalg.eigh(moments.outer[layer])  # ascending: the last is the first
        u = vectors[..., -1]  # [H, D]
        u = u * torch.sign((u * moments.total[layer]).sum(dim=-1, keepdim=True))
        heads, d = u.shape
        filters.append(-u.view(n_kv_heads, heads // n_kv_heads, d).mean(dim=1))
    return torch.stack(filters).float()


def save_qfilters(filters: torch.Tensor, directory: str | Path) -> Path:
    """Write ``filters`` in kvpress's QFilters format; the directory is ``qfilter:path=``."""
    out = Path(directory)
    out.mkdir(parents=True, exist_ok=True)
    layers, kv_heads, head_dim = filters.shape
    config = {"num_layers": layers, "num_kv_heads": kv_heads, "kv_head_dim": head_dim}
    (out / "config.json").write_text(json.dumps(config, indent=2))
    save_file({"q_filters": filters.detach().contiguous().cpu()}, str(out / WEIGHTS_FILE))
    return out
