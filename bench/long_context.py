"""Cost growth with document length: kvorch's batched sweep next to a plain per-config HF loop,
in one run, at each of ``--lengths``.

On a CPU both are compute-bound, so the plain loop (one transformers chunked forward per config,
DynamicCache, batch 1: ``sweep_throughput.naive_config``) is the floor: batching configs saves
the weight reads that a GPU is bound by, not the FLOPs a CPU is bound by. This table puts on
record how far above that floor kvorch's CPU default (the step uncompiled at exact shapes, every
config batched in one forward over a masked cache) sits as documents grow, where its attention over the whole
document-length cache costs more than the loop's growing DynamicCache.

    python bench/long_context.py --lengths 1024,4096,16384 --configs 5      # the recorded run
    python bench/long_context.py --model tiny --lengths 64,128 --configs 2   # smoke size
"""

from __future__ import annotations

import argparse
import platform
import time

import torch
from sweep_throughput import LLAMA_SHAPES, build_llama, document_ids, naive_config, sweep_configs

from workers.engine.core import Engine
from workers.engine.settings import EngineSettings
from workers.models import EMBEDDED_MODEL, load_model


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--lengths", default="1024,4096,16384", help="document lengths in tokens")
    parser.add_argument("--configs", type=int, default=5, help="the first N configs of --methods all")
    parser.add_argument("--chunk", type=int, default=128)
    parser.add_argument("--window", type=int, default=128)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--model", choices=(EMBEDDED_MODEL, *LLAMA_SHAPES), default=EMBEDDED_MODEL)
    args = parser.parse_args()
    try:
        lengths = [int(x) for x in args.lengths.split(",")]
    except ValueError:
        raise SystemExit(f"--lengths {args.lengths!r}: use comma-separated token counts, e.g. 1024,4096") from None
    torch.set_num_threads(args.threads)
    model = load_model(EMBEDDED_MODEL, "float32", "cpu") if args.model == EMBEDDED_MODEL else build_llama(
        args.model, "float32", "cpu"
    )  # fmt: skip
    configs = sweep_configs(args.configs)
    engine = Engine(model, EngineSettings(args.chunk, args.window, "sdpa", static=False))
    where = platform.processor() or platform.machine()
    print(f"# {where}, {args.threads} threads, torch {torch.__version__}, {args.model} fp32, chunk {args.chunk}, "
          f"window {args.window}, configs: {', '.join(c.label for c in configs)}", flush=True)  # fmt: skip
    print(f"{'tokens':>7} {'configs':>7} {'plain loop s':>12} {'kvorch s':>9} {'kvorch/plain':>12} "
          f"{'plain cfg*tok/s':>15} {'kvorch cfg*tok/s':>16}")  # fmt: skip
    warmup = document_ids(args.model, 2 * args.chunk, "cpu")  # one-time costs stay out of the figures
    naive_config(model, warmup, args.chunk, False)
    engine.evaluate("warmup", warmup, configs)
    for n in lengths:
        ids = document_ids(args.model, n, "cpu")
        tic = time.perf_counter()
        for config in configs:
            naive_config(model, ids, args.chunk, config.press.needs_attention)
        plain = time.perf_counter() - tic
        tic = time.perf_counter()
        engine.evaluate("d", ids, configs)
        kvorch = time.perf_counter() - tic
        work = len(configs) * n
        print(f"{n:>7} {len(configs):>7} {plain:>12.3f} {kvorch:>9.3f} {kvorch / plain:>12.2f} "
              f"{work / plain:>15.1f} {work / kvorch:>16.1f}", flush=True)  # fmt: skip


if __name__ == "__main__":
    main()
