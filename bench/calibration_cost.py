"""What ``kvorch submit --densities`` spends calibrating, against the sweep it calibrates.

Runs the README's calibrated job (``kvorch submit --methods baseline,knorm,h2o --densities
0.1,0.25,0.5``, sizes as given) in a fresh process into a temporary lake, stamps each stderr line
as it arrives, and splits the wall time at the lines the submission prints: start-up (Ray, model
load, preflight), calibration (its rounds), the sweep (from the run line to the end). Beside the
seconds, the work each part did in token-configs (a token evaluated under one config): the
calibration's from its recorded thresholds, the sweep's from the run's spec.json, so the ratio can
be read apart from this machine's load.

    python bench/calibration_cost.py [--max-docs 4] [--max-tokens 1024] [--methods baseline,knorm,h2o]
        [--densities 0.1,0.25,0.5] [--model smollm2]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pyarrow.parquet as pq

KVORCH = [sys.executable, "-c", "import sys; from orchestrator.cli import main; sys.exit(main())"]


def stamped_run(args: list[str]) -> tuple[float, list[tuple[float, str]]]:
    """Wall seconds of ``kvorch ARGS`` and its stderr lines, each with the second it arrived."""
    began = time.monotonic()
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    process = subprocess.Popen([*KVORCH, *args], stderr=subprocess.PIPE, stdout=subprocess.DEVNULL, text=True, env=env)
    lines = []
    assert process.stderr is not None
    for line in process.stderr:
        for part in line.replace("\r", "\n").splitlines():
            if part.strip():
                lines.append((time.monotonic() - began, part))
    if process.wait() != 0:
        raise SystemExit("kvorch submit failed:\n" + "\n".join(text for _, text in lines[-20:]))
    return time.monotonic() - began, lines


def first(lines: list[tuple[float, str]], start: str) -> float:
    return next(t for t, text in lines if text.startswith(start))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--max-docs", type=int, default=4)
    parser.add_argument("--max-tokens", type=int, default=1024)
    parser.add_argument("--methods", default="baseline,knorm,h2o")
    parser.add_argument("--densities", default="0.1,0.25,0.5")
    parser.add_argument("--model", default="smollm2")
    args = parser.parse_args()
    load_before = os.getloadavg()[0]
    with tempfile.TemporaryDirectory() as tmp:
        lake = Path(tmp) / "lake"
        wall, lines = stamped_run([
            "submit", "--model", args.model, "--methods", args.methods, "--densities", args.densities,
            "--max-docs", str(args.max_docs), "--max-tokens", str(args.max_tokens), "--lake", str(lake),
        ])  # fmt: skip
        (run_dir,) = (lake / "runs").iterdir()
        spec = json.loads((run_dir / "spec.json").read_text())
        # The sweep's token-configs, as the rows count them (each config's predicted tokens).
        sweep_work = sum(
            sum(pq.read_table(part, columns=["n_tokens"]).column(0).to_pylist())
            for part in (lake / "chunks").rglob("*.parquet")
        )
    calibrating, calibrated = first(lines, "kvorch: calibrating "), first(lines, "kvorch: calibration: done")
    sweeping = first(lines, "kvorch: run ")
    rounds = sum(1 for _, text in lines if text.startswith("kvorch: calibration round ") and text.endswith("..."))
    measured = sum(
        text.count(" -> ") for _, text in lines if text.startswith("kvorch: calibration round ") and " s: " in text
    )
    held_out_tokens = args.max_tokens * len(spec["calibration"]["held_out_docs"])  # each cut to --max-tokens
    calibration_work = measured * held_out_tokens
    print(f"machine: {platform.machine()}, {os.cpu_count()} CPUs, load average before {load_before:.2f}, after "
          f"{os.getloadavg()[0]:.2f}")  # fmt: skip
    print(
        f"job: --methods {args.methods} --densities {args.densities} --max-docs {args.max_docs} "
        f"--max-tokens {args.max_tokens} --model {args.model}"
    )
    print(f"{'part':<40}{'seconds':>9}{'share':>8}{'token-configs':>15}")
    parts = [
        ("start-up (Ray, model, preflight)", calibrating, None),
        (f"calibration ({rounds} rounds, {measured} thresholds)", calibrated - calibrating, calibration_work),
        ("between (plan, claim)", sweeping - calibrated, None),
        (f"sweep ({len(spec['configs'])} configs)", wall - sweeping, sweep_work),
    ]
    for name, seconds, work in parts:
        shown = f"{work:>15}" if work is not None else f"{'':>15}"
        print(f"{name:<40}{seconds:>9.1f}{seconds / wall:>8.1%}{shown}")
    print(f"{'total':<40}{wall:>9.1f}{1:>8.0%}")
    print(
        f"calibration / sweep: {(calibrated - calibrating) / (wall - sweeping):.2f}x in seconds, "
        f"{calibration_work / sweep_work:.2f}x in token-configs"
    )


if __name__ == "__main__":
    main()
