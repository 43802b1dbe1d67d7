"""``kvorch kvzap train``: fit a KVzap surrogate for any model, in the format the kvzap press loads."""

from __future__ import annotations

from pathlib import Path

import click

from orchestrator.cli.job_options import (
    actors_option,
    address_option,
    bos_option,
    corpus_option,
    device_option,
    max_docs_option,
    max_tokens_option,
    model_option,
    spec_default,
)
from orchestrator.errors import KvorchError
from orchestrator.kvzap.settings import KINDS, MLPSettings, TrainSpec

_MLP = MLPSettings()


@click.group("kvzap")
def command() -> None:
    """KVzap surrogates: learned per-layer scorers of KVzip+ importance."""


@command.command("train")
@model_option
@corpus_option
@click.option("--out", required=True, type=click.Path(file_okay=False), help="Directory for the surrogate + report.")
@click.option(
    "--kind",
    type=click.Choice([*KINDS, "both"]),
    default="both",
    help="linear (ridge) or mlp (2-layer GELU); both writes OUT/linear and OUT/mlp.",
)
@max_docs_option(spec_default(TrainSpec, "max_docs"), help="Documents taken from the corpus (last ones held out).")
@max_tokens_option(spec_default(TrainSpec, "max_tokens"), help="Context tokens per document (the pass is ~2x that).")
@bos_option
@click.option(
    "--positions",
    type=int,
    default=spec_default(TrainSpec, "positions"),
    help="Context positions sampled per document (bounds memory).",
)
@click.option(
    "--heldout-fraction",
    type=float,
    default=spec_default(TrainSpec, "heldout_fraction"),
    help="Share of documents held out for R².",
)
@click.option(
    "--ridge-alpha", type=float, default=spec_default(TrainSpec, "ridge_alpha"), help="L2 penalty of the ridge fit."
)
@click.option("--hidden-dim", type=int, default=_MLP.hidden_dim, help="Hidden width of the MLP.")
@click.option("--epochs", type=int, default=_MLP.epochs, help="MLP training epochs.")
@click.option("--lr", type=float, default=_MLP.lr, help="MLP peak learning rate (AdamW, cosine to 0).")
@device_option
@actors_option
@address_option
@click.option(
    "--seed", type=int, default=spec_default(TrainSpec, "seed"), help="Seed of position sampling and MLP training."
)
def train(
    model: str,
    corpus: str,
    out: str,
    kind: str,
    max_docs: int,
    max_tokens: int,
    bos: str,
    positions: int,
    heldout_fraction: float,
    ridge_alpha: float,
    hidden_dim: int,
    epochs: int,
    lr: float,
    device: str,
    actors: int | None,
    address: str | None,
    connect_timeout: float,
    seed: int,
) -> None:
    """Extract KVzip+ targets over the corpus on Ray, fit per layer, write the published format."""
    # torch, transformers and Ray: imported once the command runs, never for --help.
    from orchestrator.kvzap.extraction import extract, fit, prepare_documents
    from orchestrator.kvzap.report import r2_table, thresholds_text, write_report

    for name, value in (("--max-docs", max_docs), ("--max-tokens", max_tokens), ("--positions", positions)):
        if value < 2:
            raise KvorchError(f"{name} must be at least 2 (got {value})")
    if not 0 < heldout_fraction < 1:
        raise KvorchError(f"--heldout-fraction must be between 0 and 1 (got {heldout_fraction})")
    if ridge_alpha < 0 or hidden_dim < 1 or epochs < 1 or lr <= 0:
        raise KvorchError("--ridge-alpha must be >= 0 and --hidden-dim, --epochs, --lr positive")
    spec = TrainSpec(
        model=model,
        corpus=corpus,
        out=out,
        kinds=KINDS if kind == "both" else (kind,),
        max_docs=max_docs,
        max_tokens=max_tokens,
        positions=positions,
        heldout_fraction=heldout_fraction,
        ridge_alpha=ridge_alpha,
        mlp=MLPSettings(hidden_dim=hidden_dim, epochs=epochs, lr=lr, seed=seed),
        device=device,
        actors=actors,
        seed=seed,
        bos=bos,
    )
    docs = prepare_documents(spec)
    samples = extract(docs, spec, address, connect_timeout)
    fitted = fit(samples, spec)
    header = (
        f"model `{model}`, corpus `{corpus}`: {len(docs)} documents x {max_tokens} tokens max (--bos {bos}), "
        f"{positions} positions sampled per document, held-out fraction {heldout_fraction}"
    )
    report, plot = write_report(fitted, Path(out), header)
    click.echo(r2_table(fitted))
    click.echo(thresholds_text(fitted))
    click.echo(f"report -> {report}; plot -> {plot}")
