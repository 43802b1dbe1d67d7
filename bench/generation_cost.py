"""Question-answering cost on CPU (issue 35): N configs answering after one context, kvorch's
batched generate() next to N plain per-config ``model.generate()`` loops, in one process.

The claim timed: 10 configs answering after a 4k context with 32 generated tokens cost at most
0.3 of ten per-config generate() loops under ``--protocol once`` (the context is the same for
every config until it is compressed, so it is prefilled once) and at most 0.7 under ``chunked``.

Rows, side by side over one random-token prompt (context ``--tokens``, question ``--question``):
- plain generate(): one transformers ``model.generate()`` on context + question (batch 1, SDPA,
  DynamicCache, greedy), exactly ``--new`` tokens. The N per-config loops are N identical runs of
  this (without compression every config's loop is the same work), so their figure is its time x N.
- kvorch once / chunked: ``Engine.generate`` with every config at once under that protocol, also
  exactly ``--new`` tokens per config (no stop tokens). Its own Engine per protocol.
Each is the best of ``--repeat`` runs after an untimed ``--warmup``-token document (one-time
costs stay out; a threshold config's held cache is sized by what it held there, as by a corpus's
earlier documents). ``prefill s`` is the prompt's forward time (kvorch: the rows' forward seconds;
transformers: until the first token's logits), ``decode s`` the rest.

The model is a random-weight Llama with SmolLM2-135M's shape (no download), ``--layers`` to
shrink it, float32; a second copy from the same seed runs the plain loop (kvorch hooks its model).

    PYTHONPATH=. python bench/generation_cost.py                                  # the recorded run
    PYTHONPATH=. python bench/generation_cost.py --layers 2 --tokens 256 --new 4 --chunk 64 --warmup 128  # smoke
"""

from __future__ import annotations

import argparse
import os
import platform
import time

import pyarrow.compute as pc
import torch
from transformers import LlamaConfig, LlamaForCausalLM, LogitsProcessor, LogitsProcessorList

from orchestrator.sweep.spec import build_configs
from workers.contract.settings import PROTOCOLS, EngineSettings, GenerationSettings
from workers.engine.core import Engine

# SmolLM2-135M's shape (its config.json), with random weights.
SMOLLM2_135M = {
    "hidden_size": 576, "num_hidden_layers": 30, "num_attention_heads": 9, "num_key_value_heads": 3,
    "intermediate_size": 1536, "vocab_size": 49152, "max_position_embeddings": 8192, "tie_word_embeddings": True,
}  # fmt: skip


def build_model(layers: int) -> LlamaForCausalLM:
    """The same random weights every call (seed 0)."""
    torch.manual_seed(0)
    config = LlamaConfig(**{**SMOLLM2_135M, "num_hidden_layers": layers}, attn_implementation="sdpa")
    return LlamaForCausalLM(config).to(torch.float32).eval()


class FirstLogits(LogitsProcessor):
    """Notes when the first token's logits arrive: the end of transformers' prefill."""

    def __init__(self) -> None:
        self.at: float | None = None

    def __call__(self, input_ids: torch.Tensor, scores: torch.Tensor) -> torch.Tensor:
        if self.at is None:
            self.at = time.perf_counter()
        return scores


def plain_generate(model: LlamaForCausalLM, prompt: torch.Tensor, new: int) -> tuple[float, float]:
    """(seconds, prefill seconds) of one greedy generate() of exactly ``new`` tokens."""
    first = FirstLogits()
    tic = time.perf_counter()
    with torch.inference_mode():
        out = model.generate(
            prompt[None], attention_mask=torch.ones_like(prompt)[None], max_new_tokens=new, min_new_tokens=new,
            do_sample=False, eos_token_id=None, pad_token_id=0, logits_processor=LogitsProcessorList([first]),
        )  # fmt: skip
    seconds = time.perf_counter() - tic
    if out.shape[1] != len(prompt) + new:
        raise SystemExit(f"generate() made {out.shape[1] - len(prompt)} tokens, not {new}")
    return seconds, first.at - tic


def kvorch_generate(engine: Engine, configs, context, question, settings: GenerationSettings) -> tuple[float, float]:
    """(seconds, prefill seconds) of one Engine.generate with every config, exactly max_new_tokens each."""
    tic = time.perf_counter()
    rows, answers = engine.generate("d", context, question, configs, settings, stop_token_ids=[])
    seconds = time.perf_counter() - tic
    made = {len(a.token_ids) for a in answers}
    if made != {settings.max_new_tokens}:
        raise SystemExit(f"kvorch generated {sorted(made)} tokens per config, not {settings.max_new_tokens}")
    first_config = rows.filter(pc.equal(rows["config"], configs[0].label))  # one row per chunk
    return seconds, sum(first_config["forward_seconds"].to_pylist())


