"""From per-chunk attention statistics to a classified head table (``heads/`` in the lake).

The classifier asks the question a window actually poses: how much of a head's attention
falls *outside* sinks + a recent window of ``recent`` tokens (``far_mass``, the attention a
StreamingLLM cache of that size would drop)? A head is

- positional when far_mass < ``positional_below`` (the window loses almost nothing),
- gathering when far_mass > ``gathering_above`` (much of its attention is far away),
- mixed in between.

Entropy and mean distance are measured and stored but do not decide: a head can attend
sharply (low entropy) to one far token, which an entropy rule calls positional and a window
would break, the confusion of the Pythia study whose classifier was unsure of most heads.

Confidence is a bootstrap probability: the (document, chunk) units are resampled with
replacement ``bootstrap`` times, the class recomputed from each resample's mean, and the
confidence is the share of resamples that give the head's class. A head far from both
thresholds gets ~1; one on a threshold ~0.5, and only then. ``doc_agreement``, the share of
documents that alone give the head's class, is a second, independent check. Units within a
document are correlated, so with few documents the bootstrap is optimistic: analyse more
documents than you need to trust it (the CLI warns below 4).
"""

from __future__ import annotations

import pyarrow as pa
import torch

from orchestrator.heads.settings import ClassifierSettings
from workers.contract.schema import HEAD_CLASSES, HEADS_SCHEMA
from workers.studies.head_stats import SCALAR_FEATURES, DocumentHeadStats, recommended_window

__all__ = ["ClassifierSettings", "classify", "head_table"]

_ENTROPY, _DISTANCE, _SINK, _RECENT = range(len(SCALAR_FEATURES))


def classify(far_mass: torch.Tensor, settings: ClassifierSettings) -> torch.Tensor:
    """Class index into HEAD_CLASSES for every far-mass value."""
    return (far_mass > settings.positional_below).long() + (far_mass > settings.gathering_above).long()


def _far(sums: torch.Tensor, queries: torch.Tensor) -> torch.Tensor:
    """Far mass per head from summed statistics: each query's masses add up to 1."""
    return 1 - (sums[..., _SINK] + sums[..., _RECENT]) / queries


def head_table(
    docs: list[DocumentHeadStats],
    settings: ClassifierSettings,
    model: str,
    n_sink: int,
    longest: int,
) -> pa.Table:
    """One row per (layer, head) in HEADS_SCHEMA; ``docs`` without analysed queries are ignored.

    ``longest`` is the longest analysed document: a head whose recommended window reaches it
    is recommended the full context (-1), since nothing shorter was shown to suffice.
    """
    docs = [d for d in docs if d.queries.numel()]
    units = torch.cat([d.sums for d in docs]).double()  # [U, L, H, F]
    queries = torch.cat([d.queries for d in docs]).double()  # [U]
    _, n_layers, n_heads, _ = units.shape
    n_kv_heads = docs[0].n_kv_heads
    total, n_queries = units.sum(0), queries.sum()
    mean = total / n_queries
    far = _far(total, n_queries)
    head_class = classify(far, settings)

    generator = torch.Generator().manual_seed(settings.seed)
    draws = torch.randint(len(units), (settings.bootstrap, len(units)), generator=generator)
    weights = torch.zeros(settings.bootstrap, len(units), dtype=torch.float64).scatter_add_(
        1, draws, torch.ones_like(draws, dtype=torch.float64)
    )
    resampled = torch.einsum("bu,ulhf->blhf", weights, units[..., [_SINK, _RECENT]])
    far_resampled = 1 - resampled.sum(-1) / (weights @ queries)[:, None, None]
    p_class = torch.stack([(classify(far_resampled, settings) == c).double().mean(0) for c in range(3)], dim=-1)
    confidence = p_class.gather(-1, head_class[..., None])[..., 0]

    per_doc = torch.stack([classify(_far(d.sums.sum(0), d.queries.sum()), settings) for d in docs])
    doc_agreement = (per_doc == head_class).double().mean(0)

    window = recommended_window(mean[..., len(SCALAR_FEATURES) :], settings.tail, longest)
    recommended = torch.where(window < 0, -1, window + n_sink)

    layer, head = torch.meshgrid(torch.arange(n_layers), torch.arange(n_heads), indexing="ij")
    columns = {
        "model": [model] * (n_layers * n_heads),
        "layer": layer.flatten().tolist(),
        "head": head.flatten().tolist(),
        "kv_head": (head // (n_heads // n_kv_heads)).flatten().tolist(),
        "n_docs": [len(docs)] * (n_layers * n_heads),
        "n_queries": [int(n_queries)] * (n_layers * n_heads),
        "entropy": mean[..., _ENTROPY].flatten().tolist(),
        "mean_distance": mean[..., _DISTANCE].flatten().tolist(),
        "sink_mass": mean[..., _SINK].flatten().tolist(),
        "recent_mass": mean[..., _RECENT].flatten().tolist(),
        "far_mass": far.flatten().tolist(),
        "head_class": [HEAD_CLASSES[c] for c in head_class.flatten().tolist()],
        "confidence": confidence.flatten().tolist(),
        "p_positional": p_class[..., 0].flatten().tolist(),
        "p_mixed": p_class[..., 1].flatten().tolist(),
        "p_gathering": p_class[..., 2].flatten().tolist(),
        "doc_agreement": doc_agreement.flatten().tolist(),
        "recommended_context": recommended.flatten().tolist(),
    }
    return pa.Table.from_pydict(columns, schema=HEADS_SCHEMA)
