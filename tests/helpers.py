"""Test helpers shared across modules: tiny models from configs and an independent NLL reference."""

from __future__ import annotations

import torch
from transformers import LlamaConfig, LlamaForCausalLM

INF = float("inf")


def tiny_llama(vocab_size: int = 97, seed: int = 0, n_layers: int = 2) -> LlamaForCausalLM:
    """2 layers (default), 4 query heads over 2 kv-heads (GQA), float32: fast and architecture-faithful."""
    torch.manual_seed(seed)
    config = LlamaConfig(
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=n_layers,
        num_attention_heads=4,
        num_key_value_heads=2,
        vocab_size=vocab_size,
        max_position_embeddings=4096,
    )
    return LlamaForCausalLM(config).eval()


def full_forward_nll(model, ids: torch.Tensor, visible: torch.Tensor | None = None) -> torch.Tensor:
    """Per-position NLL of t[i+1] from one eager forward over the whole sequence.

    ``visible[i, j]`` (bool) is the explicit attention pattern; None means ordinary causal.
    """
    model.set_attn_implementation("eager")
    n = ids.shape[0]
    if visible is None:
        visible = torch.ones(n, n, dtype=torch.bool).tril()
    mask = torch.zeros(n, n).masked_fill(~visible, -INF)[None, None]
    with torch.no_grad():
        logits = model(ids[None], attention_mask=mask).logits[0, :-1].double()
    return torch.logsumexp(logits, -1) - logits.gather(-1, ids[1:, None])[:, 0]


def chunk_sums(per_position: torch.Tensor, n: int, chunk: int) -> list[float]:
    return [float(per_position[s : min(s + chunk, n - 1)].sum()) for s in range(0, n, chunk)]
