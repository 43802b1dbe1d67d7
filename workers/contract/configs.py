"""An evaluation config: one press under one eviction policy setting. A lake row's label."""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import TYPE_CHECKING

from workers.contract.allocation import UNIFORM, Allocation

if TYPE_CHECKING:  # kept out of the import: the CLI's options read POLICIES without torch
    from workers.presses import Press

POLICIES = ("threshold", "ratio", "budget")
# Policies that keep each (layer, kv-head)'s best-scoring keys up to a number, rather than
# deciding each key alone against a threshold (workers/engine/decisions.py, decide_by_budget).
RANKED_POLICIES = ("ratio", "budget")


@dataclass(frozen=True)
class EvalConfig:
    """A press at a threshold (DMS-style, the default), at a compression ratio, or at a token
    budget: at most ``budget`` keys per (layer, kv-head), sinks and window included.

    None for all three is the press's structural behaviour (baseline, window, streaming_llm
    score +-inf, so no threshold changes them).
    """

    press: Press
    threshold: float | None = None
    ratio: float | None = None
    budget: int | None = None
    # How the ratio or budget is shared between (layer, kv-head)s (workers/contract/allocation.py).
    allocation: Allocation = UNIFORM

    def __post_init__(self) -> None:
        if sum(v is not None for v in (self.threshold, self.ratio, self.budget)) > 1:
            raise ValueError("a config has one of a threshold, a ratio or a budget, not several")
        if self.ratio is not None and not (0.0 <= self.ratio < 1.0):
            raise ValueError(f"compression ratio must be in [0, 1), got {self.ratio}")
        if self.budget is not None and self.budget < 1:
            raise ValueError(f"token budget must be >= 1, got {self.budget}")
        if self.threshold is not None and math.isnan(self.threshold):
            raise ValueError("threshold must be a number, not NaN")
        if not self.allocation.uniform and self.policy not in RANKED_POLICIES:
            raise ValueError(f"allocation {self.allocation.label} shares a keep limit: it needs a ratio or a budget")

    @property
    def method(self) -> str:
        return self.press.name

    @property
    def policy(self) -> str:
        if self.ratio is not None:
            return "ratio"
        return "budget" if self.budget is not None else "threshold"

    @property
    def is_baseline(self) -> bool:
        """The uncompressed model: the reference of the agreement columns."""
        return self.press.name == "baseline"

    @property
    def label(self) -> str:
        """``method[:params][@threshold | @ratio=r | @budget=B][+allocation]``: unique per config
        within a run (the uniform allocation, today's rule, adds nothing)."""
        base = self.press.label()
        suffix = self._allocation_suffix
        if self.ratio is not None:
            return f"{base}@ratio={self.ratio:g}{suffix}"
        if self.budget is not None:
            return f"{base}@budget={self.budget}{suffix}"
        return base if self.threshold is None else f"{base}@{self.threshold:g}"

    @property
    def sweep(self) -> str:
        """The lake's ``press`` column: the label without its threshold, ratio or budget
        (``method[:params][+allocation]``), so each allocation of a press is a sweep of its own."""
        return self.press.label() + self._allocation_suffix

    @property
    def _allocation_suffix(self) -> str:
        return "" if self.allocation.uniform else f"+{self.allocation.label}"

    @property
    def engine_threshold(self) -> float:
        """Structural presses score +-inf, so any finite threshold gives their behaviour."""
        return 0.0 if self.threshold is None else self.threshold
