"""``kvorch scores``: every key's score and keep decision for one document, plus heatmaps."""

from __future__ import annotations

from pathlib import Path

import click

from orchestrator.cli.job_options import (
    attn_option,
    bos_option,
    chunk_size_option,
    corpus_option,
    max_tokens_option,
    methods_option,
    model_option,
    thresholds_option,
    window_option,
)
from orchestrator.cli.options import lake_option
from orchestrator.lake.store import Lake, new_run_id
from orchestrator.sweep.spec import build_configs, engine_settings

# What `kvorch scores` shows when no --methods is given: the press whose per-key scores users
# most often want to look at (it is also the default method of the project's seeds).
DEFAULT_SCORED_METHODS = ("expected_attention",)


@click.command("scores")
@model_option
@corpus_option
@click.option("--doc", "doc_id", default=None, help="Document id (default: the corpus's first document).")
@methods_option(
    DEFAULT_SCORED_METHODS, help="Methods, as for submit (default: the one whose scores are most often asked for)."
)
@thresholds_option
@max_tokens_option()
@bos_option
@chunk_size_option()
@window_option
@attn_option
@lake_option
@click.option("--out", type=click.Path(file_okay=False), default=None, help="Directory for the heatmap PNGs.")
def command(
    model: str,
    corpus: str,
    doc_id: str | None,
    methods: tuple[str, ...],
    thresholds: tuple[str, ...],
    max_tokens: int,
    bos: str,
    chunk_size: int,
    window: int,
    attn: str,
    lake: str,
    out: str | None,
) -> None:
    """Write the score and keep/evict decision of every (layer, kv-head, position) of one document."""
    from orchestrator.scores import draw_heatmaps, score_document, scores_table, write_scores  # torch: when run

    configs = build_configs(methods, thresholds)
    settings = engine_settings(chunk_size, window, attn)
    target = Lake(lake)
    target.ensure_writable()
    doc, dump = score_document(model, corpus, doc_id, configs, settings, max_tokens, bos)
    run_id = new_run_id()
    path = write_scores(target, run_id, scores_table(doc, dump))
    click.echo(f"scores of {doc} under {', '.join(dump.configs)} -> {path} (SQL view: scores, run_id={run_id})")
    for png in draw_heatmaps(doc, dump, Path(out) if out else Path(path).parent):
        click.echo(f"heatmap -> {png}")
