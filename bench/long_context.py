"""Cost growth with document length: kvorch's batched sweep, with the held and the masked cache,
next to a plain per-config HF loop, in one run, at each of ``--lengths``; then the fit check.

On a CPU all are compute-bound, so the plain loop (one transformers chunked forward per config,
DynamicCache, batch 1: ``sweep_throughput.naive_config``) is the reference: it keeps every key,
so it pays what the masked cache pays per config, and batching saves the weight reads that a
GPU is bound by, not the FLOPs a CPU is bound by. The held cache attends over what each config
holds, so its cost follows density (workers/engine/cache.py).

A threshold config's held cache is sized by what it held in the documents before (workers/engine/
capacity.py): the untimed warm-up document (``--warmup`` tokens) and each shorter length before
a longer one play the corpus's earlier documents. ``kv MiB`` is the ``kv_cache_bytes`` column.

The fit check prints what a Llama-3.1-8B shape allocates at ``--fit-tokens`` with
``--fit-configs`` configs at compressible density ``--fit-density`` plus the agreement's full
reference row, from workers/contract/memory.py's formula, the one the step allocates by
(tests/test_memory.py checks it against a tiny model's tensors).

    python bench/long_context.py --lengths 1024,4096,16384 --configs 5      # the recorded run
    python bench/long_context.py --model tiny --lengths 64,128 --configs 2   # smoke size
"""

from __future__ import annotations

import argparse
import math
import platform
import time

import torch
from sweep_throughput import LLAMA_SHAPES, build_llama, document_ids, naive_config, sweep_configs

from workers.contract.models import EMBEDDED_MODEL, load_model
from workers.contract.settings import EngineSettings
from workers.engine import capacity
from workers.engine.core import Engine


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--lengths", default="1024,4096,16384", help="document lengths in tokens")
    parser.add_argument("--configs", type=int, default=5, help="the first N configs of --methods all")
    parser.add_argument("--chunk", type=int, default=128)
    parser.add_argument("--window", type=int, default=128)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--model", choices=(EMBEDDED_MODEL, *LLAMA_SHAPES), default=EMBEDDED_MODEL)
    parser.add_argument("--caches", default="held,masked", help="the caches to time, side by side")
    parser.add_argument("--warmup", type=int, default=1024, help="tokens of the untimed first document")
    parser.add_argument("--fit-tokens", type=int, default=131072)
    parser.add_argument("--fit-configs", type=int, default=16)
    parser.add_argument("--fit-density", type=float, default=0.1)
    args = parser.parse_args()
    print(fit_check(args.fit_tokens, args.fit_configs, args.fit_density, args.chunk, args.window), flush=True)
    try:
        lengths = [int(x) for x in args.lengths.split(",")]
    except ValueError:
        raise SystemExit(f"--lengths {args.lengths!r}: use comma-separated token counts, e.g. 1024,4096") from None
    torch.set_num_threads(args.threads)
    model = load_model(EMBEDDED_MODEL, "float32", "cpu") if args.model == EMBEDDED_MODEL else build_llama(
        args.model, "float32", "cpu"
    )  # fmt: skip
    configs = sweep_configs(args.configs)
    caches = args.caches.split(",")
    engines = {cache: Engine(model, EngineSettings(args.chunk, args.window, "sdpa", static=False, cache=cache))
               for cache in caches}  # fmt: skip
    where = platform.processor() or platform.machine()
    print(f"# {where}, {args.threads} threads, torch {torch.__version__}, {args.model} fp32, chunk {args.chunk}, "
          f"window {args.window}, configs: {', '.join(c.label for c in configs)}", flush=True)  # fmt: skip
    heads = "".join(f" {c + ' s':>9} {c + '/plain':>12} {c + ' kv MiB':>13}" for c in caches)
    print(f"{'tokens':>7} {'configs':>7} {'plain loop s':>12}{heads}")
    warmup = document_ids(args.model, args.warmup, "cpu")  # one-time costs stay out of the figures
    naive_config(model, warmup, args.chunk, False)
    for engine in engines.values():
        engine.evaluate("warmup", warmup, configs)
    for n in lengths:
        ids = document_ids(args.model, n, "cpu")
        tic = time.perf_counter()
        for config in configs:
            naive_config(model, ids, args.chunk, config.press.needs_attention)
        plain = time.perf_counter() - tic
        cells = ""
        for engine in engines.values():
            tic = time.perf_counter()
            rows = engine.evaluate("d", ids, configs)
            seconds = time.perf_counter() - tic
            kv_mib = rows.column("kv_cache_bytes")[0].as_py() / 2**20
            cells += f" {seconds:>9.3f} {seconds / plain:>12.2f} {kv_mib:>13.1f}"
        print(f"{n:>7} {len(configs):>7} {plain:>12.3f}{cells}", flush=True)
        if "held" in engines:
            print(held_memory(engines["held"], n, args.chunk), flush=True)


