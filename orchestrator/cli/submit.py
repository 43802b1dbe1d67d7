"""``kvorch submit``: plan a job, run it on Ray, stream rows into the lake, print the table."""

from __future__ import annotations

import dataclasses
import signal

import click
from click.core import ParameterSource

from orchestrator import incomplete, job, ray_jobs
from orchestrator.cli.options import (
    actors_option,
    address_option,
    bos_option,
    corpus_option,
    device_option,
    format_option,
    lake_option,
    model_option,
)
from orchestrator.cli.report import comparison, marked
from orchestrator.densities import parse_densities
from orchestrator.driver import DEFAULT_ACTOR_TIMEOUT, DEFAULT_MAX_RETRIES
from orchestrator.endings import stopping_signal
from orchestrator.errors import KvorchError
from orchestrator.lake import Lake, check_run_id, new_run_id
from orchestrator.presets import (
    HEAD_ABLATION,
    PRESET_CHUNK_SIZE,
    PRESETS,
    analyze_held_out_heads,
    head_ablation_methods,
)
from orchestrator.reports import RunReport, render_tables
from orchestrator.spec import COMPILE_MODES, JobSpec
from workers.attention import BACKENDS
from workers.configs import POLICIES
from workers.models import DTYPES
from workers.presses import ALL_METHODS

_DEFAULTS = JobSpec.__dataclass_fields__


def _default(name: str) -> object:
    return _DEFAULTS[name].default


