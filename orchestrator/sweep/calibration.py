"""Calibrated submission (``kvorch submit --densities 0.1,0.25,0.5``).

Methods are only comparable at equal density, and a threshold means a different density for
every method (and model, and corpus). Before the sweep, a quick calibration evaluates held-out
documents (the corpus documents right after the first ``--max-docs``, so never the evaluated
ones) and searches, per thresholded press, a threshold whose compressible density hits each
target within :data:`TOLERANCE`. The sweep then runs every press at its calibrated thresholds,
and the run spec records the search (``calibration``).

The frontier table interpolates between a sweep's points and never extrapolates, so the sweep
must reach past the extreme targets: for the lowest target the search also finds a threshold
whose density is at or below it (within the tolerance), for the highest one at or above it, and
the sweep runs that one too when the closest lies on the other side (h2o's 0.1017 for 0.1 once
left 0.1 "out of range"). Every round prints one line and a bar over its batches.

The search relies on density falling as the threshold rises (a key is kept when its score is
>= the threshold). Each round evaluates, in one batched call, for every target not yet hit:
the regula-falsi point and the midpoint of its bracket, or a step outwards while no bracket
exists. Thresholds are rounded to 6 significant digits, the precision of config labels, so
the label in the lake is the threshold that was measured.
"""

from __future__ import annotations

import dataclasses
import itertools
import math
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass

import pyarrow as pa
from tqdm import tqdm

from orchestrator.corpus import Document
from orchestrator.errors import KvorchError
from orchestrator.lake.queries import metrics_of
from orchestrator.pool.actors import Call, WorkerPool
from orchestrator.sweep.planner import TokenizedDocument, check_lengths
from orchestrator.sweep.spec import JobSpec
from workers.contract.configs import EvalConfig
from workers.contract.plan import Task, TaskDocument
from workers.contract.tokenization import Tokenization
from workers.presses import Press

HELD_OUT_DOCS = 2
TOLERANCE = 0.02
MAX_ROUNDS = 10

Measure = Callable[[list[EvalConfig]], dict[str, float]]


@dataclass(frozen=True)
class Calibrated:
    """The threshold chosen for one (press, target density), and the density it measured."""

    press: Press
    target: float
    threshold: float
    density: float
    # The thresholds the sweep runs for this target: the closest, and for an extreme target the
    # nearest on the far side when the closest is not there (empty: the closest alone).
    bracket: tuple[float, ...] = ()

    @property
    def sweep(self) -> tuple[float, ...]:
        return self.bracket or (self.threshold,)

    @property
    def within_tolerance(self) -> bool:
        return abs(self.density - self.target) <= TOLERANCE

    def to_json(self) -> dict:
        return {
            "press": self.press.label(),
            "target": self.target,
            "threshold": self.threshold,
            "density": self.density,
            "within_tolerance": self.within_tolerance,
            "sweep_thresholds": list(self.sweep),
        }


def held_out_documents(corpus: list[Document], spec: JobSpec, tokens: Tokenization) -> list[TokenizedDocument]:
    """The calibration documents: up to HELD_OUT_DOCS corpus documents after the evaluated ones."""
    first = spec.max_docs if spec.max_docs is not None else len(corpus)
    docs = corpus[first : first + HELD_OUT_DOCS]
    if not docs:
        raise KvorchError(
            f"--densities calibrates on held-out documents after the first {first}, but the corpus has "
            f"only {len(corpus)}; lower --max-docs or add documents to the corpus"
        )
    held_out = [TokenizedDocument(d, tokens.ids(d.text, spec.max_tokens)) for d in docs]
    check_lengths(held_out, spec.chunk_size)
    return held_out


def thresholded(configs: list[EvalConfig]) -> list[Press]:
    """The presses a threshold applies to, in config order, each once."""
    return list(dict.fromkeys(c.press for c in configs if c.threshold is not None))


