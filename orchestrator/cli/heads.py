"""``kvorch heads``: classify attention heads (``analyze``), show a stored analysis (``show``), and
measure each head's Q-Filter (``qfilters``)."""

from __future__ import annotations

import click
import duckdb

from orchestrator.cli.job_options import (
    actors_option,
    address_option,
    bos_option,
    chunk_size_option,
    corpus_option,
    device_option,
    dtype_option,
    max_docs_option,
    max_tokens_option,
    model_option,
    spec_default,
)
from orchestrator.cli.options import format_option, lake_option
from orchestrator.errors import KvorchError
from orchestrator.heads.settings import FEW_DOCS, PROBE_DEFAULTS, AnalysisSpec, ClassifierSettings, QFilterSpec
from orchestrator.lake.queries import connect, run_named
from orchestrator.lake.store import Lake
from orchestrator.reports.formatting import render
from workers.contract.schema import HEAD_CLASSES

_CLASSIFIER = ClassifierSettings()


@click.group("heads")
def command() -> None:
    """Attention heads: positional, mixed or gathering, with a calibrated confidence."""


@command.command("analyze")
@model_option
@corpus_option
@lake_option
@max_docs_option(spec_default(AnalysisSpec, "max_docs"), help="Documents analysed.")
@click.option(
    "--skip-docs",
    type=int,
    default=spec_default(AnalysisSpec, "skip_docs"),
    help="Corpus documents skipped first (keep evaluation docs out).",
)
@max_tokens_option(spec_default(AnalysisSpec, "max_tokens"))
@bos_option
@chunk_size_option(spec_default(AnalysisSpec, "chunk_size"), help="Chunk length: the unit the bootstrap resamples.")
@click.option("--n-sink", type=int, default=PROBE_DEFAULTS["n_sink"], help="Sink positions (their mass is sink_mass).")
@click.option(
    "--recent", type=int, default=PROBE_DEFAULTS["recent"], help="Recent window (tokens) of recent_mass / far_mass."
)
@click.option(
    "--min-position", type=int, default=PROBE_DEFAULTS["min_position"], help="Only queries at or after this position."
)
@click.option(
    "--positional-below", type=float, default=_CLASSIFIER.positional_below, help="far_mass below: positional."
)
@click.option("--gathering-above", type=float, default=_CLASSIFIER.gathering_above, help="far_mass above: gathering.")
@click.option("--tail", type=float, default=_CLASSIFIER.tail, help="Attention share a recommended window may miss.")
@click.option("--bootstrap", type=int, default=_CLASSIFIER.bootstrap, help="Bootstrap resamples for the confidence.")
@click.option("--seed", type=int, default=_CLASSIFIER.seed, help="Bootstrap seed.")
@dtype_option
@device_option
@actors_option
@address_option
@format_option
def analyze_command(
    model: str,
    corpus: str,
    lake: str,
    max_docs: int,
    skip_docs: int,
    max_tokens: int,
    bos: str,
    chunk_size: int,
    n_sink: int,
    recent: int,
    min_position: int,
    positional_below: float,
    gathering_above: float,
    tail: float,
    bootstrap: int,
    seed: int,
    dtype: str,
    device: str,
    actors: int | None,
    address: str | None,
    connect_timeout: float,
    fmt: str,
) -> None:
    """Measure every head's attention over the corpus on Ray, classify it, store heads/ in the lake."""
    # torch, transformers and Ray: imported once the command runs, never for --help.
    from orchestrator.heads.analysis import analyze
    from workers.studies.head_stats import HeadStatsProbe

    if n_sink < 0 or recent < 1 or min_position < recent + n_sink:
        raise KvorchError("need --n-sink >= 0, --recent >= 1 and --min-position >= --recent + --n-sink")
    try:
        classifier = ClassifierSettings(positional_below, gathering_above, tail, bootstrap, seed)
    except ValueError as exc:
        raise KvorchError(f"{exc}; fix --positional-below/--gathering-above/--tail/--bootstrap") from None
    spec = AnalysisSpec(
        model=model,
        corpus=corpus,
        skip_docs=skip_docs,
        max_docs=max_docs,
        max_tokens=max_tokens,
        chunk_size=chunk_size,
        probe=HeadStatsProbe(n_sink=n_sink, recent=recent, min_position=min_position),
        classifier=classifier,
        dtype=dtype,
        device=device,
        actors=actors,
        bos=bos,
    )
    the_lake = Lake(lake)
    result = analyze(spec, the_lake, address, connect_timeout)
    click.echo(summary(connect(the_lake), result.analysis_id, fmt))
    if result.n_docs < FEW_DOCS:
        click.echo(f"note: {result.n_docs} document(s) analysed; confidences are optimistic below {FEW_DOCS}")
    click.echo(f"head table -> {result.path}")
    click.echo(f"use it: kvorch submit --methods head_aware:policy=gated,heads={result.path}")


