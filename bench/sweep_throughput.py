"""Configs x tokens per second of a method sweep: kvorch's batched engine vs a naive per-config loop.

The naive loop is what per-press harnesses do: one plain transformers chunked forward per config
(DynamicCache, batch 1), eager attention with ``output_attentions`` for presses that need
attention weights, and a per-layer pass over the cached keys for scoring. It does no eviction
work at all, so its time is a lower bound on a real naive harness: a ratio above 1 here is a
conservative speed-up.

    python bench/sweep_throughput.py [--tokens 1024] [--chunk 128] [--threads 2]
    python bench/sweep_throughput.py --device cuda --model llama-1b --configs 16 [--compile]

``--model llama-1b`` / ``llama-3b`` are Llama-3.2-shaped models with random weights (no download;
SmolLM2's 49152-token vocabulary so the same token ids fit): a forward's cost depends on the
shapes, but how many keys thresholded presses evict (so cache sizes) depends on the weights and
will differ from a trained model. On CUDA (or with ``--compile``) every path runs once untimed first, so CUDA
start-up and compilation stay out of the figures. The weight-streaming bound is the time to read
every parameter once from memory at ``--hbm-gbps``: a forward of a small chunk cannot be faster.
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

from orchestrator.corpus import load_corpus
from orchestrator.spec import build_configs
from workers import tokenization
from workers.engine import Engine, EngineSettings
from workers.models import DTYPES, EMBEDDED_MODEL, load_model, resolve_dtype

# Llama-3.2-1B / -3B shapes (tied embeddings) with SmolLM2's vocabulary: 1.07B / 2.97B parameters.
LLAMA_SHAPES = {
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
H100_SXM_GBPS = 3350.0
SHORT_DTYPE = {"float32": "fp32", "bfloat16": "bf16", "float16": "fp16"}


def build_llama(name: str, dtype: str, device: str) -> torch.nn.Module:
    """A random-weight Llama, created directly on ``device`` in ``dtype`` (no fp32 CPU detour)."""
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(
        vocab_size=49152, num_key_value_heads=8, max_position_embeddings=131072, tie_word_embeddings=True,
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
    """One config the naive way; returns the summed NLL (so the work cannot be skipped)."""
    model.set_attn_implementation("eager" if needs_attention else "sdpa")
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


def timed(fn, device: str, warmup: bool = False) -> float:
    if warmup:
        fn()
    if device == "cuda":
        torch.cuda.synchronize()
    tic = time.perf_counter()
    fn()
    if device == "cuda":
        torch.cuda.synchronize()
    return time.perf_counter() - tic


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
    parser.add_argument("--compile", action="store_true", help="torch.compile kvorch's forward (EngineSettings)")
    parser.add_argument("--hbm-gbps", type=float, default=None, help="memory bandwidth (default: H100 SXM on cuda)")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    device = args.device
    if device == "cuda" and not torch.cuda.is_available():
        raise SystemExit("--device cuda: no CUDA device visible to torch")
    dtype = resolve_dtype(args.dtype, device)
    hbm_gbps = args.hbm_gbps if args.hbm_gbps is not None else (H100_SXM_GBPS if device == "cuda" else None)
    warmup = device == "cuda" or args.compile

    if args.model == EMBEDDED_MODEL:
        model, label = load_model(EMBEDDED_MODEL, dtype, device), "SmolLM2-135M"
    else:
        model = build_llama(args.model, dtype, device)
        label = f"{args.model} (random weights, {sum(p.numel() for p in model.parameters()) / 1e9:.2f}B)"
    weight_bytes = sum(p.numel() * p.element_size() for p in model.parameters())
    tokens = tokenization.load(EMBEDDED_MODEL, tokenization.DEFAULT_BOS)
    ids = torch.tensor(tokens.ids(load_corpus("pydoc")[0].text, args.tokens))
    ids = ids.to(device)
    sweep = sweep_configs(args.configs)
    baseline = [c for c in sweep if c.method == "baseline"]

    naive_sweep = timed(
        lambda: [naive_config(model, ids, args.chunk, c.press.needs_attention) for c in sweep], device, warmup
    )
    naive_one = timed(lambda: naive_config(model, ids, args.chunk, False), device, warmup)
    engine = Engine(model, EngineSettings(args.chunk, args.window, "sdpa", compile=args.compile))
    ours_sweep = timed(lambda: engine.evaluate("d", ids, list(sweep)), device, warmup)
    ours_one = timed(lambda: engine.evaluate("d", ids, list(baseline)), device, warmup)

    n = ids.shape[0]
    rows = [
        ("naive loop", len(sweep), naive_sweep),
        ("kvorch batched", len(sweep), ours_sweep),
        ("naive loop", 1, naive_one),
        ("kvorch", 1, ours_one),
    ]
    where = torch.cuda.get_device_name() if device == "cuda" else platform.processor() or platform.machine()
    extras = (", compile" if args.compile else "") + (", warm-up run" if warmup else "")
    print(f"# {where}, {args.threads} threads, torch {torch.__version__}, "
          f"{label} {SHORT_DTYPE[dtype]}, {n} tokens, chunk {args.chunk}, window {args.window}{extras}")  # fmt: skip
    print(f"{'mode':<16} {'configs':>7} {'seconds':>8} {'config*tok/s':>13}")
    for mode, k, seconds in rows:
        print(f"{mode:<16} {k:>7} {seconds:>8.2f} {k * n / seconds:>13.1f}")
    print(f"sweep speed-up (kvorch / naive): {naive_sweep / ours_sweep:.2f}x; "
          f"single config: {naive_one / ours_one:.2f}x")  # fmt: skip
    per_chunk = ours_one / math.ceil(n / args.chunk)
    if hbm_gbps is None:
        bound_text = "n/a (pass --hbm-gbps)"
    else:
        bound = weight_bytes / (hbm_gbps * 1e9)
        bound_text = f"{bound * 1e3:.3f} ms at {hbm_gbps:g} GB/s = {bound / per_chunk:.1%} of measured"
    print(f"weights {weight_bytes / 2**20:.1f} MiB; kvorch single-config forward {per_chunk * 1e3:.1f} ms/chunk; "
          f"weight-streaming bound {bound_text}")  # fmt: skip


if __name__ == "__main__":
    main()
