"""``kvorch submit``: plan a job, run it on Ray, stream rows into the lake, print the table."""

from __future__ import annotations

import dataclasses
import signal
from typing import TYPE_CHECKING, Any

import click
from click.core import ParameterSource

from orchestrator.cli.job_options import (
    actors_option,
    address_option,
    attn_option,
    bos_option,
    chunk_size_option,
    corpus_option,
    device_option,
    dtype_option,
    max_docs_option,
    max_tokens_option,
    methods_option,
    model_option,
    spec_default,
    thresholds_option,
    window_option,
)
from orchestrator.cli.options import format_option, lake_option, table_width, wide_option
from orchestrator.cli.report import marked
from orchestrator.errors import KvorchError
from orchestrator.heads.presets import (
    HEAD_ABLATION,
    PRESET_CHUNK_SIZE,
    PRESETS,
    analyze_held_out_heads,
    head_ablation_methods,
)
from orchestrator.lake import incomplete
from orchestrator.lake.store import Lake, check_run_id, new_run_id
from orchestrator.pool import DEFAULT_ACTOR_TIMEOUT, DEFAULT_MAX_RETRIES, ray_jobs
from orchestrator.probes import (
    DEFAULT_DEPTHS,
    DEFAULT_LENGTHS,
    check_task,
    is_question_task,
    parse_depths,
    parse_lengths,
)
from orchestrator.probes.spec import is_custom
from orchestrator.reports.densities import parse_densities
from orchestrator.reports.tables import RunReport, render_tables
from orchestrator.sweep.endings import stopping_signal
from orchestrator.sweep.spec import COMPILE_MODES, GENERATION_FIELDS, JobSpec
from workers.contract.configs import POLICIES
from workers.contract.settings import CACHES, PROTOCOLS, GenerationSettings

if TYPE_CHECKING:
    from orchestrator.sweep import submission


def _default(name: str) -> object:
    return spec_default(JobSpec, name)


