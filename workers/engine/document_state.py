"""The chunk step's state for one document: every tensor a chunk reads or writes in place.

With static shapes the first document allocates it and later ones refill the same tensors in
place (:meth:`DocumentState.refill`), so a CUDA graph replays over the same addresses; with exact
shapes every document allocates its own (its length is the cache's). The chunk index lives here
and advances inside the compiled step, so one graph serves every chunk.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any

import torch

from workers.contract.plan import AnswerSpan
from workers.engine import cache
from workers.engine.chunk_results import ChunkResults


@dataclass(frozen=True)
class StateSizes:
    """The shapes a document's state is allocated at."""

    batch: int
    n_layers: int
    n_kv_heads: int
    head_dim: int
    n_positions: int  # the cache length: the document's, or its length bucket (static shapes)
    chunk_size: int
    dtype: torch.dtype
    device: torch.device
    agreement: bool  # the results hold agreement sums (the layout has a reference row)
    # Chunks the results hold at least: more than the chunk size's when the host plans its own
    # spans (a question's prompt: the context in one chunk, then the question).
    min_chunks: int = 0


@dataclass
class DocumentState:
    cache: list[list[cache.LayerCache]]  # [layer][band]
    bands: list[cache.Band | cache.PoolBand]
    keep: list[torch.Tensor]  # per layer [B, Hkv, N] bool: what each config still holds
    scores: list[torch.Tensor]  # per layer [B, Hkv, N] float32
    tokens: torch.Tensor  # [N + 1] int64: the document, zero-padded (the last target included)
    length: torch.Tensor  # 0-d int64: the document's tokens
    doc_seed: torch.Tensor  # 0-d int64 (the random press's seed)
    chunk_index: torch.Tensor  # 0-d int64: the next chunk to run (static shapes advance it)
    answer_from: torch.Tensor  # 0-d int64: the first position predicting an answer token
    answer_to: torch.Tensor  # 0-d int64: one past the last (0, 0 for a document that is no probe)
    # Per layer and row: the most keys the layer's kv-heads held together before a chunk (what the
    # row's pool needs room for, learned by the engine); per row: whether its pool ran out of pages.
    peak: torch.Tensor  # [layers, B] int64
    overflow: torch.Tensor  # [B] bool
    # Per row: the greedy prediction at the last real position of the latest chunk; after the
    # prompt's last chunk, each config's first generated token (workers/engine/generation.py).
    next_token: torch.Tensor  # [B] int64
    # Answer sums always, so probes and corpus documents share one graph.
    results: ChunkResults
    press_states: list[Any]  # per press group: its press's state (per layer), or None

    @classmethod
    def allocate(
        cls, bands: list[cache.Band | cache.PoolBand], sizes: StateSizes, press_states: list[Any]
    ) -> DocumentState:
        b, hkv, n = sizes.batch, sizes.n_kv_heads, sizes.n_positions
        device = sizes.device

        def scalar() -> torch.Tensor:
            return torch.zeros((), dtype=torch.int64, device=device)

        return cls(
            cache=[
                [cache.allocate(band, layer, hkv, sizes.head_dim, sizes.dtype, device) for band in bands]
                for layer in range(sizes.n_layers)
            ],
            bands=bands,
            keep=[torch.ones(b, hkv, n, dtype=torch.bool, device=device) for _ in range(sizes.n_layers)],
            scores=[torch.zeros(b, hkv, n, device=device) for _ in range(sizes.n_layers)],
            tokens=torch.zeros(n + 1, dtype=torch.int64, device=device),
            length=scalar(),
            doc_seed=scalar(),
            chunk_index=scalar(),
            answer_from=scalar(),
            answer_to=scalar(),
            peak=torch.zeros(sizes.n_layers, b, dtype=torch.int64, device=device),
            overflow=torch.zeros(b, dtype=torch.bool, device=device),
            next_token=torch.zeros(b, dtype=torch.int64, device=device),
            results=ChunkResults.zeros(
                max(-(-n // sizes.chunk_size), sizes.min_chunks), b, device, sizes.agreement, True
            ),
            press_states=press_states,
        )

    def refill(self, press_states: list[Any]) -> None:
        """Back to a fresh document's values, in place (static shapes: the same addresses)."""
        for layer in self.cache:
            for layer_cache, band in zip(layer, self.bands, strict=True):
                cache.clear(layer_cache, band)
        for tensor in self.scores:
            tensor.zero_()
        for tensor in self.keep:
            tensor.fill_(True)
        for tensor in (self.tokens, self.chunk_index, self.peak, self.overflow, self.next_token):
            tensor.zero_()
        for tensor in self.results.fields().values():
            tensor.zero_()
        for target, source in zip(_tensors(self.press_states), _tensors(press_states), strict=True):
            target.copy_(source)

    def load(self, doc_seed: int, token_ids: torch.Tensor, answer: AnswerSpan | None) -> None:
        """The document's own values: its tokens, length, seed and answer positions."""
        n_doc = int(token_ids.shape[0])
        self.tokens[:n_doc] = token_ids
        self.length.fill_(n_doc)
        self.doc_seed.fill_(doc_seed)
        # The positions whose predictions are answer tokens: none for a document that is no probe.
        self.answer_from.fill_(answer.predicted_from if answer else 0)
        self.answer_to.fill_(answer.predicted_from + answer.tokens if answer else 0)

    def tensors(self) -> list[torch.Tensor]:
        """Every tensor of the state (what a CUDA graph must find at static addresses)."""
        return _tensors(self)


def _tensors(tree: Any) -> list[torch.Tensor]:
    """Every tensor in a state tree (dicts, lists, dataclasses of tensors; modules are skipped)."""
    if isinstance(tree, torch.Tensor):
        return [tree]
    if isinstance(tree, dict):
        return [t for value in tree.values() for t in _tensors(value)]
    if isinstance(tree, (list, tuple)):
        return [t for value in tree for t in _tensors(value)]
    if dataclasses.is_dataclass(tree) and not isinstance(tree, type):
        return [t for f in dataclasses.fields(tree) for t in _tensors(getattr(tree, f.name))]
    return []