def calibrate(presses: list[Press], targets: tuple[float, ...], measure: Measure) -> list[Calibrated]:
    """For each press and target, the measured threshold whose density is closest to the target,
    and the thresholds that bracket the extreme targets (module docstring)."""
    seen: dict[Press, dict[float, float]] = {p: {} for p in presses}
    sides = {t: _sides(t, targets) for t in targets}

    def evaluate(candidates: dict[Press, set[float]]) -> int:
        """Measure the thresholds not measured yet, in one batched call; how many there were."""
        configs = [EvalConfig(p, t) for p, taus in candidates.items() for t in sorted(taus) if t not in seen[p]]
        if configs:
            densities = measure(configs)
            for config in configs:
                seen[config.press][config.threshold] = densities[config.label]
        return len(configs)

    evaluate({p: set(_start(p)) for p in presses})
    for _ in range(MAX_ROUNDS):
        candidates: dict[Press, set[float]] = {}
        for press in presses:
            for target in targets:
                if not _hit(seen[press], target, sides[target]):
                    candidates.setdefault(press, set()).update(_next(seen[press], target))
        if not evaluate(candidates):
            break
    out = []
    for press in presses:
        for target in targets:
            tau, density = _closest(seen[press], target)
            out.append(Calibrated(press, target, tau, density, _bracket(seen[press], target, sides[target])))
    return out


def _sides(target: float, targets: tuple[float, ...]) -> tuple[str, ...]:
    """Which side of ``target`` the sweep must reach: below the lowest target, above the highest."""
    return (*(("below",) if target == min(targets) else ()), *(("above",) if target == max(targets) else ()))


def _on_side(density: float, target: float, side: str) -> bool:
    """Within the tolerance of ``target``, on ``side`` of it (or on it)."""
    return target - TOLERANCE <= density <= target if side == "below" else target <= density <= target + TOLERANCE


def _bracket(seen: dict[float, float], target: float, sides: tuple[str, ...]) -> tuple[float, ...]:
    """The closest threshold, then for each side the closest is not on, the nearest one that is."""
    closest = _closest(seen, target)[0]
    chosen = [closest]
    for side in sides:
        if _on_side(seen[closest], target, side):
            continue
        there = [t for t, d in seen.items() if (d <= target if side == "below" else d >= target)]
        if there:
            chosen.append(min(there, key=lambda t: (abs(seen[t] - target), t)))
    return tuple(dict.fromkeys(chosen))


def run(
    spec: JobSpec, held_out: list[TokenizedDocument], workers: WorkerPool, batch_configs: int, progress: bool = True
) -> list[Calibrated]:
    """Calibrate every thresholded press of ``spec`` to ``spec.densities`` on the run's pool
    (its batches spread over the ready actors, re-queued if one is lost), ``batch_configs``
    configs per forward (the run's resolved count); ``progress``: a bar over each round's batches."""
    presses = thresholded(list(spec.configs))
    print(
        f"kvorch: calibrating {len(presses)} method(s) to densities {', '.join(map(str, spec.densities))} "
        f"on {len(held_out)} held-out document(s)",
        file=sys.stderr,
    )
    # With agreement on, the engine adds a baseline reference row to every batch without one.
    per_batch = max(1, batch_configs - 1) if spec.agreement else batch_configs
    measure = pool_measure(held_out, workers, per_batch, progress)
    rounds = itertools.count(1)
    began = time.perf_counter()

    def logged(configs: list[EvalConfig]) -> dict[str, float]:
        number, started = next(rounds), time.perf_counter()
        print(
            f"kvorch: calibration round {number} (at most {MAX_ROUNDS + 1}): {len(configs)} threshold(s) on "
            f"{len(held_out)} held-out document(s) ...",
            file=sys.stderr,
            flush=True,
        )
        densities = measure(configs)
        shown = ", ".join(f"{c.label} -> {densities[c.label]:.3f}" for c in configs)
        print(f"kvorch: calibration round {number}, {time.perf_counter() - started:.0f} s: {shown}", file=sys.stderr)
        return densities

    results = calibrate(presses, spec.densities, logged)
    print(f"kvorch: calibration: done in {time.perf_counter() - began:.0f} s", file=sys.stderr)
    for r in results:
        if not r.within_tolerance:
            print(
                f"kvorch: warning: {r.press.label()} reaches density {r.density:.3f}, not {r.target} "
                f"(±{TOLERANCE}); closest threshold {r.threshold:g} used",
                file=sys.stderr,
            )
    return results


def to_json(held_out: list[TokenizedDocument], results: list[Calibrated]) -> dict:
    """What the run spec records about the calibration."""
    return {
        "held_out_docs": [d.document.doc_id for d in held_out],
        "tolerance": TOLERANCE,
        "thresholds": [r.to_json() for r in results],
    }