@click.command("submit")
@model_option
@corpus_option
@methods_option()
@thresholds_option
@click.option(
    "--policy",
    type=click.Choice(POLICIES),
    default=_default("policy"),
    help="threshold: DMS-style, a key is judged once when it leaves the window; ratio: keep a fraction of the "
    "keys seen per head; budget: keep at most B keys per head.",
)
@click.option(
    "--ratios",
    default="",
    help="With --policy ratio: compression ratios, e.g. 0.3,0.5 (kept <= ceil((1-r)*seen) per layer and head).",
)
@click.option(
    "--budgets",
    default="",
    help="With --policy budget: keys kept per layer and kv-head, sinks and window included, e.g. 256,512,1024.",
)
@click.option(
    "--allocation",
    default=",".join(_default("allocations")),
    show_default=True,
    help="With --policy ratio or budget: how each config's keys are shared between layers and kv-heads, one "
    "sweep each: uniform, adakv[:alpha_safeguard=A] (the layer's budget to its best keys over all heads), "
    "pyramidkv[:beta=B] (fewer keys in later layers), file=PATH (a JSON or Parquet [layers, kv-heads] table of "
    "shares); e.g. uniform,adakv.",
)
@click.option(
    "--agreement/--no-agreement",
    default=_default("agreement"),
    help="Record each config's KL, top-1 agreement and top-5 overlap with the uncompressed model "
    "(adds baseline to the run when not among --methods).",
)
@click.option(
    "--densities",
    default=None,
    help="Target compressible densities, e.g. 0.1,0.25,0.5: first calibrate each thresholded method's "
    "thresholds to them on held-out documents (those after --max-docs), then run the sweep at those "
    "thresholds (default: no calibration).",
)
@click.option(
    "--task",
    default=None,
    help="Retrieval probes instead of corpus documents: passkey, needle (a fact in the corpus text), kv "
    "(multi-key key-value), or a .jsonl of context/question/answer; prints the accuracy table. Or a question "
    "task whose answers every config generates: ruler (RULER's families; ruler:NAME[+NAME] for some) or a "
    ".jsonl of context/question/answers; prints the answers table.",
)
@click.option(
    "--lengths",
    default=None,
    help="With --task: probe lengths in tokens, e.g. 1k,4k,16k "
    f"(default: {','.join(str(n) for n in DEFAULT_LENGTHS)}).",
)
@click.option(
    "--depths",
    default=None,
    help="With --task: where the fact sits in the context, 0 (start) to 1 (just before the question) "
    f"(default: {','.join(f'{d:g}' for d in DEFAULT_DEPTHS)}).",
)
@click.option("--samples", type=int, default=None, help="With --task: probes per length and depth (default: 1).")
@click.option("--seed", type=int, default=None, help="With --task: the probes' seed (default: 0).")
@click.option(
    "--max-new-tokens",
    type=int,
    default=None,
    help="With a question task: tokens each config may generate (default: the task's own, RULER's per "
    "family, 32 for a .jsonl).",
)
@click.option(
    "--protocol",
    type=click.Choice(PROTOCOLS),
    default=None,
    help="With a question task: chunked streams the context in chunks, evicting between them; once "
    f"(kvpress's) reads it in one chunk and compresses it once (default: {GenerationSettings.protocol}).",
)
@click.option(
    "--query-aware",
    is_flag=True,
    default=None,
    help="With a question task: the question inside the compressed part (default: read after it).",
)
@click.option(
    "--decode-eviction/--no-decode-eviction",
    default=None,
    help="With a question task: go on evicting while the answer is generated, or freeze the cache after "
    "the prompt (default: evict).",
)
@click.option(
    "--decode-interval",
    type=int,
    default=None,
    help="With a question task: generated tokens between two re-applications of a ratio or budget limit "
    f"(kvpress's compression_interval; default: {GenerationSettings.decode_interval}).",
)
@click.option(
    "--stop",
    multiple=True,
    callback=lambda ctx, param, value: _stop_strings(value),
    help="With a question task: a text that ends an answer where it first appears (repeatable; "
    "backslash escapes such as \\n are read; default: the model's end-of-sequence tokens only).",
)
@max_docs_option(spec_default(JobSpec, "max_docs"))
@max_tokens_option()
@bos_option
@chunk_size_option()
@window_option
@attn_option
@dtype_option
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
    "--cuda-graphs/--no-cuda-graphs",
    default=_default("cuda_graphs"),
    help="With the compiled chunk step on CUDA, replay each chunk as one CUDA graph; ignored on CPU. "
    "Off until measured on a GPU (BENCHMARKS.md).",
)
@click.option(
    "--cache",
    type=click.Choice(CACHES),
    default=_default("cache"),
    help="The KV cache: held keeps per config only the keys it keeps (memory and attention follow "
    "density); masked keeps every position for every config and masks what it evicted.",
)
@click.option(
    "--compile-cache",
    default=_default("compile_cache"),
    envvar="KVORCH_COMPILE_CACHE",
    show_default=True,
    help="Directory where each machine caches compiled chunk steps, shared by its actors, reruns and resumes "
    "(~ is expanded on the machine; env KVORCH_COMPILE_CACHE).",
)
@click.option("--compact", is_flag=True, hidden=True, expose_value=False, callback=lambda _c, _p, on: _no_compact(on))
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
@wide_option
@format_option
@click.pass_context
def command(ctx: click.Context, **options: Any) -> None:
    """Evaluate every chosen method on the corpus and print the comparison table."""
    _check_scheduling(options)
    spec = _job_spec(ctx, options)
    target = Lake(options["lake"])
    if options["detach"]:
        _detach(ctx, target, options)
        return
    if options["preset"]:
        heads = options["heads"] or analyze_held_out_heads(spec, target, options["address"], options["connect_timeout"])
        spec = dataclasses.replace(spec, methods=head_ablation_methods(heads), configs=())
    result = _submit(ctx, spec, target, options)
    _print_outcome(target, result, options)


# JobSpec fields that are options of the same name (the rest are converted in _job_spec).
_SPEC_OPTIONS = (
    "model", "corpus", "methods", "thresholds", "policy", "max_docs", "max_tokens", "bos", "chunk_size",
    "window", "attn", "dtype", "device", "actors", "batch_configs", "cuda_graphs", "compile_cache",
    "cache",
)  # fmt: skip


