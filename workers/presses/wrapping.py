"""What the wrapper presses (ChunkKV, CriticalKV) share: the scorer they wrap, named by a
``press=NAME`` parameter (the wrapped press at its defaults), and that scorer's latest score of
every position, kept per layer so a wrapper can rescore keys its scorer scored only once."""

from __future__ import annotations

import dataclasses
from functools import lru_cache

import torch

from workers.presses.base import LayerContext, Press, StateShape
from workers.presses.registry import parse_method


@lru_cache(maxsize=32)
def wrapped(wrapper: str, name: str) -> Press:
    """The scorer ``name`` at its defaults; ValueError naming the fix for one a wrapper cannot
    take (a structural press, a wrapper, one with required parameters, the kvpress adapter)."""
    if ":" in name:
        raise ValueError(f"{wrapper}: press={name} takes a method name only (its defaults); e.g. press=snapkv")
    try:
        press = parse_method(name)
    except ValueError as exc:
        raise ValueError(f"{wrapper}: press={name}: {exc}") from None
    structural = press.constant_score is not None or press.default_thresholds == (None,)
    if structural or not press.traceable or press.replays_context:  # KVzip: its scores come from a replay
        raise ValueError(f"{wrapper}: press={name} is not a scorer it can wrap; use e.g. press=snapkv or press=knorm")
    if isinstance(press, WrapperPress):
        raise ValueError(f"{wrapper}: press={name} is a wrapper itself; wrap a scorer such as snapkv")
    return press


class WrapperPress:
    """Mixed into a press around a scorer (``class ChunkKVPress(WrapperPress, Press)``): it reads
    what its scorer reads (attention, queries, hidden states). Not a press itself."""

    name: str

    press: str

    def __post_init__(self) -> None:
        # Built once, next to the fields (not one of them: the label is ``press=NAME``), so that
        # ``score`` reads an attribute when traced; a press it cannot wrap is refused here.
        object.__setattr__(self, "_inner", wrapped(self.name, self.press))

    @property
    def inner(self) -> Press:
        return self._inner

    @property
    def needs_attention(self) -> bool:
        return self.inner.needs_attention

    @property
    def attention_queries(self) -> int | None:
        return self.inner.attention_queries

    @property
    def needs_prerope_queries(self) -> bool:
        return self.inner.needs_prerope_queries

    @property
    def needs_hidden_states(self) -> bool:
        return self.inner.needs_hidden_states

    @property
    def default_thresholds(self) -> tuple[float | None, ...]:
        return self.inner.default_thresholds


def latest_scores(shape: StateShape) -> torch.Tensor:
    """[rows, kv-heads, positions] zeros: one layer's buffer of the scorer's latest scores."""
    return torch.zeros(shape.rows, shape.kv_heads, shape.positions, device=shape.device)


def score_into(inner: Press, ctx: LayerContext, state: object, latest: torch.Tensor) -> None:
    """Write the scorer's scores of this chunk into ``latest`` [B, Hkv, T]: every position it
    rescores, or the chunk's own keys for one that scores a key once (called with the chunk's
    positions, as the engine would call it)."""
    if inner.rescores:
        latest.index_copy_(2, ctx.scored, inner.score(ctx, state).float())
    else:
        own = dataclasses.replace(ctx, score_from=ctx.start, scored=ctx.query_positions)
        latest.index_copy_(2, ctx.query_positions, inner.score(own, state).float())