def best(fn, repeat: int) -> tuple[float, float]:
    return min((fn() for _ in range(repeat)), key=lambda timing: timing[0])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tokens", type=int, default=4096, help="context tokens")
    parser.add_argument("--question", type=int, default=16, help="question tokens")
    parser.add_argument("--new", type=int, default=32, help="generated tokens (exactly: no stop tokens)")
    parser.add_argument("--configs", type=int, default=None, help="the first N configs of --methods all (all 10)")
    parser.add_argument("--protocols", default=",".join(("once", "chunked")), help="kvorch's, side by side")
    parser.add_argument("--chunk", type=int, default=512)
    parser.add_argument("--window", type=int, default=128)
    parser.add_argument("--layers", type=int, default=SMOLLM2_135M["num_hidden_layers"])
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--repeat", type=int, default=1)
    parser.add_argument("--warmup", type=int, default=1024, help="tokens of the untimed first document")
    args = parser.parse_args()
    protocols = args.protocols.split(",")
    if unknown := [p for p in protocols if p not in PROTOCOLS]:
        raise SystemExit(f"--protocols: unknown {', '.join(unknown)}; use {', '.join(PROTOCOLS)}")
    if min(args.tokens, args.question, args.new, args.repeat, args.warmup, args.layers) < 1:
        raise SystemExit("--tokens, --question, --new, --repeat, --warmup and --layers must be >= 1")
    configs = build_configs(("all",), ())
    if args.configs is not None:
        if not 1 <= args.configs <= len(configs):
            raise SystemExit(f"--configs must be between 1 and {len(configs)}")
        configs = configs[: args.configs]
    torch.set_num_threads(args.threads)
    vocab = SMOLLM2_135M["vocab_size"]
    ids = torch.randint(
        0, vocab, (args.warmup + args.tokens + 2 * args.question,), generator=torch.Generator().manual_seed(0)
    )
    warm_context, ids = ids[: args.warmup], ids[args.warmup :]
    warm_question, ids = ids[: args.question], ids[args.question :]
    context, question = ids[: args.tokens], ids[args.tokens :]

    load_before = os.getloadavg()[0]
    plain_model = build_model(args.layers)
    engines = {p: Engine(build_model(args.layers), EngineSettings(chunk_size=args.chunk, window=args.window))
               for p in protocols}  # fmt: skip
    settings = {p: GenerationSettings(max_new_tokens=args.new, protocol=p) for p in protocols}
    plain_generate(plain_model, torch.cat([warm_context, warm_question]), args.new)  # the untimed warm-up
    for p, engine in engines.items():
        kvorch_generate(engine, configs, warm_context, warm_question, settings[p])

    n = len(configs)
    prompt = torch.cat([context, question])
    rows = [("plain generate()", 1, *best(lambda: plain_generate(plain_model, prompt, args.new), args.repeat))]
    for p, engine in engines.items():
        run = lambda p=p, engine=engine: kvorch_generate(engine, configs, context, question, settings[p])  # noqa: E731
        rows.append((f"kvorch {p}", n, *best(run, args.repeat)))

    shape, threads = SMOLLM2_135M, f"{args.threads} thread{'s' if args.threads != 1 else ''}"
    print(
        f"# {platform.processor() or platform.machine()}, torch {torch.__version__}, {threads}, "
        f"random SmolLM2-135M shape fp32 ({args.layers} layers, hidden {shape['hidden_size']}, "
        f"{shape['num_attention_heads']}/{shape['num_key_value_heads']} heads), context {args.tokens} + "
        f"question {args.question} tokens, {args.new} generated, chunk {args.chunk}, window {args.window}, "
        f"best of {args.repeat}"
    )
    print(
        f"# load average (1 min, this run's threads included): {load_before:.2f} before, "
        f"{os.getloadavg()[0]:.2f} after, on {os.cpu_count()} CPUs"
    )
    plain = rows[0][2]
    print(f"# {n} per-config generate() loops = {n} x plain generate() = {n * plain:.2f} s (identical work)")
    print(f"{'path':<18} {'configs':>7} {'seconds':>9} {'prefill s':>9} {'decode s':>9} {f'vs {n} loops':>11}")
    for name, count, seconds, prefill in rows:
        print(
            f"{name:<18} {count:>7} {seconds:>9.2f} {prefill:>9.2f} {seconds - prefill:>9.2f} "
            f"{seconds / (n * plain):>10.3f}x"
        )


if __name__ == "__main__":
    main()
