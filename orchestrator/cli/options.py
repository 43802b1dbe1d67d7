"""Options shared by several commands, defined once."""

from __future__ import annotations

from collections.abc import Callable

import click

from orchestrator.cluster_connect import DEFAULT_CONNECT_TIMEOUT
from orchestrator.corpus import EMBEDDED_CORPUS
from orchestrator.formatting import FORMATS
from orchestrator.lake import DEFAULT_LAKE
from workers.models import EMBEDDED_MODEL
from workers.tokenization import BOS_MODES, DEFAULT_BOS

lake_option = click.option("--lake", default=DEFAULT_LAKE, help="Result lake: a directory or a pyarrow filesystem URI.")
format_option = click.option("--format", "fmt", type=click.Choice(FORMATS), default="table", help="Output format.")
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
