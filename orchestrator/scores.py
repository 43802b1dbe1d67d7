"""``kvorch scores``: what a press throws away, key by key, for one document.

Runs in-process (one document needs no cluster): the engine's score dump becomes a ``scores/``
table in the lake and a heatmap per config (layers x positions).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pyarrow as pa
import torch

from orchestrator.corpus import load_corpus
from orchestrator.errors import KvorchError
from orchestrator.lake.store import Lake
from workers.actor import EvalWorker
from workers.contract import tokenization
from workers.contract.configs import EvalConfig
from workers.contract.plan import DocumentScores, TaskDocument, WorkerSettings
from workers.contract.schema import SCORES_SCHEMA
from workers.contract.settings import EngineSettings


def score_document(
    model: str,
    corpus: str,
    doc_id: str | None,
    configs: list[EvalConfig],
    settings: EngineSettings,
    max_tokens: int,
    bos: str = tokenization.DEFAULT_BOS,
) -> tuple[str, DocumentScores]:
    docs = load_corpus(corpus)
    doc = docs[0] if doc_id is None else next((d for d in docs if d.doc_id == doc_id), None)
    if doc is None:
        sample = ", ".join(d.doc_id for d in docs[:5])
        raise KvorchError(f"no document {doc_id!r} in corpus {corpus}; ids look like: {sample}")
    try:
        tokens = tokenization.load(model, bos)
    except ValueError as exc:
        raise KvorchError(str(exc)) from None
    ids = tokens.ids(doc.text, max_tokens)
    worker = EvalWorker("scores", WorkerSettings(model, "float32", "cpu", torch.get_num_threads(), settings))
    return doc.doc_id, worker.scores(TaskDocument(doc.doc_id, ids), configs)


def scores_table(doc_id: str, dump: DocumentScores) -> pa.Table:
    n_configs, n_layers, n_heads, n = dump.scores.shape
    grid = np.indices((n_configs, n_layers, n_heads, n)).reshape(4, -1)
    return pa.table(
        {
            "doc_id": pa.array([doc_id] * grid.shape[1]),
            "config": pa.array(np.asarray(dump.configs)[grid[0]]),
            "layer": grid[1].astype(np.int32),
            "kv_head": grid[2].astype(np.int32),
            "position": grid[3].astype(np.int32),
            "score": dump.scores.reshape(-1).numpy().astype(np.float32),
            "kept": dump.kept.reshape(-1).numpy(),
        },
        schema=SCORES_SCHEMA,
    )


def write_scores(lake: Lake, run_id: str, table: pa.Table) -> str:
    path = lake.path("scores", f"run_id={run_id}", "scores.parquet")
    lake.write_table(path, table)
    return path


def draw_heatmaps(doc_id: str, dump: DocumentScores, out_dir: Path) -> list[Path]:
    """One PNG per config: score rank per layer (mean over kv-heads), evicted keys in red."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.colors import ListedColormap

    out_dir.mkdir(parents=True, exist_ok=True)
    paths = []
    for i, config in enumerate(dump.configs):
        scores = dump.scores[i].float().clamp(-1e30, 1e30).mean(dim=1)  # [layers, positions]
        ranks = scores.argsort(dim=-1).argsort(dim=-1).float() / max(1, scores.shape[-1] - 1)
        evicted = (~dump.kept[i]).float().mean(dim=1)  # share of kv-heads that evicted the key
        fig, ax = plt.subplots(figsize=(12, 4 + 0.05 * scores.shape[0]))
        image = ax.imshow(ranks.numpy(), aspect="auto", cmap="viridis", interpolation="nearest")
        overlay = np.ma.masked_where(evicted.numpy() == 0, evicted.numpy())
        ax.imshow(overlay, aspect="auto", cmap=ListedColormap(["#d62728"]), alpha=0.6, interpolation="nearest")
        ax.set_xlabel("position in document (token)")
        ax.set_ylabel("layer")
        ax.set_title(f"{config} on {doc_id}: score rank within layer (yellow = keep first); red = evicted")
        fig.colorbar(image, ax=ax, label="score rank within layer (0 lowest, 1 highest)", pad=0.01)
        fig.tight_layout()
        path = out_dir / f"scores-{_safe(config)}.png"
        fig.savefig(path, dpi=100)
        plt.close(fig)
        paths.append(path)
    return paths


def _safe(text: str) -> str:
    return "".join(c if c.isalnum() or c in "-_.=@" else "_" for c in text)
