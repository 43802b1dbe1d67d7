"""``kvorch heads analyze`` end to end: attention statistics on Ray, the classified table in the lake.

Statistics are the expensive part (a baseline forward per document plus the attention
probabilities of every analysed query), so documents are spread over the same kind of actor
pool as ``submit``. Classification and the bootstrap are cheap and run on the driver
(orchestrator/heads/classify.py). An analysis is identified by a hash of what was analysed and
how, so repeating one rewrites the same ``heads/run_id=<id>/`` instead of piling up copies.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime, timezone

import pyarrow as pa

from orchestrator.corpus import model_inputs
from orchestrator.errors import KvorchError
from orchestrator.heads.classify import head_table
from orchestrator.heads.settings import FEW_DOCS, AnalysisSpec, ClassifierSettings
from orchestrator.lake.store import Lake
from orchestrator.pool import actors
from orchestrator.pool.connect import DEFAULT_CONNECT_TIMEOUT
from workers.actor import EvalWorker
from workers.contract.models import resolve_dtype
from workers.contract.plan import TaskDocument, WorkerSettings

__all__ = ["FEW_DOCS", "HEADS_FILE", "Analysis", "AnalysisSpec", "ClassifierSettings", "analyze"]

HEADS_FILE = "heads.parquet"


@dataclass(frozen=True)
class Analysis:
    analysis_id: str
    path: str  # the heads.parquet file, what `head_aware:heads=` takes
    table: pa.Table
    n_docs: int


def analyze(
    spec: AnalysisSpec, lake: Lake, address: str | None, connect_timeout: float = DEFAULT_CONNECT_TIMEOUT
) -> Analysis:
    """Measure, classify and write one head table; returns where it is."""
    tokens, everything = model_inputs(spec.model, spec.corpus, spec.bos)
    lake.ensure_writable()
    corpus = everything[spec.skip_docs : spec.skip_docs + spec.max_docs]
    docs = [TaskDocument(d.doc_id, tokens.ids(d.text, spec.max_tokens)) for d in corpus]
    docs = [d for d in docs if len(d.token_ids) > spec.probe.min_position]
    if not docs:
        raise KvorchError(
            f"no document of corpus {spec.corpus} (after the first {spec.skip_docs}) is longer than "
            f"--min-position {spec.probe.min_position} tokens; lower --min-position or use longer documents"
        )
    actors.start_ray(address, "kvorch-heads", connect_timeout)
    pool = actors.plan_pool(spec.actors, spec.device)
    settings = WorkerSettings(
        spec.model,
        resolve_dtype(spec.dtype, pool.device),
        pool.device,
        pool.threads,
        spec.engine_settings(),
    )
    stats = actors.map_on_pool(
        EvalWorker,
        (settings,),
        "head_statistics",
        [(d.doc_id, (d, spec.probe), len(d.token_ids)) for d in docs],
        pool,
        label="heads",
        hint="check --model/--device or lower --max-tokens",
    )
    longest = max(len(d.token_ids) for d in docs)
    table = head_table(stats, spec.classifier, spec.model, spec.probe.n_sink, longest)
    directory = lake.heads_dir(spec.analysis_id)
    lake.write_table(f"{directory}/{HEADS_FILE}", table)
    lake.write_json(
        f"{directory}/analysis.json",
        {
            **spec.identity(),
            "analysis_id": spec.analysis_id,
            "documents": [d.doc_id for d in docs],
            "tokenization": tokens.fingerprint(d.token_ids for d in docs),
            "created_at": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        },
    )
    return Analysis(spec.analysis_id, f"{directory}/{HEADS_FILE}", table, len(docs))
