"""``kvpress:ClassName[:key=value,...]``: any kvpress ScorerPress as a kvorch scorer.

kvpress (an optional extra, ``pip install kvorch[kvpress]``) scores the keys of one prefill
call. Here each chunk is that call: the press sees the chunk's attention inputs, its new keys
and values, the chunk queries' attention over those keys, and the RoPE of their absolute
positions; its scores are fixed when the keys arrive and the engine decides them as for any
press. kvpress's own sink and window conventions apply per call, which is exactly the chunked
behaviour kvorch's native presses correct; use the adapter to compare against kvpress as is.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from functools import lru_cache

import torch

from workers.presses.base import LayerContext, Press
from workers.presses.registry import register


@lru_cache(maxsize=16)
def kvpress_instance(press_class: str, options: str):
    """The kvpress press object, built once per (class, options) in each process."""
    try:
        import kvpress
    except ImportError:
        raise ValueError("kvpress presses need the optional extra: pip install 'kvorch[kvpress]'") from None
    cls = getattr(kvpress, press_class, None)
    if cls is None or not issubclass(cls, kvpress.ScorerPress):
        raise ValueError(f"kvpress has no ScorerPress {press_class!r}; e.g. KnormPress, ObservedAttentionPress")
    kwargs = {}
    for item in filter(None, options.split(",")):
        key, _, raw = item.partition("=")
        try:
            kwargs[key] = json.loads(raw)
        except json.JSONDecodeError:
            kwargs[key] = raw
    return cls(**kwargs)


@register
@dataclass(frozen=True)
class KVPressAdapter(Press):
    name = "kvpress"
    default_thresholds = (0.0,)
    needs_attention = True
    needs_hidden_states = True
    reads_keys = True
    traceable = False
    press_class: str = ""
    options: str = ""  # canonical "key=value,..." passed to the kvpress class

    def __post_init__(self) -> None:
        if not self.press_class:
            raise ValueError("kvpress needs a class: --methods kvpress:KnormPress[:key=value,...]")

    @classmethod
    def parse(cls, arg_text: str) -> KVPressAdapter:
        press_class, _, options = arg_text.partition(":")
        items = sorted(part.strip() for part in options.split(",") if part.strip())
        bad = [item for item in items if "=" not in item]
        if bad:
            raise ValueError(f"kvpress option {bad[0]!r} must be key=value")
        return cls(press_class=press_class.strip(), options=",".join(items))

    def label(self) -> str:
        return f"kvpress:{self.press_class}" + (f":{self.options}" if self.options else "")

    def score(self, ctx: LayerContext, state: None) -> torch.Tensor:
        """kvpress's own scores of the chunk's new keys. Not traceable (kvpress is Python over
        Python ints), so the engine runs it uncompiled, at exact shapes: every query row is real."""
        press = kvpress_instance(self.press_class, self.options)
        s, e = int(ctx.start), int(ctx.end)
        cos, sin = ctx.rotary(ctx.query_positions)
        scores = press.score(
            _ModuleView(ctx.module, ctx.rotary),
            ctx.hidden_states,
            ctx.new_keys,
            ctx.new_values,
            ctx.attention[..., s:e],
            {"position_embeddings": (cos[None], sin[None]), "attention_mask": None},
        )
        return scores.float()


class _ModuleView:
    """The layer's attention module as kvpress reads it: transformers 5 moved the rotary
    embedding from the attention module to the model, so the view adds ``rotary_emb`` back
    (computed by the engine at absolute positions) without touching the model."""

    def __init__(self, module: torch.nn.Module, rotary) -> None:
        self._module = module
        self._rotary = rotary

    def rotary_emb(self, x: torch.Tensor, position_ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        cos, sin = self._rotary(position_ids[0])
        return cos[None].to(x.dtype), sin[None].to(x.dtype)

    def __getattr__(self, name: str):
        return getattr(self._module, name)