def calibrated_spec(spec: JobSpec, results: list[Calibrated]) -> JobSpec:
    """The spec whose configs run each thresholded press at its calibrated thresholds."""
    chosen: dict[Press, list[float]] = {}
    for r in results:
        taus = chosen.setdefault(r.press, [])
        taus.extend(t for t in r.sweep if t not in taus)
    configs: list[EvalConfig] = []
    for config in spec.configs:
        if config.threshold is None:
            configs.append(config)
        elif config.press in chosen:
            configs.extend(EvalConfig(config.press, t) for t in chosen.pop(config.press))
    return dataclasses.replace(spec, configs=tuple(configs))


def pool_measure(
    docs: list[TokenizedDocument], workers: WorkerPool, batch_configs: int, progress: bool = False
) -> Measure:
    """A :data:`Measure` that evaluates the held-out documents on the pool, one call per
    (document, batch of configs), so that several actors share a round and its bar moves.

    A config that raises there stops the calibration: a threshold cannot be searched on a
    density that was not measured.
    """
    task_docs = [TaskDocument(d.document.doc_id, d.token_ids) for d in docs]

    def measure(configs: list[EvalConfig]) -> dict[str, float]:
        batches = [tuple(configs[i : i + batch_configs]) for i in range(0, len(configs), batch_configs)]
        calls = [
            Call(f"calibration-{i}-{j}", "run", (Task(f"calibration-{i}-{j}", (doc,), b),))
            for i, b in enumerate(batches)
            for j, doc in enumerate(task_docs)
        ]
        bar = tqdm(total=len(calls), unit="batch", desc="calibration", file=sys.stderr, disable=not progress)
        try:
            results = workers.map(calls, hint="check --model/--device", on_each=bar.update)
        finally:
            bar.close()
        failed = [f for r in results for f in r.failures]
        if failed:
            first = failed[0]
            raise KvorchError(
                f"calibration: {first.config} failed on held-out document {first.doc_id}: {first.reason}; "
                "drop it from --methods or run without --densities"
            )
        densities = compressible_density(pa.concat_tables([r.rows for r in results]))
        empty = [c.label for c in configs if densities.get(c.label) is None]
        if empty:  # every key protected (h2o's 512-key window on documents of 512 tokens): nothing to search
            raise KvorchError(
                f"calibration: {empty[0]} has no compressible keys on the held-out documents (its protected "
                "regions cover them), so no threshold changes its density; raise --max-tokens or drop it from "
                "--methods"
            )
        return densities

    return measure


def compressible_density(rows: pa.Table) -> dict[str, float]:
    """Config label -> density of the compressible region, as the compare table defines it."""
    return {r["config"]: r["density_compressible"] for r in metrics_of(rows)}


def _start(press: Press) -> list[float]:
    tau = next(t for t in press.default_thresholds if t is not None)
    step = max(abs(tau), 1.0)
    return [_round(tau - step), _round(tau), _round(tau + step)]


def _hit(seen: dict[float, float], target: float, sides: tuple[str, ...] = ()) -> bool:
    """The closest density within the tolerance and, for an extreme target, one on its far side too."""
    if abs(_closest(seen, target)[1] - target) > TOLERANCE:
        return False
    return all(any(_on_side(d, target, side) for d in seen.values()) for side in sides)


def _closest(seen: dict[float, float], target: float) -> tuple[float, float]:
    tau = min(seen, key=lambda t: (abs(seen[t] - target), t))
    return tau, seen[tau]


def _next(seen: dict[float, float], target: float) -> set[float]:
    """Thresholds to try next for ``target``: inside its bracket, or a step outwards."""
    low = [t for t, d in seen.items() if d >= target]  # thresholds keeping at least the target
    high = [t for t, d in seen.items() if d <= target]
    span = max(max(seen) - min(seen), 1e-6)
    if not low:
        return {_round(min(seen) - 2 * span)}
    if not high:
        return {_round(max(seen) + 2 * span)}
    lo, hi = max(low), min(high)
    if hi <= lo:  # non-monotone measurements: nothing sound to refine
        return set()
    d_lo, d_hi = seen[lo], seen[hi]
    mid = _round((lo + hi) / 2)
    secant = _round(lo + (d_lo - target) * (hi - lo) / (d_lo - d_hi)) if d_lo != d_hi else mid
    return {t for t in (mid, secant) if lo < t < hi}


def _round(value: float) -> float:
    """6 significant digits: the precision of a config label (``@{threshold:g}``)."""
    return float(f"{value:.6g}") if math.isfinite(value) else value
