"""kvorch's attention function, registered through transformers' attention interface.

Registering one function (instead of switching models to eager) lets the engine apply its own
per-(row, kv-head, position) keep-mask, capture queries and keys for the presses, and compute
attention probabilities only for the presses that need them, under any kernel (``--attn``).
Called without a kvorch run (plain ``model(...)``), it behaves like SDPA causal attention.
"""

from __future__ import annotations

from typing import Protocol

import torch
import torch.nn.functional as F
from transformers import AttentionInterface
from transformers.integrations.sdpa_attention import sdpa_attention_forward

ATTENTION_NAME = "kvorch"
BACKENDS = ("eager", "sdpa")


class AttentionRun(Protocol):
    """The engine side of a forward: owns the KV state of every layer."""

    def attend(
        self, layer: int, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, scaling: float
    ) -> torch.Tensor: ...


# Never traced by torch.compile (the engine's compiled forward breaks its graph here): the
# engine's attention and presses are Python over per-chunk bounds that would be specialized into
# a new graph every chunk; the model's projections, MLPs and norms around it stay compiled.
@torch.compiler.disable
def kvorch_attention(
    module: torch.nn.Module,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attention_mask: torch.Tensor | None,
    dropout: float = 0.0,
    scaling: float | None = None,
    kvorch_run: AttentionRun | None = None,
    **kwargs: object,
) -> tuple[torch.Tensor, None]:
    """Parameters in SDPA's order (dropout before scaling): wrappers that pass dropout
    positionally, as kvpress's attention patch does, then still work."""
    if kvorch_run is None:
        return sdpa_attention_forward(
            module, query, key, value, attention_mask, dropout=dropout, scaling=scaling, is_causal=True, **kwargs
        )
    return kvorch_run.attend(module.layer_idx, query, key, value, scaling), None


AttentionInterface.register(ATTENTION_NAME, kvorch_attention)


def grouped_attention(
    query: torch.Tensor, keys: torch.Tensor, values: torch.Tensor, visible: torch.Tensor, scaling: float, backend: str
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Attention of a chunk's queries over a masked cache, one mask per (row, kv-head).

    query [B, H, c, D]; keys, values [B, Hkv, T, D]; visible [B, Hkv, c, T] bool.
    Returns the output [B, H, c, D] and, for the eager backend, the probabilities
    [B, H, c, T] (which the presses may reuse). GQA is handled by folding the query heads of a
    group into the query axis, so keys are never repeated.
    """
    b, h, c, d = query.shape
    hkv = keys.shape[1]
    groups = h // hkv
    q = query.reshape(b, hkv, groups * c, d)
    mask = visible[:, :, None].expand(b, hkv, groups, c, visible.shape[-1]).reshape(b, hkv, groups * c, -1)
    if backend == "sdpa":
        out = F.scaled_dot_product_attention(q, keys, values, attn_mask=mask, scale=scaling)
        return out.reshape(b, h, c, d), None
    logits = (q @ keys.transpose(2, 3)) * scaling
    probs = torch.softmax(logits.masked_fill(~mask, float("-inf")), dim=-1, dtype=torch.float32)
    out = probs.to(values.dtype) @ values
    return out.reshape(b, h, c, d), probs.reshape(b, h, c, -1)


def attention_probabilities(
    query: torch.Tensor, keys: torch.Tensor, visible: torch.Tensor, scaling: float
) -> torch.Tensor:
    """Softmax probabilities [B, H, c, T] in float32, for presses that observe attention."""
    b, h, c, d = query.shape
    hkv = keys.shape[1]
    q = query.reshape(b, hkv, (h // hkv) * c, d).float()
    logits = (q @ keys.float().transpose(2, 3)) * scaling
    logits = logits.view(b, hkv, h // hkv, c, -1).masked_fill(~visible[:, :, None], float("-inf"))
    return torch.softmax(logits, dim=-1).reshape(b, h, c, -1)