@command.command("qfilters")
@model_option
@corpus_option
@click.option("--out", required=True, help="Directory the filters are written to (what qfilter:path= takes).")
@max_docs_option(spec_default(QFilterSpec, "max_docs"), help="Documents whose queries are measured.")
@click.option(
    "--skip-docs",
    type=int,
    default=spec_default(QFilterSpec, "skip_docs"),
    help="Corpus documents skipped first (keep evaluation docs out).",
)
@max_tokens_option(spec_default(QFilterSpec, "max_tokens"))
@bos_option
@chunk_size_option(spec_default(QFilterSpec, "chunk_size"))
@dtype_option
@device_option
@actors_option
@address_option
def qfilters_command(
    model: str,
    corpus: str,
    out: str,
    max_docs: int,
    skip_docs: int,
    max_tokens: int,
    bos: str,
    chunk_size: int,
    dtype: str,
    device: str,
    actors: int | None,
    address: str | None,
    connect_timeout: float,
) -> None:
    """Measure Q-Filters from the model's own queries over the corpus on Ray, for qfilter:path=."""
    from orchestrator.heads.qfilters import measure  # torch and Ray: once the command runs

    spec = QFilterSpec(
        model=model,
        corpus=corpus,
        out=out,
        skip_docs=skip_docs,
        max_docs=max_docs,
        max_tokens=max_tokens,
        chunk_size=chunk_size,
        dtype=dtype,
        device=device,
        actors=actors,
        bos=bos,
    )
    path = measure(spec, address, connect_timeout)
    click.echo(f"q-filters -> {path}")
    click.echo(f"use it: kvorch submit --methods qfilter:path={path}")


@command.command("show")
@lake_option
@click.option("--analysis", "analysis_id", default=None, help="Analysis id (default: the latest in the lake).")
@format_option
def show_command(lake: str, analysis_id: str | None, fmt: str) -> None:
    """Class counts and the per-layer class map of a stored analysis."""
    the_lake = Lake(lake)
    if not the_lake.exists("heads"):
        raise KvorchError(f"lake {lake} has no head analysis; run kvorch heads analyze --lake {lake}")
    con = connect(the_lake)
    ids = [row[0] for row in con.execute("SELECT DISTINCT run_id FROM heads ORDER BY run_id").fetchall()]
    if not ids:
        raise KvorchError(f"lake {lake} has no head analysis; run kvorch heads analyze --lake {lake}")
    if analysis_id is None:
        analysis_id = max(
            ids,
            key=lambda i: (the_lake.read_json(f"{the_lake.heads_dir(i)}/analysis.json") or {}).get("created_at", ""),
        )
    elif analysis_id not in ids:
        raise KvorchError(f"no head analysis {analysis_id!r} in {lake}; analyses: {', '.join(ids)}")
    click.echo(summary(con, analysis_id, fmt))


def summary(con: duckdb.DuckDBPyConnection, analysis_id: str, fmt: str) -> str:
    """The class table, then one line per layer: a letter per head, upper case when confident."""
    result = run_named(con, "head_classes", {"run_id": analysis_id})
    table = render([d[0] for d in result.description], result.fetchall(), fmt)
    if fmt != "table":
        return table
    rows = con.execute(
        "SELECT layer, head_class, confidence FROM heads WHERE run_id = $id ORDER BY layer, head", {"id": analysis_id}
    ).fetchall()
    lines: dict[int, list[str]] = {}
    for layer, head_class, confidence in rows:
        letter = head_class[0]
        lines.setdefault(layer, []).append(letter.upper() if confidence >= 0.6 else letter)
    legend = ", ".join(f"{c[0].upper()} {c}" for c in HEAD_CLASSES) + "; lower case: confidence < 0.6"
    layer_map = "\n".join(f"layer {layer:3d}  {' '.join(letters)}" for layer, letters in lines.items())
    return f"analysis {analysis_id}\n{table}\n\nper layer ({legend}):\n{layer_map}"
