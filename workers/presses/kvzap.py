"""KVzap (Jegou et al., 2026, arXiv:2601.07891): a learned surrogate of KVzip+ importance.

One linear map or 2-layer GELU MLP per layer turns the attention input (hidden states) of each
new token into a score per kv-head; keys scoring below a log-scale threshold (e.g. -6) are
evicted when they leave the window. Loads the published format (kvpress ``KVzapModel``):
``config.json`` with ``input_dim``, ``output_dim``, ``hidden_dim`` (null for linear) and
``n_modules``, and ``model.safetensors`` with ``module_list.<layer>.*`` weights, from a local
directory or a hub id. Not part of ``--methods all``: it needs ``path=``.

Surrogates trained by ``kvorch kvzap train`` also record a ``threshold`` in ``config.json`` (a
kvorch key other loaders ignore): the score that kept about half of the held-out keys. Its scale
depends on the model, so it is the default instead of the paper's -6 when present.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path

import torch
from safetensors.torch import load_file
from torch import nn

from workers.presses.base import LayerContext, Press, StateShape
from workers.presses.registry import register

CONFIG_FILE = "config.json"
WEIGHTS_FILE = "model.safetensors"
PAPER_THRESHOLD = -6.0


def build_surrogate(input_dim: int, output_dim: int, hidden_dim: int | None, n_modules: int) -> nn.ModuleList:
    """The published architecture: module i maps layer i's hidden states to one score per kv-head."""
    if hidden_dim is None:
        return nn.ModuleList(nn.Linear(input_dim, output_dim) for _ in range(n_modules))
    return nn.ModuleList(
        nn.Sequential(nn.Linear(input_dim, hidden_dim), nn.GELU(), nn.Linear(hidden_dim, output_dim))
        for _ in range(n_modules)
    )


def save_surrogate(
    modules: nn.ModuleList, directory: str | Path, hidden_dim: int | None, threshold: float | None = None
) -> None:
    """Write ``modules`` in the published format (what ``kvorch kvzap train`` produces), with an
    optional default ``threshold`` for the press."""
    from safetensors.torch import save_file

    first = modules[0] if hidden_dim is None else modules[0][0]
    last = modules[0] if hidden_dim is None else modules[0][2]
    config = {
        "model_type": "kvzap",
        "input_dim": first.in_features,
        "output_dim": last.out_features,
        "hidden_dim": hidden_dim,
        "n_modules": len(modules),
    }
    if threshold is not None:
        config["threshold"] = threshold
    out = Path(directory)
    out.mkdir(parents=True, exist_ok=True)
    (out / CONFIG_FILE).write_text(json.dumps(config, indent=2))
    state = {f"module_list.{k}": v.detach().contiguous() for k, v in modules.state_dict().items()}
    save_file(state, str(out / WEIGHTS_FILE))


def surrogate_threshold(path: str) -> float:
    """The threshold recorded with a local surrogate, else the paper's -6 (hub ids are not fetched
    just to plan a job)."""
    config = Path(path).expanduser() / CONFIG_FILE
    if config.is_file():
        return float(json.loads(config.read_text()).get("threshold", PAPER_THRESHOLD))
    return PAPER_THRESHOLD


@lru_cache(maxsize=4)
def load_surrogate(path: str) -> nn.ModuleList:
    """Surrogate weights from a local directory, else a hub id; loaded once per process."""
    directory = Path(path).expanduser()
    if not directory.is_dir():
        from huggingface_hub import snapshot_download

        directory = Path(snapshot_download(path, allow_patterns=[CONFIG_FILE, WEIGHTS_FILE]))
    if not (directory / CONFIG_FILE).is_file() or not (directory / WEIGHTS_FILE).is_file():
        raise ValueError(f"kvzap: {path} needs {CONFIG_FILE} and {WEIGHTS_FILE} (the published KVzap format)")
    config = json.loads((directory / CONFIG_FILE).read_text())
    modules = build_surrogate(config["input_dim"], config["output_dim"], config.get("hidden_dim"), config["n_modules"])
    weights = load_file(str(directory / WEIGHTS_FILE))
    modules.load_state_dict({k.removeprefix("module_list."): v for k, v in weights.items()})
    return modules.eval()


@register
@dataclass(frozen=True)
class KVzapPress(Press):
    name = "kvzap"
    needs_hidden_states = True
    n_sink: int = 4
    path: str = ""

    def __post_init__(self) -> None:
        if not self.path:
            raise ValueError("kvzap needs path=DIR (config.json + model.safetensors) or path=<hub id>")

    @property
    def default_thresholds(self) -> tuple[float, ...]:
        """Per surrogate, not per class: a trained surrogate carries the threshold of its scale."""
        return (surrogate_threshold(self.path),)

    def init_state(self, shape: StateShape) -> list[nn.Module]:
        """The surrogate's module of each layer, checked against the model and moved to its device
        once, before the compiled step (which cannot move modules)."""
        surrogate = load_surrogate(self.path)
        if len(surrogate) < shape.layers:
            raise ValueError(
                f"kvzap: {self.path} has {len(surrogate)} layers, the model {shape.layers}; train one for this model"
            )
        return list(surrogate.to(shape.device))[: shape.layers]

    def score(self, ctx: LayerContext, state: nn.Module) -> torch.Tensor:
        scores = state(ctx.hidden_states.float()).transpose(1, 2)  # [B, Hkv, c]
        if scores.shape[1] != ctx.kv_heads:
            raise ValueError(f"kvzap: {self.path} scores {scores.shape[1]} kv-heads, the model has {ctx.kv_heads}")
        return scores
