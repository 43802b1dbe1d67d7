"""KVzip (Kim et al., 2025, arXiv:2505.23416; kvpress KVzipPress): keep the keys the model needs
to reconstruct the context.

After the context, the model reads a repeat instruction and then the context again
(teacher-forced); a context key's importance is the largest attention probability it receives
from any of those reconstruction queries, over the query heads of its kv-group:

    score[l, g, i] = max_{t after the context, h in group g} A^l_h[t, i]

The scores come from one plain forward of ``context + repeat prompt + context`` before the
context is compressed (workers/engine/replay.py computes them; the actor binds them to the press
per document with :meth:`KVzipPress.with_context_scores`), so the press only looks them up: the
engine's chunk step is unchanged. That needs the whole context before the first eviction, so
KVzip runs only in question runs under ``--protocol once`` and is refused before the job starts
otherwise (orchestrator/sweep/spec.py), or, through the Python API, by :meth:`init_state`.

Departures from kvpress, on purpose:
- kvpress replays a context longer than its ``chunk_size`` (2,048 tokens) in chunks, each chunk's
  softmax over the sinks, that chunk and the replay's own keys; kvorch replays the whole context in
  one forward, every softmax over every key (exact attention; the two agree up to 2,048 tokens).
- kvpress gives the sinks the top score and ranks keys over all layers at once (``layerwise``
  False); kvorch keeps ``n_sink`` sinks and the DMS window as every press does, and the policy and
  allocation (``--policy``, ``--allocation``) decide the rest.
- Keys after the replayed span (the question unless ``--query-aware``, the generated answer) score
  +inf: KVzip compresses the context only, as kvpress does.
The repeat instruction is kvpress's (``REPEAT_PROMPT``, then the chat template's assistant turn or
a newline), and the context is repeated as it was read (its BOS included), as kvpress does for a
model without a chat template.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any, ClassVar

import torch

from workers.presses.base import LayerContext, Press, StateShape
from workers.presses.registry import register

REPEAT_PROMPT = "\n\nRepeat the previous context exactly."


@register
@dataclass(frozen=True)
class KVzipPress(Press):
    name = "kvzip"
    # The largest attention a key receives while the context is repeated: about the median on
    # SmolLM2-135M (0.0056 over 3 pydoc documents of 512 tokens; quartiles 0.0021 and 0.0205).
    default_thresholds = (0.005,)
    replays_context: ClassVar[bool] = True
    n_sink: int = 4

    def with_context_scores(self, scores: torch.Tensor) -> KVzipPress:
        """This press for one document: ``scores`` [layers, kv-heads, n] of the context's n keys
        (workers/engine/replay.py). Not a field: the config's label stays ``kvzip``."""
        bound = dataclasses.replace(self)
        object.__setattr__(bound, "_context_scores", scores)
        return bound

    def init_state(self, shape: StateShape) -> list[torch.Tensor]:
        scores: torch.Tensor | None = getattr(self, "_context_scores", None)
        if scores is None:
            raise ValueError(
                "kvzip scores keys by replaying the whole context before compressing it: it runs in question "
                "runs under --protocol once (e.g. --task ruler --protocol once)"
            )
        n = min(scores.shape[-1], shape.positions)
        states = []
        for layer in scores[:, :, :n].to(shape.device, torch.float32):  # one tensor per layer, not views of one
            state = torch.full((shape.rows, shape.kv_heads, shape.positions), torch.inf, device=shape.device)
            state[:, :, :n] = layer
            states.append(state)
        return states

    def score(self, ctx: LayerContext, state: torch.Tensor) -> torch.Tensor:
        return state[:, :, ctx.scored]


def repeat_prompt_ids(tokenizer: Any) -> list[int]:
    """The ids read between the context and its repeat: kvpress's instruction, then the chat
    template's end of the user turn and start of the assistant's (a newline without a template)."""
    suffix = "\n"
    if getattr(tokenizer, "chat_template", None):
        dummy = "dummy context"
        separator = "\n" + "#" * len(dummy)
        text = tokenizer.apply_chat_template(
            [{"role": "user", "content": dummy + separator}], add_generation_prompt=True, tokenize=False
        )
        suffix = text.split(separator)[1]
    return tokenizer.encode(REPEAT_PROMPT, add_special_tokens=False) + tokenizer.encode(
        suffix, add_special_tokens=False
    )