@click.command("submit")
@model_option
@corpus_option
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
    type=click.Choice(POLICIES),
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
@bos_option
@click.option("--chunk-size", type=int, default=_default("chunk_size"), help="Tokens per forward (1 = decode-like).")
@click.option(
    "--window", type=int, default=_default("window"), help="Sliding window of recent keys that are never evicted."
)
@click.option(
    "--attn",
    type=click.Choice(BACKENDS),
    default=_default("attn"),
    help="Attention kernel: sdpa, eager (materialized softmax), or flex (FlexAttention over a block mask "
    "built from the keep-mask; torch >= 2.5).",
)
@click.option(
    "--dtype",
    type=click.Choice(["auto", *DTYPES]),
    default=_default("dtype"),
    help="auto: bfloat16 on GPU, float32 on CPU.",
)
@device_option
@actors_option
@click.option(
    "--gpus-per-actor",
    type=float,
    default=None,
    help="GPUs each actor asks Ray for; fractions pack actors onto one GPU (default: GPUs / actors, at most 1).",
)
@click.option(
    "--max-retries",
    type=int,
    default=DEFAULT_MAX_RETRIES,
    help="Re-runs of a task whose worker died or raised before it is recorded as failed.",
)
@click.option(
    "--actor-timeout",
    type=float,
    default=DEFAULT_ACTOR_TIMEOUT,
    show_default=True,
    metavar="SECONDS",
    help="Seconds Ray has to place an actor (at the start, or again after its node was lost) before the run "
    "goes on without it; longer when the cluster autoscales. Model loading does not count.",
)
@click.option(
    "--batch-configs",
    default=_default("batch_configs"),
    help="Configs evaluated together in one batched forward; auto: as many as half the worker's free "
    "memory holds (at most 32).",
)
@click.option(
    "--compile",
    "compile_",
    type=click.Choice(COMPILE_MODES),
    default=_default("compile"),
    help="torch.compile the whole chunk step (forward, attention, presses, decisions) as one graph; "
    "auto: on for CUDA, off on CPU; on: fail before any task if this machine cannot compile.",
)
@click.option(
    "--compact/--no-compact",
    default=_default("compact"),
    help="Evicted keys physically leave the cache, so KV memory tracks density (same numbers as masking).",
)
@lake_option
@click.option(
    "--run-id",
    default=None,
    help="Run id; an existing one is resumed (default: resume the unfinished run of this spec, else a new id).",
)
@click.option(
    "--preset",
    type=click.Choice(PRESETS),
    default=None,
    help=f"A study as one command. {HEAD_ABLATION}: the head-aware ablation grid (sets --methods; chunk "
    f"{PRESET_CHUNK_SIZE} unless given); prints its table.",
)
@click.option(
    "--heads",
    default=None,
    type=click.Path(exists=True, dir_okay=False),
    help=f"Head table for --preset {HEAD_ABLATION} (kvorch heads analyze); default: analyse held-out documents.",
)
@click.option("--resume", "resume_id", default=None, help="Resume this run id; it must exist, with the same spec.")
@address_option
@click.option(
    "--detach", is_flag=True, default=False, help="Submit through the Ray Jobs API, print the job id and return."
)
@click.option("--progress/--no-progress", default=True, help="Show a live progress bar.")
@format_option
@click.pass_context
def command(
    ctx: click.Context,
    model: str,
    corpus: str,
    methods: tuple[str, ...],
    thresholds: tuple[str, ...],
    policy: str,
    ratios: str,
    densities: str | None,
    max_docs: int,
    max_tokens: int,
    bos: str,
    chunk_size: int,
    window: int,
    attn: str,
    dtype: str,
    device: str,
    actors: int | None,
    gpus_per_actor: float | None,
    max_retries: int,
    actor_timeout: float,
    batch_configs: str,
    compile_: str,
    compact: bool,
    lake: str,
    run_id: str | None,
    preset: str | None,
    heads: str | None,
    resume_id: str | None,
    address: str | None,
    connect_timeout: float,
    detach: bool,
    progress: bool,
    fmt: str,
) -> None:
    """Evaluate every chosen method on the corpus and print the comparison table."""
    if actors is not None and actors < 1:
        raise KvorchError(f"--actors must be >= 1, got {actors}")
    if gpus_per_actor is not None and gpus_per_actor <= 0:
        raise KvorchError(f"--gpus-per-actor must be > 0, got {gpus_per_actor}")
    if gpus_per_actor is not None and device == "cpu":
        raise KvorchError("--gpus-per-actor asks for GPUs but --device is cpu; drop one of them")
    if max_retries < 0:
        raise KvorchError(f"--max-retries must be >= 0, got {max_retries}")
    if actor_timeout <= 0:
        raise KvorchError(f"--actor-timeout must be > 0 seconds, got {actor_timeout:g}")
    if run_id is not None:
        check_run_id(run_id, "--run-id")
    if resume_id is not None:
        check_run_id(resume_id, "--resume")
    if resume_id and run_id and resume_id != run_id:
        raise KvorchError(f"--resume {resume_id} and --run-id {run_id} disagree; pass one of them")
    if heads and not preset:
        raise KvorchError(f"--heads goes with --preset {HEAD_ABLATION}; otherwise pass head_aware:heads=PATH")
    if preset:
        if ctx.get_parameter_source("methods") != ParameterSource.DEFAULT:
            raise KvorchError(f"--preset {preset} sets the methods; drop --methods or --preset")
        if ctx.get_parameter_source("chunk_size") == ParameterSource.DEFAULT:
            chunk_size = PRESET_CHUNK_SIZE
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
        bos=bos,
        chunk_size=chunk_size,
        window=window,
        attn=attn,
        dtype=dtype,
        device=device,
        actors=actors,
        batch_configs=batch_configs,
        compile=compile_,
        compact=compact,
    )
    target = Lake(lake)
    if preset and not detach:
        heads = heads or analyze_held_out_heads(spec, target, address, connect_timeout)
        spec = dataclasses.replace(spec, methods=head_ablation_methods(heads), configs=())
    if detach:
        run_id = resume_id or run_id or new_run_id()
        job_id = ray_jobs.submit_job(address, ray_jobs.entrypoint(ctx, target.uri, run_id), f"kvorch-{run_id}")
        click.echo(job_id)
        click.echo(f"run {run_id} submitted as Ray job {job_id}; follow it with: kvorch status --lake {lake}", err=True)
        return
    try:
        result = job.submit(
            spec,
            target,
            run_id=resume_id or run_id,
            address=address,
            show_progress=progress,
            resume=resume_id is not None,
            max_retries=max_retries,
            gpus_per_actor=gpus_per_actor,
            connect_timeout=connect_timeout,
            actor_timeout=actor_timeout,
        )
    except KeyboardInterrupt:
        if stopping_signal() == "SIGTERM":
            click.echo("kvorch: SIGTERM; finished parts are kept, run the same command again to resume", err=True)
            ctx.exit(128 + signal.SIGTERM)
        click.echo("kvorch: interrupted; finished parts are kept, run the same command again to resume", err=True)
        ctx.exit(130)
    # The run's own table even when tasks failed: marked incomplete, with the failure below.
    if preset:
        report = RunReport(target, result.run_id, allow_incomplete=True)
        click.echo(marked(report, render_tables([report.table("head_ablation")], fmt), fmt))
    else:
        click.echo(comparison(target, result.run_id, fmt, allow_incomplete=True))
    click.echo(f"run {result.run_id}: {result.rows_written} rows in {result.seconds:.1f} s -> {target.uri}", err=True)
    for line in incomplete.warnings(result.run_id, result.config_failures):
        click.echo(line, err=True)
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
