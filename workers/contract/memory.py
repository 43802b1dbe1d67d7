"""How many configs fit in one batched forward (``--batch-configs auto``).

Each config is one batch row: it brings its own KV cache for the whole document plus its share
of the chunk's activations. The estimate is deliberately simple and errs high (the masked cache
at full length, eager-sized attention probabilities), and only a fraction of the free memory is
planned for, so the choice survives allocator fragmentation and the model's own weights staying
resident. Batching never changes a number, only speed, so a rough estimate is enough.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch

from workers.contract.settings import cache_positions

# Of the memory free on the worker's device, the part the batch may plan for.
SAFETY_FRACTION = 0.5
# More configs per forward stops paying once the matmuls are large; smaller groups also give
# the actor pool more tasks to balance.
MAX_CONFIGS_PER_FORWARD = 32


@dataclass(frozen=True)
class ModelDims:
    """The sizes the estimate needs, whatever a config family calls them."""

    layers: int
    heads: int
    kv_heads: int
    head_dim: int
    hidden: int
    intermediate: int
    vocab: int


# Each size under the names config families give it, most common first. transformers' attribute
# maps cover some (GPT-2's n_layer reads as num_hidden_layers), not all (OPT's ffn_dim, GPT-2's n_inner).
_LAYERS = ("num_hidden_layers", "n_layer", "num_layers")
_HEADS = ("num_attention_heads", "n_head", "num_heads")
_HIDDEN = ("hidden_size", "n_embd", "d_model")
_KV_HEADS = ("num_key_value_heads", "num_kv_heads", "n_head_kv")
_INTERMEDIATE = ("intermediate_size", "n_inner", "ffn_dim", "ffn_hidden_size")
_VOCAB = ("vocab_size",)


def model_dims(model_config: Any) -> ModelDims:
    """Read the sizes from ``model_config``; ValueError naming the missing field otherwise.

    Fallbacks follow the models' own code: no kv-head count means one kv-head per query head,
    except multi-query configs (Falcon's and GPTBigCode's ``multi_query``), which have one in all;
    no head_dim means hidden / heads; no MLP width (GPT-2's ``n_inner=None``, BLOOM) means 4 x hidden.
    """
    layers = _size(model_config, _LAYERS)
    heads = _size(model_config, _HEADS)
    hidden = _size(model_config, _HIDDEN)
    if getattr(model_config, "multi_query", False) and not getattr(model_config, "new_decoder_architecture", False):
        kv_heads = 1
    else:
        kv_heads = _size(model_config, _KV_HEADS, default=heads)
    head_dim = _size(model_config, ("head_dim",), default=hidden // heads)
    intermediate = _size(model_config, _INTERMEDIATE, default=4 * hidden)
    return ModelDims(layers, heads, kv_heads, head_dim, hidden, intermediate, _size(model_config, _VOCAB))


def config_bytes(
    model_config: Any,
    max_tokens: int,
    chunk_size: int,
    dtype_bytes: int,
    static: bool,
    pages: int | None = None,
    page: int = 0,
) -> int:
    """Device bytes one more config (batch row) needs for a document of ``max_tokens``.

    The cache holds what the chunk step allocates (settings.cache_positions: the document's
    length uncompiled, its power-of-two length bucket with a compiled step's ``static`` shapes),
    P positions: KV cache layers x kv-heads x P x head_dim x 2 (keys, values) x dtype bytes; the
    engine's keep-mask and scores: 5 bytes per (layer, kv-head, position); activations of one
    chunk: hidden states and MLP intermediates, float32 logits and one layer's attention
    probabilities over the P positions (the eager backend and attention-reading presses).
    ``pages``: the config's pages per layer in a held cache's pool of ``page``-slot pages
    (workers/engine/capacity.py), None for every position. ValueError when the config lacks a
    size (see :func:`model_dims`).
    """
    d = model_dims(model_config)
    positions = cache_positions(max_tokens, chunk_size, static)
    hidden = chunk_size * (4 * d.hidden + 2 * d.intermediate) * dtype_bytes
    logits = chunk_size * d.vocab * (dtype_bytes + 4)
    held = positions if pages is None else min(pages * page // d.kv_heads, positions)
    probabilities = d.heads * chunk_size * held * 4
    return cache_bytes(d, positions, dtype_bytes, pages, page) + hidden + logits + probabilities


def cache_bytes(dims: ModelDims, positions: int, dtype_bytes: int, pages: int | None = None, page: int = 0) -> int:
    """What the step allocates per config for ``positions`` per (layer, kv-head): keys and values
    (head_dim x 2 x dtype bytes each) at every position, or in a held cache's ``pages`` pages per
    layer of ``page`` slots (workers/engine/pool.py) with each slot's position (8 bytes), each page's
    owner (8), each kv-head's first page and count (8 + 8); and the
    keep-mask and scores per position (1 + 4 bytes). The keys and values are what the
    ``kv_cache_bytes`` column reports. tests/test_memory.py reads every part off the tensors."""
    per_position = dims.layers * dims.kv_heads * positions * (1 + 4)
    if pages is None:
        return dims.layers * dims.kv_heads * positions * dims.head_dim * 2 * dtype_bytes + per_position
    slots = pages * page
    pool = slots * (dims.head_dim * 2 * dtype_bytes + 8) + pages * 8 + dims.kv_heads * 16
    return dims.layers * pool + per_position


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
    """The model's architecture config (no weights loaded), for the estimate above.

    ValueError for any failure: transformers and the hub raise many types for a missing or
    malformed config (OSError, ValueError, the hub's strict-dataclass validation errors), and
    each one only means the estimate cannot be made.
    """
    from transformers import AutoConfig

    from workers.contract.models import resolve_model

    source = resolve_model(model)
    try:
        config = AutoConfig.from_pretrained(source.location, **source.from_pretrained_args())
    except Exception as exc:
        reason = " ".join(line.strip() for line in str(exc).splitlines() if line.strip()) or type(exc).__name__
        raise ValueError(f"cannot read its config: {reason}") from exc
    return getattr(config, "text_config", config)


def _size(model_config: Any, names: tuple[str, ...], default: int | None = None) -> int:
    """The first of ``names`` the config sets (not None), else ``default``; a positive whole number."""
    found = next(((n, v) for n in names if (v := getattr(model_config, n, None)) is not None), None)
    name, value = found if found else (f"{names[0]} (derived)", default)
    if value is None:
        raise ValueError(f"its config ({type(model_config).__name__}) sets none of {', '.join(names)}")
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"its config ({type(model_config).__name__}) has {name}={value!r}, not a positive count")
    return value
