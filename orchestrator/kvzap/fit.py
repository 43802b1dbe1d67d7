"""Fitting KVzap surrogates per layer: closed-form ridge and a 2-layer GELU MLP.

Both produce modules of the published architecture (:func:`workers.presses.kvzap.build_surrogate`),
so whatever normalisation training uses is folded back into the weights: the press applies the
module to raw hidden states and reads raw log-scores.
"""

from __future__ import annotations

import math

import torch
from torch import nn

from orchestrator.kvzap.settings import MLPSettings

__all__ = ["MLPSettings", "fit_mlp", "fit_ridge", "r2_score"]


def r2_score(pred: torch.Tensor, target: torch.Tensor) -> float:
    """1 - SSE/SST pooled over kv-heads, each head centred on its own mean (targets [S, Hkv])."""
    sse = (target - pred).pow(2).sum()
    sst = (target - target.mean(dim=0)).pow(2).sum()
    return float(1 - sse / sst) if sst > 0 else float("nan")


def fit_ridge(x: torch.Tensor, y: torch.Tensor, alpha: float) -> nn.Linear:
    """argmin_W,b ||x W + b - y||^2 + alpha ||W||^2 in closed form (float64), intercept unpenalised."""
    x64, y64 = x.double(), y.double()
    x_mean, y_mean = x64.mean(0), y64.mean(0)
    xc, yc = x64 - x_mean, y64 - y_mean
    gram = xc.T @ xc + alpha * torch.eye(x.shape[1], dtype=torch.float64)
    weight = torch.linalg.solve(gram, xc.T @ yc)  # [D, Hkv]
    linear = nn.Linear(x.shape[1], y.shape[1])
    with torch.no_grad():
        linear.weight.copy_(weight.T)
        linear.bias.copy_(y_mean - x_mean @ weight)
    return linear


def _standardiser(t: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    return t.mean(0), t.std(0).clamp_min(1e-6)


def fit_mlp(x: torch.Tensor, y: torch.Tensor, settings: MLPSettings) -> nn.Sequential:
    """A 2-layer GELU MLP on standardised inputs and targets (AdamW, cosine schedule, clipped grads).

    A random ``val_fraction`` of the samples is held out; the weights of the epoch with the
    lowest validation loss are returned, with the standardisation folded into the two linears.
    """
    generator = torch.Generator().manual_seed(settings.seed)
    torch.manual_seed(settings.seed)
    x_mean, x_std = _standardiser(x)
    y_mean, y_std = _standardiser(y)
    xs, ys = (x - x_mean) / x_std, (y - y_mean) / y_std
    order = torch.randperm(len(x), generator=generator)
    n_val = max(1, int(len(x) * settings.val_fraction))
    val, train = order[:n_val], order[n_val:]
    mlp = nn.Sequential(
        nn.Linear(x.shape[1], settings.hidden_dim), nn.GELU(), nn.Linear(settings.hidden_dim, y.shape[1])
    )
    optimizer = torch.optim.AdamW(mlp.parameters(), lr=settings.lr, weight_decay=settings.weight_decay)
    steps_per_epoch = math.ceil(len(train) / settings.batch_size)
    schedule = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=settings.epochs * steps_per_epoch)
    best_loss, best_state = float("inf"), None
    for _ in range(settings.epochs):
        mlp.train()
        for batch in train[torch.randperm(len(train), generator=generator)].split(settings.batch_size):
            loss = nn.functional.mse_loss(mlp(xs[batch]), ys[batch])
            optimizer.zero_grad()
            loss.backward()
            nn.utils.clip_grad_norm_(mlp.parameters(), settings.grad_clip)
            optimizer.step()
            schedule.step()
        mlp.eval()
        with torch.no_grad():
            val_loss = float(nn.functional.mse_loss(mlp(xs[val]), ys[val]))
        if val_loss < best_loss:
            best_loss, best_state = val_loss, {k: v.clone() for k, v in mlp.state_dict().items()}
    mlp.load_state_dict(best_state)
    return _fold_standardisation(mlp, x_mean, x_std, y_mean, y_std)


@torch.no_grad()
def _fold_standardisation(
    mlp: nn.Sequential, x_mean: torch.Tensor, x_std: torch.Tensor, y_mean: torch.Tensor, y_std: torch.Tensor
) -> nn.Sequential:
    """Rewrite W((x-mu)/s)+b as (W/s)x + (b - W mu/s), and scale the output back to raw targets."""
    first, last = mlp[0], mlp[2]
    first.bias.sub_(first.weight @ (x_mean / x_std))
    first.weight.div_(x_std)
    last.weight.mul_(y_std[:, None])
    last.bias.mul_(y_std).add_(y_mean)
    return mlp.eval()
