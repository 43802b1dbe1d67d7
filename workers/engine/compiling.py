"""Compiling the chunk step: how it is handed to ``torch.compile``, and the warm-up that compiles
it before a document runs.

The step compiles as one graph per (batch of configs, length bucket), ``fullgraph=True`` and
static shapes; inside it, each layer's work is one nested compile region reused by every layer
alike (workers/engine/layer_work.py), so compiling costs about one layer's work. The compile is
timed apart from every chunk's forward, said where it is waited on, and never worse than not
compiling: a compiler failure leaves the batch on the same step, uncompiled, with one notice.
"""

from __future__ import annotations

import sys
import time
from collections.abc import Callable
from typing import TYPE_CHECKING

import torch

from workers.contract.errors import error_line
from workers.contract.plan import AnswerSpan

if TYPE_CHECKING:
    from workers.engine.step import ChunkStep

# Compiled steps one process may hold (batches of configs x length buckets).
MAX_COMPILED_STEPS = 64
# Distinct compiled layers one step may hold: layers that differ in a fact (attention variant,
# rotary, a press's per-layer window) each need their own. Past it dynamo raises, and the step
# runs uncompiled with a notice (warm_up).
MAX_LAYER_REGIONS = 64
# Compile each layer's work as a region reused by every layer (False: one unrolled graph, what the
# step compiled before; bench/compile_time.py and bench/sweep_throughput.py compare the two).
LAYER_REGIONS = True


def compiled(step_fn: Callable, backend: str, cuda_graphs: bool) -> Callable:
    """``step_fn`` under torch.compile: one graph per (configs, bucket), never a silent fallback.
    On CUDA it can replay as one CUDA graph ("reduce-overhead"): a chunk is one launch."""
    # Every (batch of configs, length bucket) is one more graph of the same code object;
    # dynamo's default limit of 8 would silently run the rest uncompiled.
    torch._dynamo.config.recompile_limit = max(torch._dynamo.config.recompile_limit, MAX_COMPILED_STEPS)
    mode = "reduce-overhead" if cuda_graphs else None
    return torch.compile(step_fn, backend=backend, fullgraph=True, dynamic=False, mode=mode)


def layer_region(work: Callable) -> Callable:
    """``work`` (one layer's work) as a nested compile region: compiled once per distinct facts."""
    return torch.compiler.nested_compile_region(work, max_reuse_entries=MAX_LAYER_REGIONS)


def regional(backend: str) -> bool:
    """Whether the step compiles layer by layer. FlexAttention inside a nested compile region fails
    torch 2.13's functionalization (an internal assert): with --attn flex the step compiles
    unrolled, one graph of every layer."""
    return LAYER_REGIONS and backend != "flex"


def warm_up(step: ChunkStep, doc_seed: int, token_ids: torch.Tensor, answer: AnswerSpan | None) -> None:
    """Compile before the document runs, on a warm-up chunk whose results are thrown away (the
    step resets the document after it), so the compile is timed apart from every chunk's forward.

    Seconds on a GPU, minutes cold on a CPU: both ends are said where they are waited on (the
    actor's log, the Ray dashboard), or the first chunk looks like a hang. A compile that fails
    leaves this batch on the same step run uncompiled, with one notice naming the cause.
    """
    what = f"the chunk step ({step.batch} configs x {step.n} positions, {step.n_layers} layers)"
    print(f"kvorch: {step.worker}: compiling {what}; the first chunk waits for it", file=sys.stderr, flush=True)
    if step.on_compile is not None:
        step.on_compile(what, None)
    step.compiled_once = True
    step.reset(doc_seed, token_ids, answer)
    tic = time.perf_counter()
    try:
        step.static_step(step.state)
        if step.device.type == "cuda":
            torch.cuda.synchronize(step.device)
    except Exception as exc:  # noqa: BLE001 - any compiler failure: the step still runs
        step.run_uncompiled()
        # torch wraps a compiler's error ("backend='inductor' raised:"); name the compiler's own.
        cause = getattr(exc, "inner_exception", None) or exc
        print(
            f"kvorch: {step.worker}: compiling {what} failed ({error_line(cause)[:300]}); "
            "this batch runs the same step uncompiled",
            file=sys.stderr,
            flush=True,
        )
    step.compile_seconds = time.perf_counter() - tic
    if step.on_compile is not None:
        step.on_compile(what, step.compile_seconds)
    if step.compiled:
        print(f"kvorch: {step.worker}: compiled {what} in {step.compile_seconds:.1f} s", file=sys.stderr, flush=True)
