"""kvorch's attention function, registered through transformers' attention interface.

Registering one function (instead of switching models to eager) lets the engine apply its own
per-(row, kv-head, position) keep-mask, capture queries and keys for the presses, and compute
attention probabilities only for the presses that need them, under any kernel (``--attn``).

Every attention variant a model passes through the interface is honoured, never swallowed:
``sliding_window`` (Mistral, Gemma 2/3 and Qwen local layers: query i sees keys j with
i - j < window) narrows the visible band, and ``softcap`` (Gemma 2) caps the logits as
``softcap * tanh(logits / softcap)`` before the mask; SDPA has no soft-capping, so a capped
layer always runs the eager math. Keyword arguments the model passes that kvorch does not know
are refused (``UnsupportedAttention``) rather than ignored, so a new variant can never be
silently dropped.
Called without a kvorch run (plain ``model(...)``), it behaves like causal attention with the
layer's window and cap.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol

import torch
import torch.nn.functional as F
from transformers import AttentionInterface

ATTENTION_NAME = "kvorch"
# Keyword arguments transformers' decoders pass that change nothing kvorch computes: mask
# helpers, cache bookkeeping and flash-attention plumbing that kvorch's own masking replaces.
_INERT_KWARGS = frozenset(
    {
        "position_ids",
        "cache_position",
        "output_attentions",
        "use_cache",
        "is_causal",
        "cu_seq_lens_q",
        "cu_seq_lens_k",
        "max_length_q",
        "max_length_k",
        "layer_head_mask",
        "head_mask",
        "past_key_value",
        "past_key_values",
        "position_embeddings",
        "target_dtype",
    }
)


class UnsupportedAttention(ValueError):
    """The model asks its attention for something kvorch cannot honour."""


class AttentionRun(Protocol):
    """The engine side of a forward: owns the KV state of every layer."""

    def attend(
        self,
        layer: int,
        query: torch.Tensor,
        key: torch.Tensor,
        value: torch.Tensor,
        scaling: float,
        variant: AttentionVariant,
    ) -> torch.Tensor: ...


@dataclass(frozen=True)
class AttentionVariant:
    """What one layer's attention does beyond plain scaled dot products: its sliding window
    (None: global) and logit soft-cap (None: none). Hashable, so masks can be cached per variant."""

    sliding_window: int | None = None
    softcap: float | None = None


GLOBAL = AttentionVariant()


def kvorch_attention(
    module: torch.nn.Module,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attention_mask: torch.Tensor | None,
    dropout: float = 0.0,
    scaling: float | None = None,
    sliding_window: int | None = None,
    softcap: float | None = None,
    kvorch_run: AttentionRun | None = None,
    **kwargs: object,
) -> tuple[torch.Tensor, None]:
    """Parameters in SDPA's order (dropout before scaling): wrappers that pass dropout
    positionally, as kvpress's attention patch does, then still work."""
    unknown = sorted(k for k, v in kwargs.items() if k not in _INERT_KWARGS and v is not None)
    if unknown:
        raise UnsupportedAttention(
            f"the model's attention passes {', '.join(unknown)}, which kvorch's attention does not implement"
        )
    if scaling is None:
        scaling = query.shape[-1] ** -0.5
    variant = AttentionVariant(int(sliding_window) if sliding_window else None, float(softcap) if softcap else None)
    if kvorch_run is None:
        c = query.shape[2]
        positions = torch.arange(c, device=query.device)
        visible = band(positions, positions, variant)[None, None].expand(query.shape[0], key.shape[1], c, c)
        out, _ = grouped_attention(query, key, value, visible, scaling, "sdpa", variant)
        return out.transpose(1, 2), None
    return kvorch_run.attend(module.layer_idx, query, key, value, scaling, variant), None


AttentionInterface.register(ATTENTION_NAME, kvorch_attention)


def band(query_positions: torch.Tensor, key_positions: torch.Tensor, variant: AttentionVariant) -> torch.Tensor:
    """[q, k] bool: causal, and inside the sliding window when the layer has one."""
    distance = query_positions[:, None] - key_positions[None, :]
    visible = distance >= 0
    if variant.sliding_window is not None:
        visible &= distance < variant.sliding_window
    return visible


