"""``kvorch heads qfilters``: Q-Filters measured from a model's own queries over a corpus, on Ray.

Each actor runs documents through the engine with a probe that keeps every key and sums the
post-RoPE queries' moments (workers/studies/qfilters.py); the driver adds them up and takes each
head's main direction, so the filters are those of every measured query at once, whichever actor
read it. They are written in kvpress's QFilters format to ``--out``, the directory
``qfilter:path=`` reads.
"""

from __future__ import annotations

from pathlib import Path

from orchestrator.corpus import model_inputs
from orchestrator.errors import KvorchError
from orchestrator.heads.settings import QFilterSpec
from orchestrator.pool import actors
from orchestrator.pool.connect import DEFAULT_CONNECT_TIMEOUT
from workers.actor import EvalWorker
from workers.contract.models import resolve_dtype
from workers.contract.plan import TaskDocument, WorkerSettings
from workers.studies.qfilters import QueryMoments, filters_from_moments, save_qfilters

# What a directory of filters holds (save_qfilters): only these may be overwritten by --out.
FILTER_FILES = {"config.json", "model.safetensors"}


def check_out(out: str) -> Path:
    """``--out``: a new or empty directory, or one of filters written before (rewritten); never
    a directory holding anything else, which would be mixed with or lose files."""
    path = Path(out)
    if path.exists() and not path.is_dir():
        raise KvorchError(f"--out {out} is a file; give a directory for the filters")
    if path.is_dir():
        others = sorted(p.name for p in path.iterdir() if p.name not in FILTER_FILES)
        if others:
            raise KvorchError(f"--out {out} holds other files ({', '.join(others[:3])}); give a new directory")
    return path


def measure(spec: QFilterSpec, address: str | None, connect_timeout: float = DEFAULT_CONNECT_TIMEOUT) -> Path:
    """Measure the filters over the spec's documents and write them; returns their directory."""
    out = check_out(spec.out)
    tokens, everything = model_inputs(spec.model, spec.corpus, spec.bos)
    corpus = everything[spec.skip_docs : spec.skip_docs + spec.max_docs]
    docs = [TaskDocument(d.doc_id, tokens.ids(d.text, spec.max_tokens)) for d in corpus]
    docs = [d for d in docs if d.token_ids]
    if not docs:
        raise KvorchError(f"corpus {spec.corpus} has no document after the first {spec.skip_docs}; lower --skip-docs")
    actors.start_ray(address, "kvorch-qfilters", connect_timeout)
    pool = actors.plan_pool(spec.actors, spec.device)
    settings = WorkerSettings(
        spec.model, resolve_dtype(spec.dtype, pool.device), pool.device, pool.threads, spec.engine_settings()
    )
    measured = actors.map_on_pool(
        EvalWorker,
        (settings,),
        "query_moments",
        [(d.doc_id, (d,), len(d.token_ids)) for d in docs],
        pool,
        label="qfilters",
        hint="check --model/--device or lower --max-tokens",
    )
    moments = QueryMoments()
    for document in measured:
        moments.add(document)
    return save_qfilters(filters_from_moments(moments, moments.kv_heads), out)
