"""Configs x tokens per second of a method sweep: kvorch vs a naive per-config loop, on GPU or CPU.

Rows, measured side by side in one process over one document:
- naive loop: what per-press harnesses do, one plain transformers chunked forward per config
  (DynamicCache, batch 1), eager attention with ``output_attentions`` for presses that need
  attention weights, and a pass over the cached keys for scoring. It evicts nothing, so its time
  is a lower bound on a real naive harness: a speed-up above 1 here is conservative.
- kvorch uncompiled: the chunk step at exact shapes (what runs on CPU, and for presses that
  cannot be traced).
- kvorch compiled: the same step at static shapes, one compiled graph per chunk
  (workers/engine/step.py) with ``--attn``.
Each for the sweep (the 10 configs of ``all``, or ``--configs``) and for one config (baseline).
Then the fit check: the chunk step with ``--fit-configs`` configs over ``--fit-tokens`` tokens,
its time and peak memory. Per chunk, the chunk step is put against two bounds: weight streaming
(read every parameter once per chunk at ``--hbm-gbps``) and compute (2 x params x tokens plus
attention over the held keys, for every config, at ``--tflops``).

    python bench/sweep_throughput.py --device cuda --model llama-1b --tokens 4096    # the issue's run
    python bench/sweep_throughput.py --model narrow --tokens 512 --fit-tokens 1024   # CPU smoke run

``--model llama-1b`` / ``llama-3b`` are Llama-3.2-shaped models with random weights (no download;
SmolLM2's 49152-token vocabulary), fed seeded random token ids, so neither the GGUF nor a tokenizer
is needed (the GPU image has neither). A forward's cost depends on the shapes; how many keys
thresholded presses evict depends on the weights and differs from a trained model. ``--model
SmolLM2-135M`` (the embedded model) reads the pydoc corpus, documents joined until long enough.
On CUDA (and whenever compiling) every timed path runs once untimed first, so CUDA start-up and
compilation stay out of the figures; compile times are printed separately.
"""

from __future__ import annotations

import argparse
import math
import platform
import time
from itertools import zip_longest

import torch
import torch.nn.functional as F
from transformers import DynamicCache

from orchestrator.sweep.spec import build_configs
from workers.contract.models import DTYPES, EMBEDDED_MODEL, load_model, resolve_dtype
from workers.contract.settings import EngineSettings
from workers.engine.core import Engine

# Llama-3.2-1B / -3B shapes (tied embeddings) with SmolLM2's vocabulary: 1.07B / 2.97B parameters.
LLAMA_SHAPES = {
    # The CPU proxy of bench/engine_overhead.py: llama-1b's 16 layers at hidden size 64.
    # The smoke test's: 2 layers at hidden size 32.
    "tiny": {"hidden_size": 32, "num_hidden_layers": 2, "num_attention_heads": 4, "intermediate_size": 64},
    "narrow": {"hidden_size": 64, "num_hidden_layers": 16, "num_attention_heads": 4, "intermediate_size": 128},
    "llama-1b": {"hidden_size": 2048, "num_hidden_layers": 16, "num_attention_heads": 32, "intermediate_size": 8192},
    "llama-3b": {"hidden_size": 3072, "num_hidden_layers": 28, "num_attention_heads": 24, "intermediate_size": 8192},
}
# Thresholds beyond the defaults, added round-robin over methods for --configs above the 10 of `all`.
EXTRA_THRESHOLDS = {
    "knorm": (-14, -18, -20, -22, -24),
    "expected_attention": (0.005, 0.02, 0.04),
    "observed_attention": (0.001, 0.01, 0.03),
    "h2o": (0.5, 2.0, 4.0),
    "snapkv": (0.0005, 0.002, 0.004),
    "tova": (0.00025, 0.001, 0.002),
    "random": (0.25, 0.75),
}
# (memory GB/s, dense bf16 TFLOP/s) by device name; --hbm-gbps / --tflops override.
GPU_PEAKS = {"H200": (4800.0, 989.0), "H100": (3350.0, 989.0), "A100": (2039.0, 312.0)}
SHORT_DTYPE = {"float32": "fp32", "bfloat16": "bf16", "float16": "fp16"}


