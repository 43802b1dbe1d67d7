"""What KVzip's context replay costs next to the prefill it precedes (issue 37, point 6).

A kvzip config of a question run under ``--protocol once`` first replays the context: one plain
forward of context + repeat prompt + context (workers/engine/replay.py), the probabilities of the
replay's queries formed in blocks. Timed here against the prompt's prefill under ``once`` (the
rows' forward seconds of ``Engine.generate`` for the baseline with one generated token), on the same
random-weight model with SmolLM2-135M's shape (bench/generation_cost.py's), at each context length.
Each figure is the best of ``--repeat`` after an untimed run. kvpress puts KVzip's overhead at 2-3x
the prefill (its docstring); the replay reads twice the context, plus the prompt.

    PYTHONPATH=. python bench/kvzip_replay.py                                    # the recorded run
    PYTHONPATH=. python bench/kvzip_replay.py --layers 2 --lengths 64,128        # smoke
"""

from __future__ import annotations

import argparse
import os
import platform
import time

import pyarrow.compute as pc
import torch

from bench.generation_cost import SMOLLM2_135M, build_model
from workers.contract.configs import EvalConfig
from workers.contract.settings import EngineSettings, GenerationSettings
from workers.engine import replay
from workers.engine.core import Engine
from workers.presses import parse_method

PROMPT_TOKENS = 14  # kvpress's instruction and SmolLM2's assistant turn, as repeat_prompt_ids gives them


def best(fn, repeat: int) -> float:
    fn()  # untimed
    return min(fn() for _ in range(repeat))


def timed_replay(engine: Engine, context: torch.Tensor, prompt: torch.Tensor) -> float:
    tic = time.perf_counter()
    replay.context_scores(engine.hooked, context, prompt)
    return time.perf_counter() - tic


def once_prefill(engine: Engine, context: torch.Tensor, question: torch.Tensor) -> float:
    """The prompt's forward seconds under --protocol once (the baseline: nothing evicted)."""
    settings = GenerationSettings(max_new_tokens=1, protocol="once")
    rows, _ = engine.generate("d", context, question, [EvalConfig(parse_method("baseline"))], settings, [])
    return sum(rows.filter(pc.equal(rows["config"], "baseline"))["forward_seconds"].to_pylist())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--lengths", default="1024,2048", help="context tokens, comma-separated")
    parser.add_argument("--question", type=int, default=16, help="question tokens")
    parser.add_argument("--layers", type=int, default=SMOLLM2_135M["num_hidden_layers"])
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--repeat", type=int, default=2)
    args = parser.parse_args()
    lengths = [int(x) for x in args.lengths.split(",")]
    if min([*lengths, args.question, args.layers, args.threads, args.repeat]) < 1:
        raise SystemExit("--lengths, --question, --layers, --threads and --repeat must be >= 1")
    torch.set_num_threads(args.threads)
    total = max(lengths) + args.question + PROMPT_TOKENS
    ids = torch.randint(0, SMOLLM2_135M["vocab_size"], (total,), generator=torch.Generator().manual_seed(0))
    prompt, question = ids[:PROMPT_TOKENS], ids[PROMPT_TOKENS : PROMPT_TOKENS + args.question]
    text = ids[PROMPT_TOKENS + args.question :]
    engine = Engine(build_model(args.layers), EngineSettings(chunk_size=512, window=128))
    load_before = os.getloadavg()[0]
    rows = []
    for n in lengths:
        context = text[:n]
        replay_s = best(lambda context=context: timed_replay(engine, context, prompt), args.repeat)
        prefill_s = best(lambda context=context: once_prefill(engine, context, question), args.repeat)
        rows.append((n, replay_s, prefill_s))
    shape = SMOLLM2_135M
    print(
        f"# {platform.processor() or platform.machine()}, torch {torch.__version__}, {args.threads} threads, "
        f"random SmolLM2-135M shape fp32 ({args.layers} layers, {shape['num_attention_heads']}/"
        f"{shape['num_key_value_heads']} heads), prompt {PROMPT_TOKENS} + question {args.question} tokens, "
        f"best of {args.repeat}"
    )
    print(f"# load average (1 min): {load_before:.2f} before, {os.getloadavg()[0]:.2f} after, on {os.cpu_count()} CPUs")
    print(f"{'context':>8} {'replay s':>9} {'once prefill s':>15} {'replay / prefill':>17}")
    for n, replay_s, prefill_s in rows:
        print(f"{n:>8} {replay_s:>9.2f} {prefill_s:>15.2f} {replay_s / prefill_s:>16.2f}x")


if __name__ == "__main__":
    main()
