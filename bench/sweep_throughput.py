"""Configs x tokens per second of a method sweep: kvorch's batched engine vs a naive per-config loop.

The naive loop is what per-press harnesses do: one plain transformers chunked forward per config
(DynamicCache, batch 1), eager attention with ``output_attentions`` for presses that need
attention weights, and a per-layer pass over the cached keys for scoring. It does no eviction
work at all, so its time is a lower bound on a real naive harness: a ratio above 1 here is a
conservative speed-up.

    python bench/sweep_throughput.py [--tokens 1024] [--chunk 128] [--threads 2]
"""

from __future__ import annotations

import argparse
import platform
import time

import torch
import torch.nn.functional as F
from transformers import DynamicCache

from orchestrator.corpus import load_corpus
from orchestrator.spec import build_configs
from workers.engine import Engine, EngineSettings
from workers.models import EMBEDDED_MODEL, load_model, load_tokenizer, tokenize


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


def timed(fn) -> float:
    tic = time.perf_counter()
    fn()
    return time.perf_counter() - tic


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tokens", type=int, default=1024)
    parser.add_argument("--chunk", type=int, default=128)
    parser.add_argument("--window", type=int, default=128)
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)

    model = load_model(EMBEDDED_MODEL)
    ids = torch.tensor(tokenize(load_tokenizer(EMBEDDED_MODEL), load_corpus("pydoc")[0].text, args.tokens))
    sweep = build_configs(("all",), ())
    baseline = [c for c in sweep if c.method == "baseline"]

    naive_sweep = timed(lambda: [naive_config(model, ids, args.chunk, c.press.needs_attention) for c in sweep])
    naive_one = timed(lambda: naive_config(model, ids, args.chunk, False))
    engine = Engine(model, EngineSettings(args.chunk, args.window, "sdpa"))
    ours_sweep = timed(lambda: engine.evaluate("d", ids, list(sweep)))
    ours_one = timed(lambda: engine.evaluate("d", ids, list(baseline)))

    n = ids.shape[0]
    rows = [
        ("naive loop", len(sweep), naive_sweep),
        ("kvorch batched", len(sweep), ours_sweep),
        ("naive loop", 1, naive_one),
        ("kvorch", 1, ours_one),
    ]
    print(f"# {platform.processor() or platform.machine()}, {args.threads} threads, torch {torch.__version__}, "
          f"SmolLM2-135M fp32, {n} tokens, chunk {args.chunk}, window {args.window}")  # fmt: skip
    print(f"{'mode':<16} {'configs':>7} {'seconds':>8} {'config*tok/s':>13}")
    for mode, k, seconds in rows:
        print(f"{mode:<16} {k:>7} {seconds:>8.2f} {k * n / seconds:>13.1f}")
    print(f"sweep speed-up (kvorch / naive): {naive_sweep / ours_sweep:.2f}x; "
          f"single config: {naive_one / ours_one:.2f}x")  # fmt: skip


if __name__ == "__main__":
    main()
