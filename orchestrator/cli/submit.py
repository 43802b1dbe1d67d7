"""``kvorch submit``: plan a job, run it on Ray, stream rows into the lake, print the table."""

from __future__ import annotations

import click

from orchestrator import job
from orchestrator.cli.options import format_option, lake_option
from orchestrator.cli.report import comparison
from orchestrator.corpus import EMBEDDED_CORPUS
from orchestrator.densities import parse_densities
from orchestrator.errors import KvorchError
from orchestrator.lake import Lake
from orchestrator.spec import JobSpec
from workers.attention import BACKENDS
from workers.models import DTYPES, EMBEDDED_MODEL
from workers.presses import ALL_METHODS

_DEFAULTS = JobSpec.__dataclass_fields__


def _default(name: str) -> object:
    return _DEFAULTS[name].default


@click.command("submit")
@click.option(
    "--model",
    default=EMBEDDED_MODEL,
    help=f"'{EMBEDDED_MODEL}' (embedded GGUF), a .gguf file, a local HF dir or a hub id.",
)
@click.option(
    "--corpus",
    default=EMBEDDED_CORPUS,
    help=f"'{EMBEDDED_CORPUS}' (embedded), a .jsonl (field text, optional id), a .parquet, or a dir of .txt.",
)
@click.option(
    "--methods",
    multiple=True,
    default=["all"],
    help=f"Comma list of methods, each name[:key=value,...]; 'all' = {', '.join(ALL_METHODS)}.",
)
@click.option(
    "--thresholds",
    multiple=True,
    default=[],
    help="Override thresholds: 'method=t1,t2' (repeat or separate with ';') or 't1,t2' for every thresholded method.",
)
@click.option(
    "--policy",
    type=click.Choice(["threshold", "ratio"]),
    default=_default("policy"),
    help="threshold: DMS-style, a key is judged once when it leaves the window; ratio: keep a budget per head.",
)
@click.option(
    "--ratios",
    default="",
    help="With --policy ratio: compression ratios, e.g. 0.3,0.5 (kept <= ceil((1-r)*seen) per layer and head).",
)
@click.option(
    "--densities",
    default=None,
    help="Target compressible densities, e.g. 0.1,0.25,0.5: first calibrate each thresholded method's "
    "thresholds to them on held-out documents (those after --max-docs), then run the sweep at those "
    "thresholds (default: no calibration).",
)
@click.option("--max-docs", type=int, default=_default("max_docs"), help="Documents taken from the corpus.")
@click.option(
    "--max-tokens", type=int, default=_default("max_tokens"), help="Each document is cut to this many tokens."
)
@click.option("--chunk-size", type=int, default=_default("chunk_size"), help="Tokens per forward (1 = decode-like).")
@click.option(
    "--window", type=int, default=_default("window"), help="Sliding window of recent keys that are never evicted."
)
@click.option(
    "--attn",
    type=click.Choice(BACKENDS),
    default=_default("attn"),
    help="Attention kernel inside kvorch's attention function.",
)
@click.option(
    "--dtype",
    type=click.Choice(["auto", *DTYPES]),
    default=_default("dtype"),
    help="auto: bfloat16 on GPU, float32 on CPU.",
)
@click.option(
    "--device",
    type=click.Choice(["auto", "cpu", "cuda"]),
    default=_default("device"),
    help="auto: GPU actors when the cluster has GPUs.",
)
@click.option("--actors", type=int, default=None, help="Worker actors (default: one per GPU, else one).")
@click.option(
    "--batch-configs",
    type=int,
    default=_default("batch_configs"),
    help="Configs evaluated together in one batched forward.",
)
@lake_option
@click.option("--run-id", default=None, help="Run id (default: generated from the time, printed).")
@click.option("--address", default=None, help="Ray cluster address (default: start an embedded local Ray).")
@click.option("--progress/--no-progress", default=True, help="Show a live progress bar.")
@format_option
def command(
    model: str,
    corpus: str,
    methods: tuple[str, ...],
    thresholds: tuple[str, ...],
    policy: str,
    ratios: str,
    densities: str | None,
    max_docs: int,
    max_tokens: int,
    chunk_size: int,
    window: int,
    attn: str,
    dtype: str,
    device: str,
    actors: int | None,
    batch_configs: int,
    lake: str,
    run_id: str | None,
    address: str | None,
    progress: bool,
    fmt: str,
) -> None:
    """Evaluate every chosen method on the corpus and print the comparison table."""
    if actors is not None and actors < 1:
        raise KvorchError(f"--actors must be >= 1, got {actors}")
    spec = JobSpec(
        model=model,
        corpus=corpus,
        methods=methods,
        thresholds=thresholds,
        policy=policy,
        ratios=_parse_ratios(ratios),
        densities=parse_densities(densities) if densities is not None else (),
        max_docs=max_docs,
        max_tokens=max_tokens,
        chunk_size=chunk_size,
        window=window,
        attn=attn,
        dtype=dtype,
        device=device,
        actors=actors,
        batch_configs=batch_configs,
    )
    target = Lake(lake)
    result = job.submit(spec, target, run_id=run_id, address=address, show_progress=progress)
    click.echo(comparison(target, result.run_id, fmt))
    click.echo(f"run {result.run_id}: {result.rows_written} rows in {result.seconds:.1f} s -> {target.uri}", err=True)
    if result.failures:
        first = next(iter(result.failures.items()))
        raise KvorchError(
            f"{len(result.failures)} of {result.tasks} tasks failed (first: {first[0]}: {first[1]}); "
            f"their rows are missing from run {result.run_id}"
        )


def _parse_ratios(text: str) -> tuple[float, ...]:
    try:
        return tuple(float(part) for part in text.split(",") if part.strip())
    except ValueError:
        raise KvorchError(f"--ratios {text!r}: use comma-separated numbers in [0, 1), e.g. 0.3,0.5") from None
