"""What kvpress's own presses compute on one prefill, captured from their hooks on a plain eager
transformers forward of a separate copy of the tiny model (nothing of kvorch's attention, RoPE or
cache takes part), and the rank correlation the agreement tests compare with. Shared by every
tests_kvpress file that holds a native press against its kvpress counterpart."""

from __future__ import annotations

import kvpress
import torch
from transformers import DynamicCache

from tests.helpers import tiny_llama


def kvpress_scores(press: kvpress.ScorerPress, tokens: torch.Tensor) -> torch.Tensor:
    """[layers, kv-heads, N]: what ``press.score`` returned in each layer's hook of one prefill
    (eager attention, weights returned: ObservedAttention, TOVA and SnapKV read them)."""
    model = tiny_llama()
    model.set_attn_implementation("eager")
    captured = []
    score = press.score

    def recording(*args):
        result = score(*args)
        captured.append(result[0].double())
        return result

    object.__setattr__(press, "score", recording)  # a fresh instance per call: the wrapper never outlives it
    with press(model), torch.no_grad():
        model(tokens[None], past_key_values=DynamicCache(config=model.config), output_attentions=True)
    assert len(captured) == model.config.num_hidden_layers
    return torch.stack(captured)


def kvpress_kept(press: kvpress.BasePress, tokens: torch.Tensor) -> list[set[int]]:
    """Per layer, the positions whose keys ``press.compress`` kept in one prefill (sdpa: ChunkKV
    refuses attention weights)."""
    model = tiny_llama()
    model.set_attn_implementation("sdpa")
    kept = []
    compress = press.compress

    def recording(module, hidden_states, keys, values, attentions, kwargs):
        out_keys, out_values = compress(module, hidden_states, keys, values, attentions, kwargs)
        same = (out_keys[0, 0, :, None] == keys[0, 0, None]).all(dim=-1)  # [kept, N]
        kept.append({int(i) for i in same.nonzero()[:, 1]})
        return out_keys, out_values

    object.__setattr__(press, "compress", recording)
    with press(model), torch.no_grad():
        model(tokens[None], past_key_values=DynamicCache(config=model.config))
    return kept


def spearman(a: torch.Tensor, b: torch.Tensor) -> float:
    """Rank correlation of two 1-D tensors (no ties among continuous scores)."""
    ra = a.argsort().argsort().double()
    rb = b.argsort().argsort().double()
    ra, rb = ra - ra.mean(), rb - rb.mean()
    return float((ra * rb).sum() / (ra.norm() * rb.norm()))
