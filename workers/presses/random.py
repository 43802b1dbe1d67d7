"""Random scores U(0, 1): the control every scorer must beat at the same density.

A key's score is a counter-based hash of (seed, document, layer, kv-head, position), so it
depends on nothing else: not on which other configs share the batch, not on the chunk size, and
not on whether the chunk step is compiled (a hash of tensors compiles; a torch.Generator does
not). Thresholds nest: a key kept at threshold 0.7 is kept at 0.5.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from workers.presses.base import LayerContext, Press
from workers.presses.registry import register

_LOW32 = 0xFFFF_FFFF


def _mix32(x: torch.Tensor) -> torch.Tensor:
    """A 32-bit integer mixer (xorshift-multiply, constants < 2**31 so int64 products never
    overflow): every input bit flips about half the output bits."""
    x = x ^ (x >> 16)
    x = (x * 0x7FEB352D) & _LOW32
    x = x ^ (x >> 15)
    x = (x * 0x2C1B3C6D) & _LOW32
    return x ^ (x >> 16)


def uniform_scores(
    seed: int, doc_seed: torch.Tensor | int, layer: torch.Tensor | int, n_kv_heads: int, positions: torch.Tensor
) -> torch.Tensor:
    """[n_kv_heads, len(positions)] float32 in [0, 1): the hash's top 24 bits, exact in float32."""
    device = positions.device
    doc = torch.as_tensor(doc_seed, dtype=torch.int64, device=device)
    h = _mix32(torch.tensor(seed & _LOW32, dtype=torch.int64, device=device))
    h = _mix32(h ^ (doc & _LOW32))
    h = _mix32(h ^ ((doc >> 32) & _LOW32))
    h = _mix32(h ^ layer)
    heads = torch.arange(n_kv_heads, device=device, dtype=torch.int64)
    h = _mix32(h ^ heads)[:, None]
    h = _mix32(h ^ (positions.to(torch.int64)[None, :] & _LOW32))
    return (h >> 8).to(torch.float32) * 2.0**-24


@register
@dataclass(frozen=True)
class RandomPress(Press):
    name = "random"
    default_thresholds = (0.5,)
    n_sink: int = 4
    seed: int = 0

    def score(self, ctx: LayerContext, state: None) -> torch.Tensor:
        return uniform_scores(self.seed, ctx.doc_seed, ctx.layer, ctx.kv_heads, ctx.scored).expand(ctx.rows, -1, -1)
