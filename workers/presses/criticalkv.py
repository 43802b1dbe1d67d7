"""CriticalKV (Feng et al., 2025, arXiv:2502.03805; kvpress CriticalKVPress): a key matters as
much as its value moves the attention output, so any scorer's score is reweighted by the L1 norm
of the value projected by the output projection, ``(s + epsilon) * mean_h ||W_o^h v||_1`` (the
mean over the kv-head's query heads h, W_o^h the rows of the output projection that head h feeds).

A wrapper: ``press=NAME`` (default snapkv) gives s. The projected norm of a key's value is
computed once, when the key arrives, and kept per layer for rescoring scorers.

Departure, deliberate: the paper's and kvpress's first stage (the top ``first_stage_ratio`` of
the kept budget chosen by s alone, before the reweighting) needs the keep limit, which kvorch's
engine applies after the press (the ratio and budget policies) or never has (the threshold
policy): kvorch runs the second stage alone, which is kvpress's ``first_stage_ratio=0``. Sinks and
the local window are the wrapper's own ``n_sink`` and ``protected_window`` fields.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from workers.presses.base import LayerContext, Press, StateShape
from workers.presses.registry import register
from workers.presses.wrapping import WrapperPress, latest_scores


@register
@dataclass(frozen=True)
class CriticalKVPress(WrapperPress, Press):
    name = "criticalkv"
    # The reweighted scale is the model's: about the 75th percentile of the scores of SmolLM2 with
    # snapkv (pydoc, 512 tokens), where snapkv's 0.001 sits. Another scorer needs --thresholds or
    # --densities.
    default_thresholds = (0.5,)
    reads_keys = True
    press: str = "snapkv"
    epsilon: float = 1e-4

    @property
    def rescores(self) -> bool:
        return self.inner.rescores

    def init_state(self, shape: StateShape) -> list[tuple]:
        inner = self.inner.init_state(shape) or [None] * shape.layers
        if len(shape.attention_modules) != shape.layers:
            raise ValueError("criticalkv needs the model's attention modules (the engine gives them)")
        projections = [output_projection(m, shape.heads, shape.head_dim) for m in shape.attention_modules]
        return [(entry, w, latest_scores(shape)) for entry, w in zip(inner, projections, strict=True)]

    def score(self, ctx: LayerContext, state: tuple) -> torch.Tensor:
        inner_state, projection, norms = state
        values = ctx.new_values.to(projection.dtype).repeat_interleave(ctx.n_groups, dim=1)  # [B, H, c, D]
        projected = torch.einsum("bhcd,hdo->bhco", values, projection).float().abs().sum(dim=-1)  # [B, H, c]
        b, h, c = projected.shape
        norms.index_copy_(2, ctx.query_positions, projected.view(b, ctx.kv_heads, ctx.n_groups, c).mean(dim=2))
        return (self.inner.score(ctx, inner_state).float() + self.epsilon) * norms[:, :, ctx.scored]


def output_projection(module: nn.Module | None, heads: int, head_dim: int) -> torch.Tensor:
    """[heads, head_dim, hidden]: the output projection's weight split by the head that feeds it
    (o_proj of Llama-like models, dense of GPT-NeoX, out_proj of OPT, c_proj of GPT-2), a copy."""
    for name in ("o_proj", "dense", "out_proj"):
        layer = getattr(module, name, None)
        if isinstance(layer, nn.Linear):
            return layer.weight.detach().T.reshape(heads, head_dim, -1).clone()
    layer = getattr(module, "c_proj", None)
    if layer is not None and getattr(layer, "weight", None) is not None:  # GPT-2's Conv1D: [in, out]
        return layer.weight.detach().reshape(heads, head_dim, -1).clone()
    raise ValueError(
        f"criticalkv: cannot find the output projection of {type(module).__name__}; "
        "it reads o_proj, dense, out_proj or c_proj"
    )
