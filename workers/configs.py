"""An evaluation config: one press under one eviction policy setting. A lake row's label."""

from __future__ import annotations

import math
from dataclasses import dataclass

from workers.presses import Press

POLICIES = ("threshold", "ratio")


@dataclass(frozen=True)
class EvalConfig:
    """A press at a threshold (DMS-style, the default) or at a compression ratio (budget).

    ``threshold=None`` and ``ratio=None`` is the press's structural behaviour (baseline,
    window, streaming_llm score +-inf, so no threshold changes them).
    """

    press: Press
    threshold: float | None = None
    ratio: float | None = None

    def __post_init__(self) -> None:
        if self.ratio is not None and self.threshold is not None:
            raise ValueError("a config has a threshold or a ratio, not both")
        if self.ratio is not None and not (0.0 <= self.ratio < 1.0):
            raise ValueError(f"compression ratio must be in [0, 1), got {self.ratio}")
        if self.threshold is not None and math.isnan(self.threshold):
            raise ValueError("threshold must be a number, not NaN")

    @property
    def method(self) -> str:
        return self.press.name

    @property
    def policy(self) -> str:
        return "ratio" if self.ratio is not None else "threshold"

    @property
    def label(self) -> str:
        """``method[:params][@threshold | @ratio=r]``: unique per config within a run."""
        base = self.press.label()
        if self.ratio is not None:
            return f"{base}@ratio={self.ratio:g}"
        return base if self.threshold is None else f"{base}@{self.threshold:g}"

    @property
    def needs_evicted_keys(self) -> bool:
        """Under the ratio policy a rescoring press rescores every kept key each chunk, also those
        the budget evicted earlier; one that reads keys to score then reads evicted ones, which
        only the masked cache still holds (so not with --compact)."""
        return self.policy == "ratio" and self.press.rescores and self.press.reads_keys

    @property
    def engine_threshold(self) -> float:
        """Structural presses score +-inf, so any finite threshold gives their behaviour."""
        return 0.0 if self.threshold is None else self.threshold