def build_llama(name: str, dtype: str, device: str) -> torch.nn.Module:
    """A random-weight Llama, created directly on ``device`` in ``dtype`` (no fp32 CPU detour)."""
    from transformers import LlamaConfig, LlamaForCausalLM

    kv_heads = 2 if name in ("tiny", "narrow") else 8
    config = LlamaConfig(
        vocab_size=49152, num_key_value_heads=kv_heads, max_position_embeddings=131072, tie_word_embeddings=True,
        **LLAMA_SHAPES[name],
    )  # fmt: skip
    previous = torch.get_default_dtype()
    torch.set_default_dtype(DTYPES[dtype])
    try:
        with torch.device(device):
            model = LlamaForCausalLM(config)
    finally:
        torch.set_default_dtype(previous)
    return model.eval()


def sweep_configs(count: int | None) -> list:
    """The 10 configs of ``--methods all``, cut to ``count`` or extended with EXTRA_THRESHOLDS."""
    base = build_configs(("all",), ())
    if count is None:
        return base
    if count < 1:
        raise SystemExit("--configs must be >= 1")
    if count <= len(base):
        return base[:count]
    per_method = [[(m, t) for t in ts] for m, ts in EXTRA_THRESHOLDS.items()]
    extras = [pair for row in zip_longest(*per_method) for pair in row if pair is not None]
    if count > len(base) + len(extras):
        raise SystemExit(f"--configs can be at most {len(base) + len(extras)}")
    chosen = extras[: count - len(base)]
    overrides = {m: [t for mm, t in chosen if mm == m] for m in EXTRA_THRESHOLDS}
    thresholds = [
        f"{c.method}={','.join(f'{t:g}' for t in (c.threshold, *overrides[c.method]))}"
        for c in base
        if overrides.get(c.method)
    ]
    configs = build_configs(("all",), tuple(thresholds))
    assert len(configs) == count, (len(configs), count)
    return configs


@torch.inference_mode()
def naive_config(model, ids: torch.Tensor, chunk: int, needs_attention: bool) -> float:
    """One config the naive way; returns the summed NLL (so the work cannot be skipped). The
    model's attention implementation is restored afterwards: kvorch's engines share the model."""
    previous = model.config._attn_implementation
    model.set_attn_implementation("eager" if needs_attention else "sdpa")
    try:
        cache = DynamicCache(config=model.config)
        total = 0.0
        n = ids.shape[0]
        for s in range(0, n, chunk):
            e = min(s + chunk, n)
            out = model(ids[None, s:e], past_key_values=cache, use_cache=True, output_attentions=needs_attention)
            if e - s > 1 and e < n:
                total += float(F.cross_entropy(out.logits[0, :-1], ids[s + 1 : e]))
            for layer in cache.layers:  # the scoring pass every press makes over the cache
                layer.keys.norm(dim=-1)
        return total
    finally:
        model.set_attn_implementation(previous)


def timed(fn, device: str, warmup: bool) -> tuple[float, float]:
    """(seconds of a timed run, seconds of the untimed first run: compilation, CUDA start-up)."""
    first = 0.0
    if warmup:
        tic = time.perf_counter()
        fn()
        if device == "cuda":
            torch.cuda.synchronize()
        first = time.perf_counter() - tic
    if device == "cuda":
        torch.cuda.synchronize()
    tic = time.perf_counter()
    fn()
    if device == "cuda":
        torch.cuda.synchronize()
    return time.perf_counter() - tic, first


def document_ids(model_name: str, n_tokens: int, device: str) -> torch.Tensor:
    """``n_tokens`` ids: the pydoc corpus joined for the embedded model, seeded random ids for the
    random-weight shapes (whose predictions mean nothing either way)."""
    if model_name != EMBEDDED_MODEL:
        return torch.randint(0, 49152, (n_tokens,), generator=torch.Generator().manual_seed(0)).to(device)
    from orchestrator.corpus import load_corpus
    from workers.contract import tokenization

    tokens = tokenization.load(EMBEDDED_MODEL, tokenization.DEFAULT_BOS)
    ids: list[int] = []
    for doc in load_corpus("pydoc"):
        ids += tokens.ids(doc.text, n_tokens - len(ids))
        if len(ids) >= n_tokens:
            break
    if len(ids) < n_tokens:
        raise SystemExit(f"the pydoc corpus has only {len(ids)} tokens; ask for fewer --tokens")
    return torch.tensor(ids[:n_tokens], device=device)


