"""Target compressible densities (``--densities 0.1,0.25,0.5``): one parser for report and submit."""

from __future__ import annotations

import math

from orchestrator.errors import KvorchError

DEFAULT_DENSITIES = "0.1,0.25,0.5"


def parse_densities(text: str) -> tuple[float, ...]:
    """Sorted distinct fractions in (0, 1]; KvorchError naming the fix otherwise."""
    values = []
    for piece in (p.strip() for p in text.split(",")):
        if not piece:
            continue
        try:
            value = float(piece)
        except ValueError:
            raise KvorchError(f"--densities: {piece!r} is not a number; use fractions like 0.1,0.25,0.5") from None
        if not math.isfinite(value) or not 0 < value <= 1:
            raise KvorchError(f"--densities: {piece} is outside (0, 1]; densities are fractions like 0.1,0.25,0.5")
        values.append(value)
    if not values:
        raise KvorchError("--densities is empty; use fractions like 0.1,0.25,0.5")
    return tuple(sorted(set(values)))
