"""What compiling the chunk step costs: cold (an empty compile cache) and warm (the cache a first
process filled, as a second actor, a rerun or a resume on the same machine finds it).

Each measurement is a fresh Python process (dynamo's in-memory caches would hide a cold start),
on the narrow random-weight Llama of bench/engine_overhead.py (hidden size 64, so the compile,
not the forward, is what is timed). Per (configs, layers): the cold process compiles into a new
cache directory, then a second process with the same directory compiles again. Printed: the
step's compile seconds (a warm-up chunk included, as the lake records them) and the seconds from
handing the engine a document to its first chunk done.

``--layouts regional,unrolled`` also times the step as it compiled before layer regions: one
graph with every layer unrolled (workers/engine/compiling.py, LAYER_REGIONS), minutes per figure.

    python bench/compile_time.py                                   # 1, 10 and 32 configs; 16 and 32 layers
    python bench/compile_time.py --configs 1 --layers 2 --tokens 64 --backend aot_eager   # smoke size
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

CHILD = "--child"


def configs_for(n: int) -> list:
    """``n`` configs as a sweep has them: baseline, then `all`'s methods, then knorm thresholds."""
    from orchestrator.sweep.spec import build_configs

    configs = build_configs(("all",), ())
    extra = build_configs(("knorm",), (",".join(str(-16.0 + 0.25 * i) for i in range(1, max(2, n))),))
    return (configs + extra)[:n]


def child(args: argparse.Namespace) -> None:
    """One process: build the engine, evaluate one document, print the timings as JSON."""
    import torch

    from bench.engine_overhead import narrow_llama
    from workers.contract.settings import EngineSettings
    from workers.engine import compiling
    from workers.engine.compile_cache import use_compile_cache
    from workers.engine.core import Engine

    torch.set_num_threads(args.threads)
    use_compile_cache(args.cache)
    compiling.LAYER_REGIONS = args.layouts == "regional"
    model = narrow_llama(args.layers)
    engine = Engine(model, EngineSettings(args.chunk, args.chunk, compile=True), compile_backend=args.backend)
    ids = torch.randint(0, 1000, (args.tokens,), generator=torch.Generator().manual_seed(0))
    configs = configs_for(args.configs)
    first: list[float] = []
    tic = time.perf_counter()
    engine.evaluate("d", ids, configs, lambda _tokens: first or first.append(time.perf_counter() - tic))
    print(json.dumps({"compile_s": engine.compile_seconds, "first_chunk_s": first[0], "configs": len(configs)}))


def measure(args: argparse.Namespace, configs: int, layers: int, layout: str, cache: str) -> dict:
    argv = [sys.executable, __file__, CHILD, "--configs", str(configs), "--layers", str(layers), "--cache", cache,
            "--layouts", layout,
            "--tokens", str(args.tokens), "--chunk", str(args.chunk), "--threads", str(args.threads),
            "--backend", args.backend]  # fmt: skip
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [os.getcwd(), os.environ.get("PYTHONPATH")]))}
    done = subprocess.run(argv, capture_output=True, text=True, env=env)
    if done.returncode:
        raise SystemExit(f"compile_time: the child failed:\n{done.stderr[-3000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--configs", default="1,10,32", help="comma list of batch sizes (configs per step)")
    parser.add_argument("--layers", default="16,32", help="comma list of depths")
    parser.add_argument("--tokens", type=int, default=512)
    parser.add_argument("--chunk", type=int, default=128)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--backend", default="inductor", help="torch.compile backend (the smoke test: aot_eager)")
    parser.add_argument("--layouts", default="regional", help="comma list of regional (the step) and unrolled")
    parser.add_argument("--cache", help=argparse.SUPPRESS)
    parser.add_argument(CHILD, action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        args.configs, args.layers = int(args.configs), int(args.layers)
        child(args)
        return
    import torch

    print(f"# {platform.processor() or platform.machine()}, torch {torch.__version__}, {args.threads} threads, "
          f"backend {args.backend}, {args.tokens} tokens, chunk {args.chunk}; each figure a fresh process")  # fmt: skip
    header = f"{'layout':>8} {'configs':>7} {'layers':>6} {'cold compile s':>14} {'warm compile s':>14} "
    print(header + f"{'warm first chunk s':>18}")
    for configs in (int(c) for c in args.configs.split(",")):
        for layers in (int(n) for n in args.layers.split(",")):
            for layout in args.layouts.split(","):
                with tempfile.TemporaryDirectory(prefix="kvorch-compile-") as cache:
                    cold = measure(args, configs, layers, layout, cache)
                    warm = measure(args, configs, layers, layout, cache)
                print(f"{layout:>8} {cold['configs']:>7} {layers:>6} {cold['compile_s']:>14.1f} "
                      f"{warm['compile_s']:>14.1f} {warm['first_chunk_s']:>18.1f}", flush=True)  # fmt: skip


if __name__ == "__main__":
    main()