def held_memory(engine: Engine, n: int, chunk: int) -> str:
    """Per config of the held engine's last document, summed over (layer, kv-head): the slots its
    pool was sized for (a full band: every position), against what it needed, the most keys its
    kv-heads held together before a chunk (kept, protected included) plus a chunk each. The
    issue's target is <= 1.25."""
    step, layout = engine.last_run
    peaks, _ = step.held_back()  # [configs][layers]
    kv_heads = step.n_kv_heads
    cells = []
    for r, config in enumerate(layout.configs):
        band = next(b for b in step.bands if b.rows.start <= r < b.rows.stop)
        if band.full:
            slots = step.n_layers * kv_heads * step.n
        else:
            slots = sum(layer[r - band.rows.start] for layer in band.allotted) * band.page
            if band.grows:  # grown to what its rows held: the pool's own pages
                slots = sum(band.pages) * band.page // band.size
        need = sum(peaks[r]) + step.n_layers * kv_heads * chunk
        cells.append(f"{config.label} {slots / need:.2f}")
    return f"#   held {n}: slots / (kept + chunk), over (layer, kv-head): " + "; ".join(cells)


def fit_check(n: int, n_configs: int, density: float, chunk: int, window: int) -> str:
    """One line: the device bytes a Llama-3.1-8B shape (bf16) allocates for ``n_configs`` held
    configs keeping ``density`` of the keys outside the window, plus one full reference row."""
    from types import SimpleNamespace

    from workers.contract import memory

    llama_8b = SimpleNamespace(num_hidden_layers=32, num_attention_heads=32, num_key_value_heads=8,
                               hidden_size=4096, head_dim=128, intermediate_size=14336, vocab_size=128256)  # fmt: skip
    floor = window
    bound = min(n, floor + math.ceil(density * (n - floor)))
    kv_heads = llama_8b.num_key_value_heads
    page = capacity.page_size(kv_heads * bound, kv_heads, chunk)
    pages = capacity.pages_for(kv_heads * bound, kv_heads, chunk, page)
    slots = pages * page // kv_heads
    held = memory.config_bytes(llama_8b, n, chunk, 2, static=False, pages=pages, page=page)
    full = memory.config_bytes(llama_8b, n, chunk, 2, static=False)
    weights = 8.03e9 * 2
    total = n_configs * held + full + weights
    return (
        f"fit: Llama-3.1-8B bf16, {n} tokens, {n_configs} configs at compressible density {density:g} "
        f"({slots} slots per kv-head of {n}) + 1 full reference row: {n_configs} x {held / 2**30:.2f} GiB + "
        f"{full / 2**30:.2f} GiB + weights {weights / 2**30:.1f} GiB = {total / 1e9:.1f} GB "
        f"({'fits' if total < 141e9 else 'does not fit'} an H200's 141 GB; masked: "
        f"{((n_configs + 1) * full + weights) / 1e9:.1f} GB)"
    )

if __name__ == "__main__":
    main()
