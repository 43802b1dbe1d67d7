"""The settings of ``kvorch kvzap train`` (its options' defaults), free of torch, so the command's
``--help`` never loads it; extraction.py and fit.py do the work."""

from __future__ import annotations

from dataclasses import dataclass

from workers.contract import tokenization

KINDS = ("linear", "mlp")


@dataclass(frozen=True)
class MLPSettings:
    hidden_dim: int = 256
    epochs: int = 60
    batch_size: int = 256
    lr: float = 1e-3
    weight_decay: float = 1e-2
    grad_clip: float = 1.0
    val_fraction: float = 0.1
    seed: int = 0


@dataclass(frozen=True)
class TrainSpec:
    model: str
    corpus: str
    out: str
    kinds: tuple[str, ...] = KINDS
    max_docs: int = 8  # the last ones are held out
    max_tokens: int = 512  # context tokens per document; the pass is about twice that
    positions: int = 256  # context positions sampled per document: bounds memory
    heldout_fraction: float = 0.25
    ridge_alpha: float = 1.0
    mlp: MLPSettings = MLPSettings()
    device: str = "auto"
    actors: int | None = None
    seed: int = 0
    bos: str = tokenization.DEFAULT_BOS
