"""CriticalKV (Feng et al., 2025, arXiv:2502.03805; kvpress CriticalKVPress): a key matters as
much as its value moves the attention output, so any scorer's score is reweighted by the L1 norm
of the value projected by the output projection, ``(s + epsilon) * mean_h ||W_o^h v||_1`` (the
mean over the kv-head's query heads h, W_o^h the rows of the output projection that head h feeds).

A wrapper: ``press=NAME`` (default snapkv) gives s. The projected norm of a key's value is
computed once, when the key arrives, and kept per layer for rescoring scorers.

Two stages, as the paper and kvpress: under the ranked policies (ratio, budget) the top
floor(``first_stage_ratio`` x limit) competing keys by the scorer's own score are kept first
(sinks and window count toward them), the rest of the limit by the reweighted score
(workers/engine/decisions.py ``decide_by_budget``). kvpress's default 0.5; 0 is the second stage
alone. The threshold policy has no limit, so no first stage: it thresholds the reweighted score.
Under the adakv allocation (budgets moved between heads) a first stage is refused at submit in
one line (kvpress's CriticalAdaKVPress is a press of its own): give first_stage_ratio=0 there.
Sinks and the local window are the wrapper's own ``n_sink`` and ``protected_window`` fields.
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
    first_stage_ratio: float = 0.5

    def __post_init__(self) -> None:
        super().__post_init__()
        if not 0 <= self.first_stage_ratio <= 1:
            raise ValueError(f"criticalkv: first_stage_ratio must lie in [0, 1], got {self.first_stage_ratio:g}")

    @property
    def rescores(self) -> bool:
        return self.inner.rescores

    def init_state(self, shape: StateShape) -> list[tuple]:
        inner = self.inner.init_state(shape) or [None] * shape.layers
        if len(shape.attention_modules) != shape.layers:
            raise ValueError("criticalkv needs the model's attention modules (the engine gives them)")
        projections = [output_projection(m, shape.heads, shape.head_dim) for m in shape.attention_modules]
        return [
            (entry, w, latest_scores(shape), latest_scores(shape))
            for entry, w in zip(inner, projections, strict=True)
        ]

    def first_stage(self, state: tuple) -> tuple[float, torch.Tensor] | None:
        """The scorer's latest scores, for the first stage (None at ratio 0: one stage)."""
        return (self.first_stage_ratio, state[3]) if self.first_stage_ratio > 0 else None

    def score(self, ctx: LayerContext, state: tuple) -> torch.Tensor:
        inner_state, projection, norms, inner_scores = state
        values = ctx.new_values.to(projection.dtype).repeat_interleave(ctx.n_groups, dim=1)  # [B, H, c, D]
        projected = torch.einsum("bhcd,hdo->bhco", values, projection).float().abs().sum(dim=-1)  # [B, H, c]
        b, h, c = projected.shape
        norms.index_copy_(2, ctx.query_positions, projected.view(b, ctx.kv_heads, ctx.n_groups, c).mean(dim=2))
        scores = self.inner.score(ctx, inner_state).float()
        inner_scores.index_copy_(2, ctx.scored, scores)
        return (scores + self.epsilon) * norms[:, :, ctx.scored]


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
