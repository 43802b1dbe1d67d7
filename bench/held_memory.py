"""The held cache's memory against the issue's bound, per path: for a threshold config
(``knorm@-16``) and a ratio config whose heads' budgets move (``knorm`` ratio 0.5 under
``adakv``), run alone on two documents (the second the same text from a third of the way in), the
slots its pool holds over (layer, kv-head) against what it needed: the most keys its kv-heads held
before a chunk (kept, sinks and window included) plus a chunk each. The issue's bound is 1.25.

Read off the allocated tensors of ``Engine.last_run`` (a full band: every position). ``exact``
is the uncompiled path (a threshold pool grows from empty on every document); ``static`` the
compiled path's shapes, run uncompiled here (the same pools: a threshold config's first document
holds every position, later ones what it learned, one pool size for every layer).

    python bench/held_memory.py --lengths 4096,16384 --paths exact,static      # the recorded run
    python bench/held_memory.py --model tiny --lengths 256 --chunk 32 --window 32  # smoke size
"""

from __future__ import annotations

import argparse
import platform
import time

import torch
from sweep_throughput import LLAMA_SHAPES, build_llama, document_ids

from workers.contract.allocation import Allocation
from workers.contract.configs import EvalConfig
from workers.contract.models import EMBEDDED_MODEL, load_model
from workers.contract.settings import EngineSettings
from workers.engine.core import Engine
from workers.presses import parse_method


def held_over_need(engine: Engine, chunk: int) -> tuple[float, int | None]:
    """The last document's slots / (kept + chunk) of its one config, and its pool's page size."""
    step, _ = engine.last_run
    [band] = step.bands
    if band.full:
        slots = step.n_layers * step.n_kv_heads * step.n
    else:
        slots = sum(layer[0].positions.numel() for layer in step.state.cache)
    peaks, _ = step.held_back()
    need = sum(peaks[0]) + step.n_layers * step.n_kv_heads * chunk
    return slots / need, None if band.full else band.page


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--lengths", default="4096,16384", help="document lengths in tokens")
    parser.add_argument("--paths", default="exact,static", help="exact (uncompiled), static (compiled shapes)")
    parser.add_argument("--chunk", type=int, default=128)
    parser.add_argument("--window", type=int, default=128)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--model", choices=(EMBEDDED_MODEL, *LLAMA_SHAPES), default=EMBEDDED_MODEL)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    model = load_model(EMBEDDED_MODEL, "float32", "cpu") if args.model == EMBEDDED_MODEL else build_llama(
        args.model, "float32", "cpu"
    )  # fmt: skip
    knorm = parse_method("knorm")
    configs = [EvalConfig(knorm, -16.0), EvalConfig(knorm, ratio=0.5, allocation=Allocation("adakv"))]
    where = platform.processor() or platform.machine()
    print(f"# {where}, {args.threads} threads, torch {torch.__version__}, {args.model} fp32, chunk {args.chunk}, "
          f"window {args.window}; slots / (kept + chunk) over (layer, kv-head), bound 1.25")  # fmt: skip
    print(f"{'tokens':>7} {'path':>6} {'config':>22} {'doc 1':>7} {'doc 2':>7} {'page':>5} {'s':>6}")
    for n in (int(x) for x in args.lengths.split(",")):
        ids = document_ids(args.model, n, "cpu")
        documents = [ids, torch.roll(ids, n // 3)]
        for path in args.paths.split(","):
            for config in configs:
                settings = EngineSettings(args.chunk, args.window, "sdpa", static=path == "static", agreement=False)
                engine = Engine(model, settings)
                tic = time.perf_counter()
                ratios = []
                for i, document in enumerate(documents):
                    engine.evaluate(f"d{i}", document, [config])
                    ratio, page = held_over_need(engine, args.chunk)
                    ratios.append(ratio)
                seconds = time.perf_counter() - tic
                print(f"{n:>7} {path:>6} {config.label:>22} {ratios[0]:>7.3f} {ratios[1]:>7.3f} {page or '-':>5} "
                      f"{seconds:>6.0f}", flush=True)  # fmt: skip


if __name__ == "__main__":
    main()
