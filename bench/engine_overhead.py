"""Per-chunk overhead of the engine on CPU: a 16-layer Llama with hidden size 64, so matrix work
is negligible and what is timed is the engine's own work per layer and chunk.

Rows measured side by side in one process: a plain transformers chunked loop (DynamicCache, SDPA,
batch 1), then each kvorch engine with the baseline config alone and with the `all` sweep batched:
the chunk step uncompiled at exact shapes (the CPU default) and compiled by inductor
(what ``--compile on`` runs; its compile time is printed, not counted). Best of ``--repeat`` runs
over one document, 1 thread.

    python bench/engine_overhead.py [--tokens 1024] [--chunk 128] [--repeat 3] [--attn sdpa]
"""

from __future__ import annotations

import argparse
import functools
import platform
import time

import torch
from transformers import DynamicCache, LlamaConfig, LlamaForCausalLM

from orchestrator.sweep.spec import build_configs
from workers.contract.settings import EngineSettings
from workers.engine.core import Engine


def narrow_llama(layers: int = 16) -> LlamaForCausalLM:
    torch.manual_seed(0)
    config = LlamaConfig(
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=layers,
        num_attention_heads=4,
        num_key_value_heads=2,
        vocab_size=1000,
        max_position_embeddings=8192,
    )
    return LlamaForCausalLM(config).eval()


def plain_loop(model: LlamaForCausalLM, ids: torch.Tensor, chunk: int) -> None:
    cache = DynamicCache(config=model.config)
    with torch.inference_mode():
        for s in range(0, len(ids), chunk):
            model(ids[None, s : s + chunk], past_key_values=cache, use_cache=True)


def best_seconds(fn, repeat: int) -> float:
    fn()  # warm-up (a compiled engine's first run already compiled)
    times = []
    for _ in range(repeat):
        tic = time.perf_counter()
        fn()
        times.append(time.perf_counter() - tic)
    return min(times)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tokens", type=int, default=1024)
    parser.add_argument("--chunk", type=int, default=128)
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--attn", choices=("sdpa", "eager", "flex"), default="sdpa", help="the chunk step's kernel")
    parser.add_argument("--layers", type=int, default=16, help="decoder layers (the smoke test uses 2)")
    parser.add_argument(
        "--compile-backend", default="inductor", help="torch.compile backend (the smoke test: aot_eager, no C++)"
    )
    args = parser.parse_args()
    torch.set_num_threads(1)
    ids = torch.randint(0, 1000, (args.tokens,), generator=torch.Generator().manual_seed(0))
    chunks = -(-args.tokens // args.chunk)

    plain_model = narrow_llama(args.layers).to(torch.float32)
    plain_model.set_attn_implementation("sdpa")
    baseline, sweep = build_configs(("baseline",), ()), build_configs(("all",), ())
    engines = {
        "uncompiled": Engine(narrow_llama(args.layers), EngineSettings(chunk_size=args.chunk, window=args.chunk)),
        "compiled": Engine(
            narrow_llama(args.layers),
            EngineSettings(chunk_size=args.chunk, window=args.chunk, attn=args.attn, compile=True),
            compile_backend=args.compile_backend,
        ),
    }
    rows = [("plain transformers loop", 1, best_seconds(lambda: plain_loop(plain_model, ids, args.chunk), args.repeat))]
    compile_seconds = {}
    for name, engine in engines.items():
        for configs in (baseline, sweep):
            tic = time.perf_counter()
            engine.evaluate("d", ids, configs)  # the first run compiles
            compile_seconds[(name, len(configs))] = time.perf_counter() - tic
            run = functools.partial(engine.evaluate, "d", ids, configs)
            rows.append((f"kvorch {name}", len(configs), best_seconds(run, args.repeat)))
    print(
        f"# {platform.processor() or platform.machine()}, torch {torch.__version__}, 1 thread, "
        f"{args.tokens} tokens, chunk {args.chunk}, chunk step attn {args.attn} (inductor)"
    )
    print(f"{'path':<26} {'configs':>7} {'ms/chunk':>9} {'vs plain':>9} {'vs 1 config':>11} {'first run s':>11}")
    plain = rows[0][2]
    one = {}
    for name, n, seconds in rows:
        one.setdefault(name, seconds)
        first = compile_seconds.get((name.removeprefix("kvorch "), n), 0.0)
        print(
            f"{name:<26} {n:>7} {1000 * seconds / chunks:>9.1f} {seconds / plain:>8.2f}x "
            f"{seconds / one[name]:>10.2f}x {first:>11.1f}"
        )


if __name__ == "__main__":
    main()
