"""Target compressible densities (``--densities 0.1,0.25,0.5``): one parser for report and submit."""

from __future__ import annotations

import math
import numbers
from collections.abc import Iterable

from orchestrator.errors import KvorchError

DEFAULT_DENSITIES = "0.1,0.25,0.5"


def parse_densities(text: str) -> tuple[float, ...]:
    """Sorted distinct fractions in (0, 1]; KvorchError naming the fix otherwise."""
    values = []
    for piece in (p.strip() for p in text.split(",")):
        if not piece:
            continue
        try:
            values.append(float(piece))
        except ValueError:
            raise KvorchError(f"--densities: {piece!r} is not a number; use fractions like 0.1,0.25,0.5") from None
    return check_densities(values)


def check_densities(values: str | float | Iterable[float]) -> tuple[float, ...]:
    """``values`` (one number, several, or the ``--densities`` text) as :func:`parse_densities` returns them."""
    if isinstance(values, str):
        return parse_densities(values)
    if isinstance(values, numbers.Real):
        values = [values]
    checked = []
    for value in values:
        if isinstance(value, bool) or not isinstance(value, numbers.Real):
            raise KvorchError(f"--densities: {value!r} is not a number; use fractions like 0.1,0.25,0.5")
        if not math.isfinite(value) or not 0 < value <= 1:
            raise KvorchError(f"--densities: {value:g} is outside (0, 1]; densities are fractions like 0.1,0.25,0.5")
        checked.append(float(value))
    if not checked:
        raise KvorchError("--densities is empty; use fractions like 0.1,0.25,0.5")
    return tuple(sorted(set(checked)))


DEFAULT_TARGETS = parse_densities(DEFAULT_DENSITIES)
