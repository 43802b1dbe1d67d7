"""StreamingLLM (Xiao et al., 2023, arXiv:2309.17453): attention sinks + sliding window.

The first ``n_sink`` document positions are protected by the engine; every other key scores
-inf and is evicted when it leaves the window, so the cache is exactly sinks + window.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from workers.presses.base import LayerContext, Press, constant_scores
from workers.presses.registry import register


@register
@dataclass(frozen=True)
class StreamingLLMPress(Press):
    name = "streaming_llm"
    constant_score = float("-inf")
    n_sink: int = 4

    def score(self, ctx: LayerContext, state: None) -> torch.Tensor:
        return constant_scores(ctx, float("-inf"))
