"""One decoding step of N configs at once next to one config's (issue 35): decoding reads every
weight once per step whatever the batch, so on a GPU N configs should decode for about the price
of one (the claim: 16 configs at most 2x one config's step).

Rows, side by side in one process, each its own Engine on the same random-weight model shape:
``Engine.generate`` after a ``--tokens`` context (``--protocol once``, the question read after it)
with N configs, knorm at N ratios spread over (0, 1) (every row a different cache), exactly
``--new`` tokens each (no stop tokens). ``ms/step`` is the decoding time (the call's time minus
the prompt's forward seconds) over its ``--new - 1`` steps; ``vs 1`` divides by the one-config
row's. Each figure is the best of ``--repeat`` after an untimed warm-up document.

    PYTHONPATH=. python bench/decode_step.py                                      # CPU, 2 threads
    PYTHONPATH=. python bench/decode_step.py --device cuda --layers 30 --tokens 4096  # a GPU
    PYTHONPATH=. python bench/decode_step.py --layers 2 --tokens 128 --new 4 --configs 1,2  # smoke
"""

from __future__ import annotations

import argparse
import os
import platform
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from generation_cost import SMOLLM2_135M, build_model, kvorch_generate  # noqa: E402

from workers.contract.configs import EvalConfig  # noqa: E402
from workers.contract.settings import EngineSettings, GenerationSettings  # noqa: E402
from workers.engine.core import Engine  # noqa: E402
from workers.presses import parse_method  # noqa: E402


def spread_configs(n: int) -> list[EvalConfig]:
    """n knorm configs at ratios evenly inside (0, 1): n different caches, one press."""
    return [EvalConfig(parse_method("knorm"), ratio=(i + 1) / (n + 1)) for i in range(n)]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tokens", type=int, default=1024, help="context tokens")
    parser.add_argument("--question", type=int, default=16)
    parser.add_argument("--new", type=int, default=33, help="generated tokens: --new - 1 decoding steps timed")
    parser.add_argument("--configs", default="1,4,16", help="batch sizes side by side (the first is the reference)")
    parser.add_argument("--layers", type=int, default=SMOLLM2_135M["num_hidden_layers"])
    parser.add_argument("--chunk", type=int, default=512)
    parser.add_argument("--window", type=int, default=64)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--repeat", type=int, default=2)
    args = parser.parse_args()
    sizes = [int(n) for n in args.configs.split(",")]
    if min(sizes + [args.tokens, args.question, args.layers, args.repeat]) < 1 or args.new < 2:
        raise SystemExit("--configs, --tokens, --question, --layers and --repeat must be >= 1, --new >= 2")
    torch.set_num_threads(args.threads)
    ids = torch.randint(0, SMOLLM2_135M["vocab_size"], (2 * (args.tokens + args.question),))
    ids = ids.to(args.device)
    warm, timed = ids[: args.tokens + args.question], ids[args.tokens + args.question :]
    settings = GenerationSettings(max_new_tokens=args.new, protocol="once")
    load_before = os.getloadavg()[0]
    rows = []
    for n in sizes:
        engine = Engine(
            build_model(args.layers).to(args.device), EngineSettings(chunk_size=args.chunk, window=args.window)
        )
        configs = spread_configs(n)
        kvorch_generate(engine, configs, warm[: args.tokens], warm[args.tokens :], settings)  # untimed
        runs = [
            kvorch_generate(engine, configs, timed[: args.tokens], timed[args.tokens :], settings)
            for _ in range(args.repeat)
        ]
        seconds, prefill = min(runs, key=lambda run: run[0] - run[1])
        rows.append((n, 1000 * (seconds - prefill) / (args.new - 1), prefill))
    device = torch.cuda.get_device_name() if args.device.startswith("cuda") else platform.processor() or "cpu"
    print(
        f"# {device}, torch {torch.__version__}, {args.threads} threads, random SmolLM2-135M shape fp32 "
        f"({args.layers} layers), context {args.tokens} + question {args.question}, {args.new - 1} decoding "
        f"steps, --protocol once, best of {args.repeat}"
    )
    print(f"# load average (1 min): {load_before:.2f} before, {os.getloadavg()[0]:.2f} after, {os.cpu_count()} CPUs")
    print(f"{'configs':>7} {'ms/step':>9} {'prefill s':>9} {'vs 1':>7}")
    for n, ms, prefill in rows:
        print(f"{n:>7} {ms:>9.2f} {prefill:>9.2f} {ms / rows[0][1]:>6.2f}x")


if __name__ == "__main__":
    main()
