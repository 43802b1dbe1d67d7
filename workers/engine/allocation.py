"""Each (layer, kv-head)'s keep limit under an allocation (workers/contract/allocation.py).

The ranked policies give every (layer, kv-head) of a row the same limit L (decisions.keep_limit);
an allocation that fixes budgets ahead of the scores turns it into a limit per (row, kv-head) of
the layer at hand: ``pyramidkv`` by its per-layer schedule, ``file`` by the user's shares. (``adakv``
shares the layer's budget by the scores themselves: decisions.decide_by_layer_budget.) Written as
branch-free tensor code over 0-d tensors, with the layer index a 0-d tensor too, so one compiled
layer region serves every layer and no chunk syncs with the host.
"""

from __future__ import annotations

import torch

from workers.contract.allocation import Allocation


def head_shares(allocation: Allocation, n_layers: int, n_kv_heads: int, device: torch.device) -> torch.Tensor | None:
    """[layers, kv-heads] float64: a file allocation's shares scaled to average 1 (None for the
    others). A table of another shape than the model's is refused, naming both."""
    if allocation.kind != "file":
        return None
    shares = torch.tensor(allocation.normalized_shares(), dtype=torch.float64)
    if tuple(shares.shape) != (n_layers, n_kv_heads):
        raise ValueError(
            f"allocation file={allocation.name} is {shares.shape[0]} layers x {shares.shape[1]} kv-heads; the "
            f"model has {n_layers} x {n_kv_heads}: give one share per (layer, kv-head)"
        )
    return shares.to(device)


def pyramid_limit(
    limit: torch.Tensor, seen: torch.Tensor, floor: int, layer: torch.Tensor, n_layers: int, beta: float
) -> torch.Tensor:
    """[rows] int64: PyramidKV's keys for ``layer`` (kvpress's ``PyramidKVPress.get_layer_budget``)
    given each row's uniform limit L and the ``seen`` keys, kvpress's ``window_size`` being the
    keys a head always keeps here (``floor``: sinks + protected window).

    Budgets fall linearly over the layers from max_num = 2L - L / beta to min_num = L / beta, so
    they average L; max_num is capped at seen - floor (min_num then rises to keep the mean); where
    the pyramid would not hold (seen >= max_num >= min_num >= floor fails: a short document, a
    small L) every layer keeps L, as kvpress falls back to SnapKV's uniform budget.
    """
    budget = limit.double()
    if n_layers < 2:
        return torch.round(budget).long()
    seen = seen.double()
    min_num = budget / beta
    max_num = 2 * budget - min_num
    capped = max_num >= seen - floor
    max_num = torch.where(capped, seen - floor, max_num)
    min_num = torch.where(capped, 2 * budget - max_num, min_num)
    holds = (seen >= max_num) & (max_num >= min_num) & (min_num >= floor)
    steps = (max_num - min_num) / (n_layers - 1)
    return torch.where(holds, torch.round(max_num - layer * steps), torch.round(budget)).long()


def head_limits(
    allocation: Allocation,
    shares: torch.Tensor | None,
    limit: torch.Tensor,
    seen: torch.Tensor,
    floor: int,
    layer: torch.Tensor,
    n_layers: int,
) -> torch.Tensor:
    """The keep limit each row's (kv-head) of ``layer`` gets: [rows] (one for every head: uniform,
    pyramidkv, and adakv, whose rule shares the layer's total itself) or [rows, kv-heads] (file:
    round(L x the head's share))."""
    if allocation.kind == "pyramidkv":
        return pyramid_limit(limit, seen, floor, layer, n_layers, allocation.beta)
    if shares is not None:
        share = shares.index_select(0, layer.view(1))  # [1, kv-heads]
        return torch.round(limit.double()[:, None] * share).long()
    return limit
