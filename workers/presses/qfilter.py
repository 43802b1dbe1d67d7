"""Q-Filters (Godey et al., 2025, arXiv:2503.02812; kvpress QFilterPress): keys projected on
the main singular direction of each head's queries, no attention needed.

Queries and keys of a head share a dominant direction u (the first right singular vector of the
head's queries): the attention a key receives on average grows with its projection on u, signed
so that the mean query projects positively. A filter per (layer, kv-head) is stored as f = -u
(the group's directions averaged), and a key's score is kvpress's -(f . k), so filters in kvpress's
published format and kvorch's own read the same way.

``path=`` is a directory (or its ``model.safetensors``) holding ``q_filters`` [layers, kv-heads,
head_dim], the format of kvpress's published filters (``QFilters``). kvpress downloads filters
made for a model by name; kvorch measures them from the model's own post-RoPE queries on a corpus
(workers/studies/qfilters.py: ``measure_qfilters`` and ``save_qfilters``).
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path

import torch
from safetensors.torch import load_file

from workers.presses.base import LayerContext, Press, StateShape
from workers.presses.registry import register

WEIGHTS_FILE = "model.safetensors"


def load_qfilters(path: str) -> torch.Tensor:
    """[layers, kv-heads, head_dim] filters from ``path`` (a directory or its safetensors file),
    read again once the file changes (filters measured again into the same directory)."""
    file = Path(path).expanduser()
    file = file / WEIGHTS_FILE if file.is_dir() else file
    if not file.is_file():
        raise ValueError(f"qfilter: {path} holds no {WEIGHTS_FILE}; measure filters with measure_qfilters")
    stat = file.stat()
    return _read_qfilters(str(file), stat.st_mtime_ns, stat.st_size)


@lru_cache(maxsize=4)
def _read_qfilters(file: str, mtime_ns: int, size: int) -> torch.Tensor:
    weights = load_file(file)
    if "q_filters" not in weights or weights["q_filters"].dim() != 3:
        raise ValueError(f"qfilter: {file} has no q_filters [layers, kv-heads, head_dim] tensor")
    # A copy: safetensors maps the file, and the cached tensor must not change when it is rewritten.
    return weights["q_filters"].to(torch.float32, copy=True)


@register
@dataclass(frozen=True)
class QFilterPress(Press):
    name = "qfilter"
    default_thresholds = (0.0,)
    reads_keys = True
    path: str = ""

    def __post_init__(self) -> None:
        if not self.path:
            raise ValueError("qfilter needs path=DIR, filters in kvpress's format (measure_qfilters writes them)")

    def init_state(self, shape: StateShape) -> list[torch.Tensor]:
        """Each layer's filters [kv-heads, head_dim], checked against the model, on its device."""
        filters = load_qfilters(self.path)
        if filters.shape[0] < shape.layers or filters.shape[1:] != (shape.kv_heads, shape.head_dim):
            raise ValueError(
                f"qfilter: {self.path} holds filters {list(filters.shape)}, the model needs "
                f"[{shape.layers}, {shape.kv_heads}, {shape.head_dim}]; measure them for this model"
            )
        return [layer.clone() for layer in filters.to(shape.device)[: shape.layers]]  # not views of one tensor

    def score(self, ctx: LayerContext, state: torch.Tensor) -> torch.Tensor:
        return -(ctx.new_keys.float() * state[None, :, None]).sum(dim=-1)
