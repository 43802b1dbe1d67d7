"""Rotary-embedding algebra the presses need: undoing RoPE and averaging it over positions.

Every RoPE variant transformers ships (default, llama3, yarn, partial rotary as in GPT-NeoX)
rotates the first ``rotary_dim`` dims by ``x*cos + rotate_half(x)*sin``; only cos/sin differ,
and those come from the model's own rotary module. So one implementation covers them all.
"""

from __future__ import annotations

import torch


def rotate_half(x: torch.Tensor) -> torch.Tensor:
    half = x.shape[-1] // 2
    return torch.cat((-x[..., half:], x[..., :half]), dim=-1)


def unrotate(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Pre-RoPE vectors from post-RoPE ones: the inverse rotation R(-p) = cos - sin*P.

    x: [..., n, D]; cos, sin: [n, rotary_dim] with rotary_dim <= D (partial rotary leaves the
    remaining dims untouched).
    """
    rd = cos.shape[-1]
    cos, sin = cos.to(x.dtype), sin.to(x.dtype)
    rot, passthrough = x[..., :rd], x[..., rd:]
    return torch.cat((rot * cos - rotate_half(rot) * sin, passthrough), dim=-1)


def mean_rotation(cos: torch.Tensor, sin: torch.Tensor, head_dim: int) -> torch.Tensor:
    """The RoPE matrix averaged over positions: mean_p R(p) = diag(mean cos) + diag(mean sin) P.

    cos, sin: [n_positions, rotary_dim]. Returns [head_dim, head_dim] acting on column vectors.
    """
    rd = cos.shape[-1]
    c, s = cos.float().mean(dim=0), sin.float().mean(dim=0)
    half = rd // 2
    perm = torch.zeros(rd, rd, device=cos.device)
    idx = torch.arange(half, device=cos.device)
    perm[idx, idx + half] = -1.0  # first half of P x is -x2
    perm[idx + half, idx] = 1.0  # second half of P x is x1
    rot = torch.diag(c) + s[:, None] * perm
    out = torch.eye(head_dim, device=cos.device)
    out[:rd, :rd] = rot
    return out
