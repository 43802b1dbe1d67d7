"""How many configs fit in one batched forward (``--batch-configs auto``).

Each config is one batch row: it brings its own KV cache for the whole document plus its share
of the chunk's activations. The estimate is deliberately simple and errs high (the masked cache
at full length, eager-sized attention probabilities), and only a fraction of the free memory is
planned for, so the choice survives allocator fragmentation and the model's own weights staying
resident. Batching never changes a number, only speed, so a rough estimate is enough.
"""

from __future__ import annotations

from typing import Any

import torch

# Of the memory free on the worker's device, the part the batch may plan for.
SAFETY_FRACTION = 0.5
# More configs per forward stops paying once the matmuls are large; smaller groups also give
# the actor pool more tasks to balance.
MAX_CONFIGS_PER_FORWARD = 32


def config_bytes(model_config: Any, max_tokens: int, chunk_size: int, dtype_bytes: int) -> int:
    """Device bytes one more config (batch row) needs for a document of ``max_tokens``.

    KV cache: layers x kv-heads x max_tokens x head_dim x 2 (keys, values) x dtype bytes; the
    engine's keep-mask and scores: 5 bytes per (layer, kv-head, position); activations of one
    chunk: hidden states and MLP intermediates, float32 logits and one layer's attention
    probabilities over the document (the eager backend and attention-reading presses).
    """
    layers = model_config.num_hidden_layers
    heads = model_config.num_attention_heads
    kv_heads = getattr(model_config, "num_key_value_heads", None) or heads
    head_dim = getattr(model_config, "head_dim", None) or model_config.hidden_size // heads
    kv_cache = layers * kv_heads * max_tokens * head_dim * 2 * dtype_bytes
    bookkeeping = layers * kv_heads * max_tokens * (4 + 1)
    hidden = chunk_size * (4 * model_config.hidden_size + 2 * model_config.intermediate_size) * dtype_bytes
    logits = chunk_size * model_config.vocab_size * (dtype_bytes + 4)
    probabilities = heads * chunk_size * max_tokens * 4
    return kv_cache + bookkeeping + hidden + logits + probabilities


def configs_per_forward(per_config: int, available: int, cap: int = MAX_CONFIGS_PER_FORWARD) -> int:
    """As many configs as a safe fraction of ``available`` bytes holds, between 1 and ``cap``."""
    return max(1, min(cap, int(available * SAFETY_FRACTION) // max(1, per_config)))


def available_bytes(device: str) -> int:
    """Free memory of this process's device: the current GPU's, else the machine's available RAM."""
    if device == "cuda":
        free, _ = torch.cuda.mem_get_info()
        return free
    import psutil

    return psutil.virtual_memory().available


def model_config(model: str) -> Any:
    """The model's architecture config (no weights loaded), for the estimate above."""
    from transformers import AutoConfig

    from workers.models import resolve_model

    source = resolve_model(model)
    config = AutoConfig.from_pretrained(source.location, **source.from_pretrained_args())
    return getattr(config, "text_config", config)