def _stop_strings(given: tuple[str, ...]) -> tuple[str, ...] | None:
    """--stop's texts with backslash escapes read (a shell passes ``\\n`` as two characters), or
    None when none is given (the option then stays out of the spec)."""
    if not given:
        return None
    try:
        return tuple(text.encode("latin-1", "backslashreplace").decode("unicode_escape") for text in given)
    except UnicodeDecodeError as exc:
        raise KvorchError(f"--stop: {exc.reason} in a stop string; write a backslash as \\\\") from None


def _no_compact(given: bool) -> None:
    """``--compact`` is gone; a script that still passes it is told so, in one line."""
    if given:
        raise click.UsageError(
            "--compact was removed: the held cache (--cache held, the default) replaced it; drop the flag"
        )


def _job_spec(ctx: click.Context, options: dict[str, Any]) -> JobSpec:
    """The JobSpec the options describe (it validates its own fields); a preset sets the methods
    and, unless given, the chunk size."""
    values = {name: options[name] for name in _SPEC_OPTIONS}
    preset = options["preset"]
    if options["heads"] and not preset:
        raise KvorchError(f"--heads goes with --preset {HEAD_ABLATION}; otherwise pass head_aware:heads=PATH")
    if preset:
        if ctx.get_parameter_source("methods") != ParameterSource.DEFAULT:
            raise KvorchError(f"--preset {preset} sets the methods; drop --methods or --preset")
        if ctx.get_parameter_source("chunk_size") == ParameterSource.DEFAULT:
            values["chunk_size"] = PRESET_CHUNK_SIZE
    densities = options["densities"]
    return JobSpec(
        **values,
        **_probe_options(ctx, options),
        ratios=_parse_ratios(options["ratios"]),
        budgets=_parse_budgets(options["budgets"]),
        allocations=tuple(item.strip() for item in options["allocation"].split(",") if item.strip()),
        agreement=options["agreement"],
        densities=parse_densities(densities) if densities is not None else (),
        compile=options["compile_"],
    )


_PROBE_OPTIONS = ("lengths", "depths", "samples", "seed")


def _probe_options(ctx: click.Context, options: dict[str, Any]) -> dict[str, Any]:
    """The JobSpec fields of --task and its options; options that cannot apply are refused."""
    task = options["task"]
    given = [name for name in _PROBE_OPTIONS if options[name] is not None]
    answering = [name for name in GENERATION_FIELDS if options[name] is not None]
    if task is None:
        if given:
            raise KvorchError(f"--{given[0]} goes with --task; add --task passkey, needle or kv")
        if answering:
            raise KvorchError(f"--{_flag(answering[0])} goes with a question task; add --task ruler")
        return {}
    corpus_only = [n for n in ("max_docs", "max_tokens") if ctx.get_parameter_source(n) != ParameterSource.DEFAULT]
    if corpus_only:
        name = corpus_only[0].replace("_", "-")
        raise KvorchError(f"--{name} chooses corpus documents, not probes; with --task use --lengths and --samples")
    check_task(task)
    if is_custom(task) and given:
        raise KvorchError(f"--{given[0]} applies to the built-in tasks; a .jsonl task brings its own probes")
    question = is_question_task(task)
    if answering and not question:
        raise KvorchError(
            f"--{_flag(answering[0])} goes with a question task (ruler, or a .jsonl with answers), not --task {task}"
        )
    if question and options["depths"] is not None and not is_custom(task):
        raise KvorchError("--depths places a probe's fact; RULER's tasks spread their needles themselves: drop it")
    fields: dict[str, Any] = {"task": task}
    fields.update({name: options[name] for name in GENERATION_FIELDS if options[name] is not None})
    if options["lengths"] is not None:
        fields["lengths"] = parse_lengths(options["lengths"])
    if options["depths"] is not None:
        fields["depths"] = parse_depths(options["depths"])
    fields.update({name: options[name] for name in ("samples", "seed") if options[name] is not None})
    return fields


def _flag(name: str) -> str:
    return name.replace("_", "-")


