"""Options of the commands that run models (submit, scores, heads analyze, kvzap train),
declared once; their defaults come from the spec dataclass of the command's feature
(``JobSpec``, ``AnalysisSpec``, ``TrainSpec``), which owns them and validates the values.
Commands only convert what they are given."""

from __future__ import annotations

import dataclasses
from collections.abc import Callable

import click

from orchestrator.corpus import EMBEDDED_CORPUS
from orchestrator.pool import DEFAULT_CONNECT_TIMEOUT
from orchestrator.sweep.spec import JobSpec
from workers.contract.defaults import ALL_METHODS, BACKENDS, LEADERBOARD_METHODS
from workers.contract.models import DTYPE_NAMES, EMBEDDED_MODEL
from workers.contract.tokenization import BOS_MODES, DEFAULT_BOS

model_option = click.option(
    "--model",
    default=EMBEDDED_MODEL,
    help=f"'{EMBEDDED_MODEL}' (embedded GGUF), a .gguf file, a local HF dir or a hub id.",
)
corpus_option = click.option(
    "--corpus",
    default=EMBEDDED_CORPUS,
    help=f"'{EMBEDDED_CORPUS}' (embedded), a .jsonl (field text, optional id), a .parquet, or a dir of .txt.",
)
device_option = click.option(
    "--device", type=click.Choice(["auto", "cpu", "cuda"]), default="auto", help="auto: GPU actors when Ray has GPUs."
)
actors_option = click.option("--actors", type=int, default=None, help="Ray actors (default: one per GPU, else one).")
_address = click.option(
    "--address",
    default=None,
    help="Ray cluster: 'auto', HOST:6379 or ray://HOST:10001 (default: start an embedded local Ray).",
)
_connect_timeout = click.option(
    "--connect-timeout",
    type=float,
    default=DEFAULT_CONNECT_TIMEOUT,
    help="Seconds to wait for the cluster at --address before failing with what to check.",
)


def address_option(command: Callable) -> Callable:
    """--address and its --connect-timeout, which always go together."""
    return _address(_connect_timeout(command))


bos_option = click.option(
    "--bos",
    type=click.Choice(BOS_MODES),
    default=DEFAULT_BOS,
    help="BOS token first in every document: auto = when the tokenizer declares one, on (an error if it "
    "declares none), off. Never left to the transformers release; recorded in spec.json.",
)


def spec_default(spec: type, name: str) -> object:
    """The default of field ``name`` of the dataclass ``spec``: the one place it is written."""
    field = spec.__dataclass_fields__[name]
    if field.default is not dataclasses.MISSING:
        return field.default
    return field.default_factory()  # type: ignore[misc]


def max_docs_option(default: object, help: str = "Documents taken from the corpus.") -> Callable:
    return click.option("--max-docs", type=int, default=default, help=help)


def max_tokens_option(
    default: object = spec_default(JobSpec, "max_tokens"), help: str = "Each document is cut to this many tokens."
) -> Callable:
    return click.option("--max-tokens", type=int, default=default, help=help)


def chunk_size_option(
    default: object = spec_default(JobSpec, "chunk_size"), help: str = "Tokens per forward (1 = decode-like)."
) -> Callable:
    return click.option("--chunk-size", type=int, default=default, help=help)


def methods_option(default: object = spec_default(JobSpec, "methods"), help: str | None = None) -> Callable:
    return click.option(
        "--methods",
        multiple=True,
        default=list(default),
        help=help
        or f"Comma list of methods, each name[:key=value,...]; 'all' = {', '.join(ALL_METHODS)}; "
        f"'leaderboard' = {', '.join(LEADERBOARD_METHODS)}.",
    )


thresholds_option = click.option(
    "--thresholds",
    multiple=True,
    default=list(spec_default(JobSpec, "thresholds")),
    help="Override thresholds: 'method=t1,t2' (repeat or separate with ';') or 't1,t2' for every thresholded method.",
)
window_option = click.option(
    "--window",
    type=int,
    default=spec_default(JobSpec, "window"),
    help="Sliding window of recent keys that are never evicted.",
)
attn_option = click.option(
    "--attn",
    type=click.Choice(BACKENDS),
    default=spec_default(JobSpec, "attn"),
    help="Attention kernel: sdpa, eager (materialized softmax), or flex (FlexAttention over a block mask "
    "built from the keep-mask; torch >= 2.5).",
)
dtype_option = click.option(
    "--dtype",
    type=click.Choice(["auto", *DTYPE_NAMES]),
    default=spec_default(JobSpec, "dtype"),
    help="auto: bfloat16 on GPU, float32 on CPU.",
)
