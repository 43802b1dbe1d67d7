"""The context replay of KVzip-style presses: one plain forward of ``context + prompt + context``.

A press with ``replays_context`` (KVzip) scores each context key by the largest attention it
receives while the model reads the context a second time. That is one forward of the uncompressed
model, before the context is compressed, the same for every config of a batch: it runs here, once
per document, through kvorch's attention function (the hooked model's ``kvorch_run``), and each
such config's press is bound to the scores (``with_context_scores``). The chunk step never sees
it. Attention is exact (causal, the layer's sliding window and soft-cap); the probabilities of
the replay's queries are formed ``QUERY_BLOCK`` rows at a time, so memory grows with the sequence,
not with its square.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from workers.contract.configs import EvalConfig
from workers.engine.hooks import HookedModel
from workers.modeling.attention import GLOBAL, AttentionVariant, attention_probabilities, band, grouped_attention

# Replay queries whose probabilities are formed at once: [heads, QUERY_BLOCK, sequence] floats.
QUERY_BLOCK = 512


class _ReplayRun:
    """An attention run of a plain causal forward that keeps, per layer, the largest probability each
    of the first ``n_context`` keys receives from the queries after them, over each kv-group."""

    def __init__(self, n_layers: int, n_context: int) -> None:
        self.n_context = n_context
        self.scores: list[torch.Tensor | None] = [None] * n_layers

    def attend(
        self,
        layer: int,
        query: torch.Tensor,
        key: torch.Tensor,
        value: torch.Tensor,
        scaling: float,
        variant: AttentionVariant,
    ) -> torch.Tensor:
        b, h, n, _ = query.shape
        hkv, ctx = key.shape[1], self.n_context
        positions = torch.arange(n, device=query.device)
        if variant == GLOBAL:  # plain causal attention: no [n, n] mask
            kv = (t.repeat_interleave(h // hkv, dim=1) for t in (key, value))
            out = F.scaled_dot_product_attention(query, *kv, is_causal=True, scale=scaling)
        else:
            visible = band(positions, positions, variant).expand(b, hkv, n, n)
            out, _ = grouped_attention(query, key, value, visible, scaling, "sdpa", variant)
        best = query.new_zeros(b, hkv, ctx, dtype=torch.float32)
        for start in range(ctx, n, QUERY_BLOCK):
            rows = slice(start, min(n, start + QUERY_BLOCK))
            seen = band(positions[rows], positions, variant).expand(b, hkv, -1, n)
            probs = attention_probabilities(query[:, :, rows], key, seen, scaling, variant)  # [b, h, q, n]
            block = probs[..., :ctx].amax(dim=2).view(b, hkv, h // hkv, ctx).amax(dim=2)
            best = torch.maximum(best, block)
        self.scores[layer] = best[0]
        return out.transpose(1, 2)


@torch.inference_mode()
def context_scores(hooked: HookedModel, context_ids: torch.Tensor, prompt_ids: torch.Tensor) -> torch.Tensor:
    """[layers, kv-heads, n_context]: KVzip's score of every context key, from one forward of
    ``context + prompt + context``."""
    n_context = int(context_ids.shape[0])
    ids = torch.cat([context_ids, prompt_ids.to(context_ids.dtype), context_ids]).to(hooked.device)
    run = _ReplayRun(hooked.model.config.num_hidden_layers, n_context)
    try:
        positions = torch.arange(ids.shape[0], device=hooked.device)
        hooked.model.base_model(input_ids=ids[None], position_ids=positions[None], use_cache=False, kvorch_run=run)
    finally:
        hooked.hidden_states.clear()
    return torch.stack(run.scores)


def bind_replays(
    hooked: HookedModel, configs: list[EvalConfig], context_ids: torch.Tensor, prompt_ids: torch.Tensor
) -> list[EvalConfig]:
    """``configs`` with every press that replays the context bound to this document's scores
    (computed once, for all of them); the others as they are."""
    if not any(c.press.replays_context for c in configs):
        return configs
    scores = context_scores(hooked, context_ids, prompt_ids)
    return [
        EvalConfig(c.press.with_context_scores(scores), c.threshold, c.ratio, c.budget, c.allocation)
        if c.press.replays_context
        else c
        for c in configs
    ]
