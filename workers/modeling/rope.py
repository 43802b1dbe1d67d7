"""Rotary-embedding algebra the presses need: undoing RoPE and averaging it over positions.

Every RoPE variant transformers ships rotates the first ``rotary_dim`` dims by
``x*cos + rotate(x)*sin``, where ``rotate`` pairs dimensions and negates one of each pair, and
cos/sin come from the model's rotary module. Only two things differ between families:
- cos/sin (default, llama3, yarn, partial rotary as in GPT-NeoX, per-layer bases as in Gemma 3's
  local and global layers), which kvorch always takes from the model's own rotary module;
- the pairing of ``rotate``: halves (``rotate_half``, Llama) or neighbours (interleaved, Cohere),
  which kvorch takes from the model's own modeling module (:func:`model_rotate`).
So one implementation, parameterized by ``rotate``, covers them all: R(p) = diag(cos) + diag(sin) P
with P the matrix of ``rotate``, P^2 = -I, hence R(p)^-1 = diag(cos) - diag(sin) P.
"""

from __future__ import annotations

import sys
from collections.abc import Callable
from dataclasses import dataclass

import torch

Rotate = Callable[[torch.Tensor], torch.Tensor]


def rotate_half(x: torch.Tensor) -> torch.Tensor:
    """The Llama layout: dimension i pairs with i + D/2."""
    half = x.shape[-1] // 2
    return torch.cat((-x[..., half:], x[..., :half]), dim=-1)


def model_rotate(model: torch.nn.Module) -> Rotate | None:
    """The ``rotate_half`` of the model's own modeling module (its RoPE pairing), or None."""
    module = sys.modules.get(type(model).__module__)
    return getattr(module, "rotate_half", None)


def unrotate(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, rotate: Rotate = rotate_half) -> torch.Tensor:
    """Pre-RoPE vectors from post-RoPE ones: the inverse rotation R(-p) = cos - sin*P.

    x: [..., n, D]; cos, sin: [n, rotary_dim] with rotary_dim <= D (partial rotary leaves the
    remaining dims untouched).
    """
    rd = cos.shape[-1]
    cos, sin = cos.to(x.dtype), sin.to(x.dtype)
    rot, passthrough = x[..., :rd], x[..., rd:]
    return torch.cat((rot * cos - rotate(rot) * sin, passthrough), dim=-1)


def mean_rotation(cos: torch.Tensor, sin: torch.Tensor, head_dim: int, rotate: Rotate = rotate_half) -> torch.Tensor:
    """The RoPE matrix averaged over positions: mean_p R(p) = diag(mean cos) + diag(mean sin) P.

    cos, sin: [n_positions, rotary_dim]. Returns [head_dim, head_dim] acting on column vectors.
    """
    rd = cos.shape[-1]
    c, s = cos.float().mean(dim=0), sin.float().mean(dim=0)
    # rotate() acts on rows: row i of rotate(I) is P e_i, i.e. column i of P.
    perm = rotate(torch.eye(rd, device=cos.device)).T
    out = torch.eye(head_dim, device=cos.device)
    out[:rd, :rd] = torch.diag(c) + s[:, None] * perm
    return out


@dataclass(eq=False)
class LayerRotary:
    """One layer's RoPE: ``positions -> (cos, sin)`` from the model's rotary module (per layer
    type where the model has several), and the model's pairing. Layers of one type share one
    object, so presses may cache per-position results on it."""

    embed: Callable[[torch.Tensor], tuple[torch.Tensor, torch.Tensor]]
    rotate: Rotate

    def __call__(self, positions: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(cos, sin) [n, rotary_dim] at these absolute positions."""
        return self.embed(positions)

    def unrotate(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
        return unrotate(x, cos, sin, self.rotate)

    def mean_rotation(self, positions: torch.Tensor, head_dim: int) -> torch.Tensor:
        return mean_rotation(*self(positions), head_dim=head_dim, rotate=self.rotate)