def _logits(q: torch.Tensor, keys: torch.Tensor, scaling: float, variant: AttentionVariant) -> torch.Tensor:
    logits = (q @ keys.transpose(-2, -1)) * scaling
    if variant.softcap is not None:
        logits = torch.tanh(logits / variant.softcap) * variant.softcap
    return logits


def grouped_attention(
    query: torch.Tensor,
    keys: torch.Tensor,
    values: torch.Tensor,
    visible: torch.Tensor,
    scaling: float,
    backend: str,
    variant: AttentionVariant = GLOBAL,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Attention of a chunk's queries over a masked cache, one mask per (row, kv-head).

    query [B, H, c, D]; keys, values [B, Hkv, T, D]; visible [B, Hkv, c, T] bool (already
    narrowed to the layer's sliding window). Returns the output [B, H, c, D] and, when the
    eager math ran (``backend`` eager, or a soft-capped layer), the probabilities [B, H, c, T]
    (which the presses may reuse). GQA is handled by folding the query heads of a group into
    the query axis, so keys are never repeated.
    """
    b, h, c, d = query.shape
    hkv = keys.shape[1]
    groups = h // hkv
    q = query.reshape(b, hkv, groups * c, d)
    mask = visible[:, :, None].expand(b, hkv, groups, c, visible.shape[-1]).reshape(b, hkv, groups * c, -1)
    if backend in ("sdpa", "flex") and variant.softcap is None:
        out = F.scaled_dot_product_attention(q, keys, values, attn_mask=mask, scale=scaling)
        return out.reshape(b, h, c, d), None
    logits = _logits(q, keys, scaling, variant)
    probs = torch.softmax(logits.masked_fill(~mask, float("-inf")), dim=-1, dtype=torch.float32)
    out = probs.to(values.dtype) @ values
    return out.reshape(b, h, c, values.shape[-1]), probs.reshape(b, h, c, -1)


def attention_probabilities(
    query: torch.Tensor,
    keys: torch.Tensor,
    visible: torch.Tensor,
    scaling: float,
    variant: AttentionVariant = GLOBAL,
) -> torch.Tensor:
    """Softmax probabilities [B, H, c, T] in float32, for presses that observe attention."""
    b, h, c, d = query.shape
    hkv = keys.shape[1]
    q = query.reshape(b, hkv, (h // hkv) * c, d).float()
    logits = _logits(q, keys.float(), scaling, variant)
    logits = logits.view(b, hkv, h // hkv, c, -1).masked_fill(~visible[:, :, None], float("-inf"))
    return torch.softmax(logits, dim=-1).reshape(b, h, c, -1)


def flex_grouped_attention(
    query: torch.Tensor,
    keys: torch.Tensor,
    values: torch.Tensor,
    keep: torch.Tensor,
    chunk_index: torch.Tensor,
    scaling: float,
    variant: AttentionVariant,
) -> torch.Tensor:
    """:func:`grouped_attention` as one FlexAttention kernel, never materializing the [B, Hkv, c, T]
    mask: the block mask is built from ``keep`` [B, Hkv, T] and the chunk's position (query q of
    chunk k is at ``k * c + q``; causal, and the layer's sliding window), so fully evicted blocks
    are skipped, and the soft-cap is a score modification. GQA is native. Returns [B, H, c, D].

    The mask reads only the step's inputs (``keep`` and the 0-d ``chunk_index``): inductor's CPU
    template refuses masks over tensors computed inside the graph."""
    from torch.nn.attention.flex_attention import create_block_mask, flex_attention

    b, h, c, _ = query.shape
    groups = h // keys.shape[1]
    window = variant.sliding_window

    def mask_mod(batch: torch.Tensor, head: torch.Tensor, q: torch.Tensor, k: torch.Tensor) -> torch.Tensor:
        position = chunk_index * c + q
        visible = keep[batch, head // groups, k] & (k <= position)
        if window is not None:
            visible = visible & (position - k < window)
        return visible

    score_mod = None
    if variant.softcap is not None:
        cap = variant.softcap

        def score_mod(score: torch.Tensor, batch, head, q, k) -> torch.Tensor:
            return torch.tanh(score / cap) * cap

    block_mask = create_block_mask(mask_mod, b, h, c, keys.shape[2], device=query.device)
    return flex_attention(
        query, keys, values, score_mod=score_mod, block_mask=block_mask, scale=scaling, enable_gqa=True
    )