def _check_scheduling(options: dict[str, Any]) -> None:
    """Options that are not part of the spec: how and where the job runs."""
    actors, gpus, retries = options["actors"], options["gpus_per_actor"], options["max_retries"]
    if actors is not None and actors < 1:
        raise KvorchError(f"--actors must be >= 1, got {actors}")
    if gpus is not None and gpus <= 0:
        raise KvorchError(f"--gpus-per-actor must be > 0, got {gpus}")
    if gpus is not None and options["device"] == "cpu":
        raise KvorchError("--gpus-per-actor asks for GPUs but --device is cpu; drop one of them")
    if retries < 0:
        raise KvorchError(f"--max-retries must be >= 0, got {retries}")
    if options["actor_timeout"] <= 0:
        raise KvorchError(f"--actor-timeout must be > 0 seconds, got {options['actor_timeout']:g}")
    run_id, resume_id = options["run_id"], options["resume_id"]
    if run_id is not None:
        check_run_id(run_id, "--run-id")
    if resume_id is not None:
        check_run_id(resume_id, "--resume")
    if resume_id and run_id and resume_id != run_id:
        raise KvorchError(f"--resume {resume_id} and --run-id {run_id} disagree; pass one of them")


def _detach(ctx: click.Context, target: Lake, options: dict[str, Any]) -> None:
    """Submit this same command through the Ray Jobs API and return its job id."""
    run_id = options["resume_id"] or options["run_id"] or new_run_id()
    job_id = ray_jobs.submit_job(options["address"], ray_jobs.entrypoint(ctx, target.uri, run_id), f"kvorch-{run_id}")
    click.echo(job_id)
    click.echo(
        f"run {run_id} submitted as Ray job {job_id}; follow it with: kvorch status --lake {options['lake']}", err=True
    )


def _submit(ctx: click.Context, spec: JobSpec, target: Lake, options: dict[str, Any]) -> submission.JobResult:
    """Run the job; Ctrl-C or SIGTERM exit with the resume hint (130, 143)."""
    from orchestrator.sweep import submission  # torch, transformers and Ray: only once a job runs

    try:
        return submission.submit(
            spec,
            target,
            run_id=options["resume_id"] or options["run_id"],
            address=options["address"],
            show_progress=options["progress"],
            resume=options["resume_id"] is not None,
            max_retries=options["max_retries"],
            gpus_per_actor=options["gpus_per_actor"],
            connect_timeout=options["connect_timeout"],
            actor_timeout=options["actor_timeout"],
        )
    except KeyboardInterrupt:
        if stopping_signal() == "SIGTERM":
            click.echo("kvorch: SIGTERM; finished parts are kept, run the same command again to resume", err=True)
            ctx.exit(128 + signal.SIGTERM)
        click.echo("kvorch: interrupted; finished parts are kept, run the same command again to resume", err=True)
        ctx.exit(130)
        raise  # not reached: ctx.exit raises


def _print_outcome(target: Lake, result: submission.JobResult, options: dict[str, Any]) -> None:
    """The run's own table even when tasks failed (marked incomplete), then what failed."""
    fmt = options["fmt"]
    report = RunReport(target, result.run_id, allow_incomplete=True)
    if options["preset"]:
        names = ["head_ablation"]
    else:
        task = options["task"]
        names = ["compare", "answers" if is_question_task(task) else "retrieval"] if task else ["compare"]
    tables = [report.table(name) for name in names]
    click.echo(marked(report, render_tables(tables, fmt, table_width(options["wide"])), fmt))
    click.echo(f"run {result.run_id}: {result.rows_written} rows in {result.seconds:.1f} s -> {target.uri}", err=True)
    for line in incomplete.warnings(result.run_id, result.config_failures):
        click.echo(line, err=True)
    if "retrieval" in names:
        for line in report.probe_warnings():
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


def _parse_budgets(text: str) -> tuple[int, ...]:
    try:
        return tuple(int(part) for part in text.split(",") if part.strip())
    except ValueError:
        raise KvorchError(f"--budgets {text!r}: use comma-separated whole numbers of keys, e.g. 256,512,1024") from None
