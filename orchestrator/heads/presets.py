"""Named studies that ``kvorch submit --preset`` runs as one command.

``head-ablation`` is the head-aware ablation (docs/DESIGN.md, "The head-aware ablation") on any
model: uniform sinks + window at four contexts, window only, per-class, per-head recommended
(with and without sinks), confidence-gated and inverse head-aware windows, plus the baseline.
Its head table comes from ``--heads``, or is analysed first on held-out corpus documents (the
ones after the evaluated ``--max-docs``), so the classifier never sees the evaluated text.
The study's result table is ``sql/head_ablation.sql``.
"""

from __future__ import annotations

import dataclasses

from orchestrator.corpus import load_corpus
from orchestrator.errors import KvorchError
from orchestrator.lake.store import Lake
from orchestrator.pool import DEFAULT_CONNECT_TIMEOUT
from orchestrator.sweep.spec import JobSpec
from workers.contract.settings import EngineSettings

HEAD_ABLATION = "head-ablation"
PRESETS = (HEAD_ABLATION,)
# The study's chunking was decode-like; 32-token chunks keep "effective context" (which counts
# the causal keys inside the chunk) close to the cache size the study's names give.
PRESET_CHUNK_SIZE = 32
# Held-out documents analysed when no --heads table is given.
HEAD_ANALYSIS_DOCS = 4

_HEAD_ABLATION_GRID = (
    "baseline",
    "head_aware:base=64",
    "head_aware:base=128",
    "head_aware:base=256",
    "head_aware:base=512",
    "head_aware:base=128,n_sink=0",
    "head_aware:policy=class,positional=64,mixed=128,gathering=512,heads={heads}",
    "head_aware:policy=recommended,n_sink=0,heads={heads}",
    "head_aware:policy=recommended,heads={heads}",
    "head_aware:policy=gated,confidence=0.6,base=128,positional=16,mixed=64,gathering=512,heads={heads}",
    "head_aware:policy=inverse,confidence=0.6,base=128,gathering=256,heads={heads}",
)


def head_ablation_methods(heads: str) -> tuple[str, ...]:
    """The grid's ``--methods``, with the head table at ``heads``."""
    return tuple(method.format(heads=heads) for method in _HEAD_ABLATION_GRID)


def analyze_held_out_heads(
    spec: JobSpec, lake: Lake, address: str | None, connect_timeout: float = DEFAULT_CONNECT_TIMEOUT
) -> str:
    """Classify the model's heads on the corpus documents after the evaluated ones; the table's path."""
    # Imported here: `kvorch submit --help` reads this module's names without loading torch.
    from orchestrator.heads.analysis import AnalysisSpec, analyze
    from orchestrator.heads.classify import ClassifierSettings
    from workers.studies.head_stats import HeadStatsProbe

    skip = spec.max_docs or 0
    if spec.max_docs is None or len(load_corpus(spec.corpus)) <= skip:
        raise KvorchError(
            f"--preset {HEAD_ABLATION} analyses heads on documents after the first --max-docs {spec.max_docs}, "
            f"and corpus {spec.corpus} has none; lower --max-docs or pass --heads from kvorch heads analyze"
        )
    probe = HeadStatsProbe()
    min_position = min(probe.min_position, spec.max_tokens // 2)
    if min_position < probe.recent + probe.n_sink:
        raise KvorchError(f"--preset {HEAD_ABLATION} needs --max-tokens >= {2 * (probe.recent + probe.n_sink)}")
    analysis = AnalysisSpec(
        model=spec.model,
        corpus=spec.corpus,
        skip_docs=skip,
        max_docs=HEAD_ANALYSIS_DOCS,
        max_tokens=spec.max_tokens,
        chunk_size=EngineSettings.chunk_size,
        probe=dataclasses.replace(probe, min_position=min_position),
        classifier=ClassifierSettings(),
        dtype=spec.dtype,
        device=spec.device,
        actors=spec.actors,
        bos=spec.bos,
    )
    return analyze(analysis, lake, address, connect_timeout).path
