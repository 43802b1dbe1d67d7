"""Test helpers shared across modules: tiny models from configs and an independent NLL reference."""

from __future__ import annotations

from dataclasses import dataclass

import torch
from transformers import GPT2Config, GPT2LMHeadModel, LlamaConfig, LlamaForCausalLM

from workers.engine.core import doc_seed
from workers.presses import LayerContext, Press
from workers.presses.base import constant_scores

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


def tiny_gpt2(vocab_size: int = 97, seed: int = 0) -> GPT2LMHeadModel:
    """2 layers, 4 heads, learned absolute positions: a decoder without a rotary embedding."""
    torch.manual_seed(seed)
    config = GPT2Config(
        n_embd=32, n_layer=2, n_head=4, n_positions=4096, vocab_size=vocab_size, bos_token_id=0, eos_token_id=0
    )
    return GPT2LMHeadModel(config).eval()


@dataclass(frozen=True)
class FailingPress(Press):
    """A press that raises on document ``doc`` (on every document when ``doc`` is empty) and
    keeps every key elsewhere, like baseline. Test-only: a test registers it in
    ``workers.presses.REGISTRY``; Ray workers unpickle it from this module."""

    name = "failing"
    traceable = False  # raises by a host-side test of the document
    doc: str = ""

    def score(self, ctx: LayerContext, state: None) -> torch.Tensor:
        if not self.doc or ctx.doc_seed == doc_seed(self.doc):
            raise RuntimeError("failing press: refuses this document\nsecond line, not reported")
        return constant_scores(ctx, INF)


def full_forward_logits(model, ids: torch.Tensor, visible: torch.Tensor | None = None) -> torch.Tensor:
    """[n, V] float64 logits of one eager forward over the whole sequence.

    ``visible[i, j]`` (bool) is the explicit attention pattern, shared by every head, or
    ``visible[h, i, j]`` one per query head; None means the model's own (causal) mask.
    """
    model.set_attn_implementation("eager")
    mask = None  # the model's own mask: causal, with its sliding windows where it has them
    if visible is not None:
        mask = torch.zeros(visible.shape).masked_fill(~visible, -INF)
        mask = mask[None, None] if visible.dim() == 2 else mask[None]
    with torch.no_grad():
        return model(ids[None], attention_mask=mask).logits[0].double()


def full_forward_nll(model, ids: torch.Tensor, visible: torch.Tensor | None = None) -> torch.Tensor:
    """Per-position NLL of t[i+1] from one eager forward over the whole sequence (see
    :func:`full_forward_logits` for ``visible``)."""
    logits = full_forward_logits(model, ids, visible)[:-1]
    return torch.logsumexp(logits, -1) - logits.gather(-1, ids[1:, None])[:, 0]


def window_visible(n: int, chunk: int, window: int, n_sink: int = 0) -> torch.Tensor:
    """[n, n] what a query sees under the protocol with a press that evicts every key leaving the
    window: in chunk [s, e) the keys from s - window on (and the sinks), causally."""
    i = torch.arange(n)[:, None]
    j = torch.arange(n)[None, :]
    start = (i // chunk) * chunk
    return (j <= i) & ((j >= start - window) | (j < n_sink))


def chunk_sums(per_position: torch.Tensor, n: int, chunk: int) -> list[float]:
    return [float(per_position[s : min(s + chunk, n - 1)].sum()) for s in range(0, n, chunk)]


def write_head_table(path, head_class: list[list[str]], confidence: list[list[float]], recommended: list[list[int]]):
    """A heads table in HEADS_SCHEMA with the given [layer][head] classes (statistics filler)."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    from workers.contract.schema import HEADS_SCHEMA

    rows = []
    for layer, classes in enumerate(head_class):
        for head, cls in enumerate(classes):
            p = {c: float(c == cls) for c in ("positional", "mixed", "gathering")}
            rows.append(
                {
                    "model": "test",
                    "layer": layer,
                    "head": head,
                    "kv_head": head // 2,
                    "n_docs": 1,
                    "n_queries": 1,
                    "entropy": 0.5,
                    "mean_distance": 1.0,
                    "sink_mass": 0.0,
                    "recent_mass": 1.0,
                    "far_mass": 0.0,
                    "head_class": cls,
                    "confidence": confidence[layer][head],
                    "p_positional": p["positional"],
                    "p_mixed": p["mixed"],
                    "p_gathering": p["gathering"],
                    "doc_agreement": 1.0,
                    "recommended_context": recommended[layer][head],
                }
            )
    pq.write_table(pa.Table.from_pylist(rows, schema=HEADS_SCHEMA), path)
    return str(path)


def layer_context(
    start: int,
    end: int,
    score_from: int,
    keys: torch.Tensor,
    values: torch.Tensor,
    queries: torch.Tensor,
    layer: int = 0,
    **extra: object,
) -> LayerContext:
    """A LayerContext at exact shapes (keys of positions [0, end), the chunk's queries exact), as
    the uncompiled step builds it, from Python bounds: for testing a press's score alone."""
    positions = torch.arange(end)
    return LayerContext(
        layer=torch.tensor(layer),
        start=torch.tensor(start),
        end=torch.tensor(end),
        score_from=torch.tensor(score_from),
        positions=positions,
        query_positions=positions[start:end],
        keys_at=lambda at: keys.index_select(2, at),
        values_at=lambda at: values.index_select(2, at),
        kv_heads=keys.shape[1],
        new_keys=keys[:, :, start:end],
        new_values=values[:, :, start:end],
        queries=queries,
        doc_seed=torch.tensor(0),
        scored=positions[score_from:end],
        **extra,
    )
