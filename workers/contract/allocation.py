"""How a ranked config's keep limit is shared between its (layer, kv-head)s: an allocation.

Under the ratio and budget policies every (layer, kv-head) keeps at most the same number of keys,
L (workers/engine/decisions.py, ``keep_limit``): that is the ``uniform`` allocation, today's rule.
The others move that budget between heads and layers, with the same total, orthogonally to the
press that scores the keys (so any scorer runs under any allocation):

- ``adakv`` (AdaKV, arXiv 2407.11550; kvpress's ``AdaKVPress``): per layer, the budget summed
  over its kv-heads goes to the highest scores across all of the layer's heads, each head first
  keeping its own best ``alpha_safeguard`` share of its uniform budget.
- ``pyramidkv`` (PyramidKV, arXiv 2406.02069; kvpress's ``PyramidKVPress``): per-layer budgets
  falling linearly from the first layer to the last, ``beta`` setting the slope, averaging L.
- ``file=PATH``: a [layers, kv-heads] table of budget shares (JSON or Parquet), scaled so that
  the shares average 1: a user's schedule, an LUKV-style curve, a head classification.

The sinks and protected window always stay and count toward a head's budget. This module is
torch-free: the driver parses ``--allocation`` with it, and the file's shares travel inside the
config to the actors, which never read the user's file themselves.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from pathlib import Path

ALLOCATIONS = ("uniform", "adakv", "pyramidkv", "file")
DEFAULT_ALPHA_SAFEGUARD = 0.20  # kvpress AdaKVPress.alpha_safeguard
DEFAULT_BETA = 20  # kvpress PyramidKVPress.beta


@dataclass(frozen=True)
class Allocation:
    """One allocation of a ranked config's keep limit (the module docstring). Hashable: configs
    of one press, policy and allocation form one row group of the engine."""

    kind: str = "uniform"  # one of ALLOCATIONS
    alpha_safeguard: float = DEFAULT_ALPHA_SAFEGUARD  # adakv
    beta: float = DEFAULT_BETA  # pyramidkv
    shares: tuple[tuple[float, ...], ...] = ()  # file: [layers][kv-heads], as given
    name: str = ""  # file: the table's file stem, which labels the config

    def __post_init__(self) -> None:
        if self.kind not in ALLOCATIONS:
            raise ValueError(f"allocation {self.kind!r} is unknown; use one of {', '.join(ALLOCATIONS)}")
        if not 0.0 <= self.alpha_safeguard <= 1.0:
            raise ValueError(f"adakv's alpha_safeguard must lie in [0, 1], got {self.alpha_safeguard:g}")
        if not self.beta >= 1:
            raise ValueError(f"pyramidkv's beta must be >= 1, got {self.beta:g}")
        if self.kind == "file":
            _check_shares(self.shares, self.name)

    @property
    def uniform(self) -> bool:
        return self.kind == "uniform"

    @property
    def label(self) -> str:
        """What the lake's ``allocation`` column holds and a config's label ends with:
        ``uniform``, ``adakv``, ``pyramidkv``, ``file=NAME``, with parameters not at their
        defaults (``adakv:alpha_safeguard=0.5``)."""
        if self.kind == "adakv" and self.alpha_safeguard != DEFAULT_ALPHA_SAFEGUARD:
            return f"adakv:alpha_safeguard={self.alpha_safeguard:g}"
        if self.kind == "pyramidkv" and self.beta != DEFAULT_BETA:
            return f"pyramidkv:beta={self.beta:g}"
        return f"file={self.name}" if self.kind == "file" else self.kind

    def normalized_shares(self) -> list[list[float]]:
        """The file's shares scaled to average 1: a head's budget is its share times L."""
        mean = sum(map(sum, self.shares)) / (len(self.shares) * len(self.shares[0]))
        return [[s / mean for s in row] for row in self.shares]

    def head_floor_share(self) -> float:
        """The least one (layer, kv-head) may be given, as a multiple of L (file: its smallest
        normalized share; pyramidkv never goes below the floor, its schedule falls back to
        uniform first; adakv's protected keys stay whatever the ranking says)."""
        return min(map(min, self.normalized_shares())) if self.kind == "file" else 1.0


UNIFORM = Allocation()


def parse_allocation(text: str) -> Allocation:
    """One ``--allocation`` item: ``uniform``, ``adakv[:alpha_safeguard=A]``,
    ``pyramidkv[:beta=B]`` or ``file=PATH`` (JSON or Parquet). Raises ValueError, one line."""
    text = text.strip()
    if text.startswith("file="):
        path = Path(text[len("file=") :])
        return Allocation("file", shares=read_shares(path), name=path.stem)
    kind, _, params = text.partition(":")
    allowed = {"adakv": "alpha_safeguard", "pyramidkv": "beta"}
    if kind not in ALLOCATIONS or kind == "file":
        raise ValueError(f"allocation {text!r} is unknown; use uniform, adakv, pyramidkv or file=PATH")
    values: dict[str, float] = {}
    for item in filter(None, params.split(",")):
        key, _, value = item.partition("=")
        if allowed.get(kind) != key.strip():
            raise ValueError(f"allocation {text!r}: {kind} has no parameter {key.strip()!r}"
                             + (f"; it takes {allowed[kind]}=" if kind in allowed else ""))  # fmt: skip
        try:
            values[key.strip()] = float(value)
        except ValueError:
            raise ValueError(f"allocation {text!r}: {key.strip()} must be a number, got {value!r}") from None
    return Allocation(kind, **values)


def read_shares(path: Path) -> tuple[tuple[float, ...], ...]:
    """A [layers, kv-heads] table of shares: JSON (a list of per-layer lists, or an object with
    one, under ``shares``) or Parquet (columns ``layer``, ``kv_head``, ``share``, one row per head)."""
    if not path.is_file():
        raise ValueError(f"allocation file {path} does not exist; give a .json or .parquet table of shares")
    if path.suffix == ".parquet":
        import pyarrow.parquet as pq

        table = pq.read_table(path).to_pydict()
        if not {"layer", "kv_head", "share"} <= set(table):
            raise ValueError(f"allocation file {path}: needs columns layer, kv_head, share; has {', '.join(table)}")
        cells = {(int(la), int(h)): float(s) for la, h, s in zip(table["layer"], table["kv_head"], table["share"])}
        n_layers = 1 + max(la for la, _ in cells)
        n_heads = 1 + max(h for _, h in cells)
        if len(cells) != n_layers * n_heads or len(table["share"]) != len(cells):
            raise ValueError(f"allocation file {path}: give each (layer, kv_head) of 0..{n_layers - 1} x "
                             f"0..{n_heads - 1} exactly one share")  # fmt: skip
        return tuple(tuple(cells[la, h] for h in range(n_heads)) for la in range(n_layers))
    try:
        data = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise ValueError(f"allocation file {path} is not JSON ({exc}); give a list of per-layer share lists") from None
    if isinstance(data, dict):
        data = data.get("shares")
    if not isinstance(data, list) or not all(isinstance(row, list) for row in data):
        raise ValueError(f"allocation file {path}: give a list of per-layer lists of shares, one per kv-head")
    try:
        return tuple(tuple(float(s) for s in row) for row in data)
    except (TypeError, ValueError):
        raise ValueError(f"allocation file {path}: every share must be a number") from None


def _check_shares(shares: tuple[tuple[float, ...], ...], name: str) -> None:
    if not shares or not shares[0] or len({len(row) for row in shares}) != 1:
        raise ValueError(f"allocation file={name}: give a rectangular [layers, kv-heads] table of shares")
    flat = [s for row in shares for s in row]
    if any(not math.isfinite(s) or s < 0 for s in flat) or sum(flat) <= 0:
        raise ValueError(f"allocation file={name}: shares must be finite, >= 0, and not all 0")

