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

import torch

from workers.contract.errors import error_line

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


def warm_up(
    what: str,
    worker: str,
    on_compile: Callable[[str, float | None], None] | None,
    first_step: Callable[[], None],
    device: torch.device,
) -> tuple[float, bool]:
    """Compile ``what`` by running ``first_step`` once, on a warm-up chunk whose results the step
    throws away, so the compile is timed apart from every chunk's forward. Returns (seconds,
    whether it compiled).

    Seconds on a GPU, minutes cold on a CPU: both ends are said where they are waited on (the
    actor's log, the Ray dashboard; ``on_compile`` hears (what, None) and (what, seconds)), or
    the first chunk looks like a hang. A compile that fails is said in one notice naming the
    cause; the step then runs the same code uncompiled.
    """
    print(f"kvorch: {worker}: compiling {what}; the first chunk waits for it", file=sys.stderr, flush=True)
    if on_compile is not None:
        on_compile(what, None)
    tic = time.perf_counter()
    compiled = True
    try:
        first_step()
        if device.type == "cuda":
            torch.cuda.synchronize(device)
    except Exception as exc:  # noqa: BLE001 - any compiler failure: the step still runs
        compiled = False
        # torch wraps a compiler's error ("backend='inductor' raised:"); name the compiler's own.
        cause = getattr(exc, "inner_exception", None) or exc
        print(
            f"kvorch: {worker}: compiling {what} failed ({error_line(cause)[:300]}); "
            "this batch runs the same step uncompiled",
            file=sys.stderr,
            flush=True,
        )
    seconds = time.perf_counter() - tic
    if on_compile is not None:
        on_compile(what, seconds)
    if compiled:
        print(f"kvorch: {worker}: compiled {what} in {seconds:.1f} s", file=sys.stderr, flush=True)
    return seconds, compiled
