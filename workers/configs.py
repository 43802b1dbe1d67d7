"""An evaluation config: one press at one threshold. The unit a lake row is labelled by."""

from __future__ import annotations

from dataclasses import dataclass

from workers.presses import Press


@dataclass(frozen=True)
class EvalConfig:
    press: Press
    threshold: float | None = None

    @property
    def method(self) -> str:
        return self.press.name

    @property
    def label(self) -> str:
        """``method[:params][@threshold]``: unique per config within a run."""
        base = self.press.label()
        return base if self.threshold is None else f"{base}@{self.threshold:g}"

    @property
    def engine_threshold(self) -> float:
        """Structural presses score +-inf, so any finite threshold gives their behaviour."""
        return 0.0 if self.threshold is None else self.threshold
