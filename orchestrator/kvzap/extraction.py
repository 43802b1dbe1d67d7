"""``kvorch kvzap train`` end to end: targets on Ray, per-layer fits, the published format.

Target extraction is the expensive part (one eager forward of ``context + prompt + context``
per document), so it runs on the same kind of Ray pool as ``submit``: named actors pulling
documents, longest first. Fitting is cheap and runs on the driver. Documents are split into
training and held-out sets before anything is fitted, so R² is measured on unseen documents.
"""

from __future__ import annotations

import sys
from dataclasses import dataclass
from pathlib import Path

import torch
from tqdm import tqdm

from orchestrator.corpus import model_inputs
from orchestrator.errors import KvorchError
from orchestrator.kvzap.fit import fit_mlp, fit_ridge, r2_score
from orchestrator.kvzap.settings import KINDS, MLPSettings, TrainSpec
from orchestrator.pool import actors
from orchestrator.pool.connect import DEFAULT_CONNECT_TIMEOUT
from workers.presses.kvzap import save_surrogate
from workers.studies.kvzap_targets import TargetDocument, TargetSamples, TargetWorker

__all__ = ["KINDS", "MLPSettings", "TrainSpec", "extract", "fit", "prepare_documents"]

REPEAT_PROMPT = "Repeat the previous context exactly."
# Fractions of held-out keys a suggested threshold keeps: low, moderate and high densities.
SUGGESTED_DENSITIES = (0.25, 0.5, 0.75)
# The one recorded in config.json as the press default: a moderate density.
DEFAULT_DENSITY = 0.5


@dataclass(frozen=True)
class FittedKind:
    """One surrogate kind: where it was written, held-out R² per layer, suggested thresholds."""

    kind: str
    path: Path
    r2: list[float]
    thresholds: dict[float, float]


def prompt_ids(tokenizer) -> list[int]:
    """The repeat instruction, through the chat template when the tokenizer has one."""
    if getattr(tokenizer, "chat_template", None):
        messages = [{"role": "user", "content": REPEAT_PROMPT}]
        text = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    else:
        text = f"\n\n{REPEAT_PROMPT}\n\n"
    return tokenizer(text, add_special_tokens=False)["input_ids"]


def prepare_documents(spec: TrainSpec) -> list[TargetDocument]:
    """Tokenize the corpus: each context (BOS first as ``--bos`` resolves), the shared prompt, and
    the context again without BOS."""
    tokens, corpus = model_inputs(spec.model, spec.corpus, spec.bos)
    prompt = prompt_ids(tokens.tokenizer)
    docs = []
    for document in corpus[: spec.max_docs]:
        context = tokens.ids(document.text, spec.max_tokens)
        repeat = context[1:] if tokens.bos_id is not None else context
        docs.append(TargetDocument(document.doc_id, context, prompt, repeat))
    if len(docs) < 2:
        raise KvorchError("kvzap train needs at least 2 documents (training and held-out); raise --max-docs")
    return docs


def extract(
    docs: list[TargetDocument],
    spec: TrainSpec,
    address: str | None,
    connect_timeout: float = DEFAULT_CONNECT_TIMEOUT,
) -> list[TargetSamples]:
    """Targets of every document on a Ray pool of named actors, one document in flight per actor."""
    actors.start_ray(address, "kvorch-kvzap", connect_timeout)
    pool = actors.plan_pool(spec.actors, spec.device)
    return actors.map_on_pool(
        TargetWorker,
        (spec.model, pool.device, pool.threads),
        "run",
        [(d.doc_id, (d, spec.positions, spec.seed + i), len(d.context_ids)) for i, d in enumerate(docs)],
        pool,
        label="kvzap-targets",
        hint="check --model/--device or lower --max-tokens",
    )


def split(samples: list[TargetSamples], heldout_fraction: float) -> tuple[list[TargetSamples], list[TargetSamples]]:
    """The last documents (at least one) are held out; the rest train."""
    n_heldout = min(len(samples) - 1, max(1, round(len(samples) * heldout_fraction)))
    return samples[:-n_heldout], samples[-n_heldout:]


def _stack(samples: list[TargetSamples], layer: int) -> tuple[torch.Tensor, torch.Tensor]:
    return torch.cat([s.hidden[layer] for s in samples]), torch.cat([s.targets[layer] for s in samples])


def fit(samples: list[TargetSamples], spec: TrainSpec) -> list[FittedKind]:
    """Fit every requested kind per layer, write each in the published format, score held-out R²."""
    train, heldout = split(samples, spec.heldout_fraction)
    n_layers = samples[0].hidden.shape[0]
    out = Path(spec.out)
    fitted = []
    for kind in spec.kinds:
        modules, r2, predictions = torch.nn.ModuleList(), [], []
        for layer in tqdm(range(n_layers), desc=f"kvzap fit {kind}", unit="layer", file=sys.stderr):
            x, y = _stack(train, layer)
            x_test, y_test = _stack(heldout, layer)
            module = fit_ridge(x, y, spec.ridge_alpha) if kind == "linear" else fit_mlp(x, y, spec.mlp)
            with torch.no_grad():
                pred = module(x_test)
            modules.append(module)
            r2.append(r2_score(pred, y_test))
            predictions.append(pred.flatten())
        path = out / kind if len(spec.kinds) > 1 else out
        thresholds = suggest_thresholds(torch.cat(predictions))
        hidden_dim = None if kind == "linear" else spec.mlp.hidden_dim
        save_surrogate(modules, path, hidden_dim, threshold=thresholds[DEFAULT_DENSITY])
        fitted.append(FittedKind(kind, path, r2, thresholds))
    return fitted


def suggest_thresholds(predicted: torch.Tensor) -> dict[float, float]:
    """Thresholds that keep about 25/50/75% of held-out keys: a key is kept when score >= threshold."""
    return {d: round(float(predicted.quantile(1 - d)), 2) for d in SUGGESTED_DENSITIES}