def flops_per_chunk(model, n_tokens: int, chunk: int, configs: int) -> float:
    """Dense FLOPs of one average chunk for ``configs`` rows: 2 x params x chunk tokens, plus
    QK^T and PV over the keys before and in the chunk (half the document on average)."""
    cfg = model.config
    params = sum(p.numel() for p in model.parameters())
    attention = 4 * cfg.num_hidden_layers * cfg.hidden_size * chunk * (n_tokens / 2 + chunk / 2)
    return configs * (2 * params * chunk + attention)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tokens", type=int, default=1024)
    parser.add_argument("--chunk", type=int, default=128)
    parser.add_argument("--window", type=int, default=128)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--device", choices=("cpu", "cuda"), default="cpu")
    parser.add_argument("--dtype", choices=("auto", "float32", "bfloat16"), default="auto")
    parser.add_argument("--model", choices=(EMBEDDED_MODEL, *LLAMA_SHAPES), default=EMBEDDED_MODEL)
    parser.add_argument("--configs", type=int, default=None, help="configs in the sweep (default: the 10 of all)")
    parser.add_argument("--attn", choices=("sdpa", "flex", "eager"), default="sdpa", help="the chunk step's kernel")
    parser.add_argument("--cuda-graphs", action="store_true", help="replay the compiled step as a CUDA graph")
    parser.add_argument("--no-compile", action="store_true", help="run the chunk step uncompiled")
    parser.add_argument(
        "--compile-backend", default="inductor", help="torch.compile backend (the smoke test: aot_eager, no C++)"
    )
    parser.add_argument("--fit-tokens", type=int, default=16384, help="fit check: document length (0: skip)")
    parser.add_argument("--fit-configs", type=int, default=32, help="fit check: configs batched")
    parser.add_argument("--skip-eager", action="store_true", help="leave out the uncompiled rows")
    parser.add_argument("--hbm-gbps", type=float, default=None, help="memory bandwidth (default: by GPU name)")
    parser.add_argument("--tflops", type=float, default=None, help="dense TFLOP/s (default: by GPU name)")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    device = args.device
    if device == "cuda" and not torch.cuda.is_available():
        raise SystemExit("--device cuda: no CUDA device visible to torch")
    dtype = resolve_dtype(args.dtype, device)
    where = torch.cuda.get_device_name() if device == "cuda" else platform.processor() or platform.machine()
    peaks = next((v for k, v in GPU_PEAKS.items() if k in where), (None, None)) if device == "cuda" else (None, None)
    hbm_gbps = args.hbm_gbps or peaks[0]
    tflops = args.tflops or peaks[1]
    compile_ = not args.no_compile
    warmup = device == "cuda" or compile_

    if args.model == EMBEDDED_MODEL:
        model, label = load_model(EMBEDDED_MODEL, dtype, device), "SmolLM2-135M"
    else:
        model = build_llama(args.model, dtype, device)
        label = f"{args.model} (random weights, {sum(p.numel() for p in model.parameters()) / 1e9:.3f}B)"
    weight_bytes = sum(p.numel() * p.element_size() for p in model.parameters())
    ids = document_ids(args.model, args.tokens, device)
    sweep = sweep_configs(args.configs)
    baseline = [c for c in sweep if c.method == "baseline"] or build_configs(("baseline",), ())
    n = ids.shape[0]
    n_chunks = math.ceil(n / args.chunk)
    print(f"# {where}, {args.threads} threads, torch {torch.__version__}, {label} {SHORT_DTYPE[dtype]}, "
          f"{n} tokens, chunk {args.chunk}, window {args.window}, chunk step: attn {args.attn}"
          f"{', compiled' if compile_ else ', uncompiled'}{', CUDA graphs' if args.cuda_graphs else ''}",
          flush=True)  # fmt: skip

    step = Engine(
        model,
        EngineSettings(args.chunk, args.window, args.attn, compile=compile_, static=True, cuda_graphs=args.cuda_graphs),
        compile_backend=args.compile_backend,
    )
    eager = Engine(model, EngineSettings(args.chunk, args.window, "sdpa", static=False))
    rows: list[tuple[str, int, float, float]] = []

    def measure(name: str, configs: list, fn) -> float:
        seconds, first = timed(fn, device, warmup)
        rows.append((name, len(configs), seconds, first))
        print(f"  {name:<18} {len(configs):>3} configs: {seconds:8.3f} s (first run {first:.1f} s)", flush=True)
        return seconds

    naive_sweep = measure(
        "naive loop", sweep, lambda: [naive_config(model, ids, args.chunk, c.press.needs_attention) for c in sweep]
    )
    eager_sweep = (
        None if args.skip_eager else measure("kvorch uncompiled", sweep, lambda: eager.evaluate("d", ids, sweep))
    )
    step_sweep = measure("kvorch compiled", sweep, lambda: step.evaluate("d", ids, sweep))
    naive_one = measure("naive loop", baseline, lambda: naive_config(model, ids, args.chunk, False))
    eager_one = (
        None if args.skip_eager else measure("kvorch uncompiled", baseline, lambda: eager.evaluate("d", ids, baseline))
    )
    step_one = measure("kvorch compiled", baseline, lambda: step.evaluate("d", ids, baseline))

    print(f"{'mode':<18} {'configs':>7} {'seconds':>8} {'config*tok/s':>13} {'ms/chunk':>9} {'first run s':>11}")
    for mode, k, seconds, first in rows:
        print(
            f"{mode:<18} {k:>7} {seconds:>8.3f} {k * n / seconds:>13.1f} "
            f"{1e3 * seconds / n_chunks:>9.2f} {first:>11.1f}"
        )
    print(f"sweep of {len(sweep)}: compiled {naive_sweep / step_sweep:.2f}x faster than the naive loop"
          + (f" (uncompiled {naive_sweep / eager_sweep:.2f}x)" if eager_sweep else "")
          + f"; one config: compiled {naive_one / step_one:.2f}x"
          + (f" (uncompiled {naive_one / eager_one:.2f}x)" if eager_one else ""))  # fmt: skip
    print(f"compiled: sweep {step_sweep / step_one:.2f}x one config's time for {len(sweep)}x the configs")

    one_ms, sweep_ms = 1e3 * step_one / n_chunks, 1e3 * step_sweep / n_chunks
    if hbm_gbps:
        stream_ms = 1e3 * weight_bytes / (hbm_gbps * 1e9)
        print(f"weight-streaming bound {stream_ms:.3f} ms/chunk ({weight_bytes / 2**30:.2f} GiB at {hbm_gbps:g} GB/s): "
              f"one config at {stream_ms / one_ms:.1%} of it, sweep at {stream_ms / sweep_ms:.1%}")  # fmt: skip
    else:
        print("weight-streaming bound: n/a (pass --hbm-gbps)")
    if tflops:
        one_bound = 1e3 * flops_per_chunk(model, n, args.chunk, 1) / (tflops * 1e12)
        sweep_bound = 1e3 * flops_per_chunk(model, n, args.chunk, len(sweep)) / (tflops * 1e12)
        print(f"compute bound at {tflops:g} TFLOP/s: one config {one_bound:.3f} ms/chunk ({one_bound / one_ms:.1%} "
              f"of measured), sweep {sweep_bound:.3f} ms/chunk ({sweep_bound / sweep_ms:.1%})")  # fmt: skip
    else:
        print("compute bound: n/a (pass --tflops)")

    if args.fit_tokens:
        fit_ids = document_ids(args.model, args.fit_tokens, device)
        fit = sweep_configs(args.fit_configs)
        if device == "cuda":
            torch.cuda.reset_peak_memory_stats()
        seconds, first = timed(lambda: step.evaluate("fit", fit_ids, fit), device, warmup)
        peak = f", peak {torch.cuda.max_memory_allocated() / 2**30:.1f} GiB" if device == "cuda" else ""
        print(f"fit: {len(fit)} configs x {args.fit_tokens} tokens ran in {seconds:.2f} s "
              f"({len(fit) * args.fit_tokens / seconds:.0f} config*tok/s, first run {first:.1f} s{peak})")  # fmt: skip


if __name__ == "__main__":
    main()
