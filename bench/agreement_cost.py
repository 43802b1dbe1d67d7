"""What the agreement columns cost: ``Engine.evaluate`` with ``EngineSettings(agreement=False)``
next to ``agreement=True``, interleaved in one process, for two config sets.

With agreement on, each chunk's logits also go through the baseline row's softmax (its logsumexp
is already there for the NLL), a KL against every row and a top-5 over every row
(workers/engine/agreement.py): reductions over [rows, chunk, vocabulary], no extra forward when the batch
holds baseline, as ``all`` does. A batch without baseline gets it as a hidden extra batch row
(workers/engine/layout.py DocumentLayout), one more row in every forward after the shared chunks. This
bench measures both cases:

- ``all``: the default grid, baseline in the batch (only the reductions are extra);
- ``--hidden-methods`` (knorm,streaming_llm,h2o by default): no baseline, so the agreement run
  adds the hidden reference row (``batch off/on`` shows the rows per forward).

The two settings run on two engines built once up front, over two module copies that share every
weight tensor (as workers/actor.py ``_sharing_weights`` does for the preflight), so neither
engine's hooks fire in the other's forwards. After one untimed warm-up of each, every repeat
runs each document off then on (off, on, off, on, ...), so machine load drifts over both alike.
Reported per set: median seconds per document, token-configs per second (written configs: the
hidden row is not counted as work delivered), on/off as the ratio of the two medians, and the
smallest and largest of the paired per-(repeat, document) on/off ratios, which show the noise
(each pair's times also go to stderr as they are measured).

Where the end-to-end ratio is within that noise, ``sums s/doc`` resolves the reductions alone:
after the timed pairs, one more agreement run per document (not in the medians) with
``workers.engine.chunk_results.agreement_sums`` wrapped in a timer (synchronized on CUDA), the median
over documents of the seconds spent inside it; ``sums/on`` is its share of ``on s/doc``. It
excludes the hidden row's forward, so for a set without baseline it is a part of the extra cost,
not all of it.

The bench also asserts that agreement changes no number it shares with the off run: every
nll_sum, and every other common column but the timing, must be identical (batch size and cache
bytes grow by the hidden row).

    python bench/agreement_cost.py                                   # the recorded run (2 x 1024, CPU)
    python bench/agreement_cost.py --device cuda --docs 4 --tokens 4096   # not run yet (no GPU lent)
    python bench/agreement_cost.py --model tiny --docs 1 --tokens 64 --chunk 32 --window 32 --repeat 1
"""

from __future__ import annotations

import argparse
import copy
import dataclasses
import itertools
import platform
import statistics
import sys
import time

import pyarrow as pa
import torch
from sweep_throughput import build_llama

import workers.engine.chunk_results as chunk_results
from orchestrator.sweep.spec import build_configs
from workers.contract.models import EMBEDDED_MODEL, load_model
from workers.contract.settings import EngineSettings
from workers.engine.core import Engine

# Columns that depend on the wall clock, on the forward's rows (one more with a hidden reference
# row: checked apart), or exist only with agreement on.
TIMING_COLUMNS = ("forward_seconds",)
BATCH_COLUMNS = ("batch_size", "kv_cache_bytes")
AGREEMENT_COLUMNS = ("kl_sum", "top1_agree", "top5_overlap_sum")


def sharing_weights(model: torch.nn.Module) -> torch.nn.Module:
    """A copy of ``model``'s modules holding the very same parameter and buffer tensors (as
    workers/actor.py ``_sharing_weights``; copied here so the bench does not import Ray)."""
    memo = {id(t): t for t in itertools.chain(model.parameters(), model.buffers())}
    return copy.deepcopy(model, memo)


def documents(model_name: str, n_docs: int, n_tokens: int, device: str) -> list[torch.Tensor]:
    """``n_docs`` documents of exactly ``n_tokens`` ids: the first pydoc documents that long, cut
    there, for the embedded model; seeded random ids for ``tiny`` (random weights)."""
    if model_name != EMBEDDED_MODEL:
        gen = torch.Generator().manual_seed(0)
        return [torch.randint(0, 49152, (n_tokens,), generator=gen).to(device) for _ in range(n_docs)]
    from orchestrator.corpus import load_corpus
    from workers.contract import tokenization

    tokens = tokenization.load(EMBEDDED_MODEL, tokenization.DEFAULT_BOS)
    docs = []
    for doc in load_corpus("pydoc"):
        ids = tokens.ids(doc.text, n_tokens)
        if len(ids) >= n_tokens:
            docs.append(torch.tensor(ids[:n_tokens], device=device))
        if len(docs) == n_docs:
            return docs
    raise SystemExit(f"the pydoc corpus has only {len(docs)} documents of {n_tokens} tokens; ask for fewer")


class SumsTimer:
    """Adds up the seconds spent in ``agreement_sums`` while entered (it wraps the name that
    workers/engine/chunk_results.py calls, and restores it on exit)."""

    def __init__(self, cuda: bool) -> None:
        self.cuda = cuda
        self.seconds = 0.0
        self.original = chunk_results.agreement_sums

    def __call__(self, *args, **kwargs):
        if self.cuda:
            torch.cuda.synchronize()
        tic = time.perf_counter()
        out = self.original(*args, **kwargs)
        if self.cuda:
            torch.cuda.synchronize()
        self.seconds += time.perf_counter() - tic
        return out

    def __enter__(self) -> SumsTimer:
        chunk_results.agreement_sums = self
        return self

    def __exit__(self, *exc) -> None:
        chunk_results.agreement_sums = self.original


def same_numbers(off: pa.Table, on: pa.Table, hidden: int, where: str) -> None:
    """Agreement adds its columns and changes nothing else: timings aside, and the ``hidden``
    reference row (0 or 1) in the forward's batch size and cache bytes (a full row of its own: the
    held cache sizes every other config's pool as before)."""
    assert off.num_rows == on.num_rows, f"{where}: {off.num_rows} rows off, {on.num_rows} on"
    assert off.column("nll_sum").to_pylist() == on.column("nll_sum").to_pylist(), f"{where}: nll_sum differs"
    batch_off, batch_on = off.column("batch_size").to_pylist(), on.column("batch_size").to_pylist()
    assert [b + hidden for b in batch_off] == batch_on, f"{where}: batch sizes {batch_off[0]} off, {batch_on[0]} on"
    cache_off, cache_on = off.column("kv_cache_bytes").to_pylist(), on.column("kv_cache_bytes").to_pylist()
    for kv_off, kv_on in zip(cache_off, cache_on, strict=True):
        assert kv_on > kv_off if hidden else kv_on == kv_off, f"{where}: cache bytes {kv_off} off, {kv_on} on"
    for name in off.column_names:
        if name in TIMING_COLUMNS or name in BATCH_COLUMNS or name in AGREEMENT_COLUMNS:
            continue
        assert off.column(name).to_pylist() == on.column(name).to_pylist(), f"{where}: column {name} differs"
    for name in AGREEMENT_COLUMNS:
        if name in off.column_names:
            assert off.column(name).null_count == off.num_rows, f"{where}: {name} recorded with agreement off"
            assert on.column(name).null_count == 0, f"{where}: {name} missing with agreement on"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--docs", type=int, default=2, help="pydoc documents per repeat")
    parser.add_argument("--tokens", type=int, default=1024, help="tokens per document")
    parser.add_argument("--repeat", type=int, default=3, help="timed off/on pairs per document")
    parser.add_argument("--chunk", type=int, default=128)
    parser.add_argument("--window", type=int, default=128)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--device", choices=("cpu", "cuda"), default="cpu")
    parser.add_argument("--model", choices=(EMBEDDED_MODEL, "tiny"), default=EMBEDDED_MODEL,
                        help="tiny: a 2-layer random-weight Llama (the smoke test's)")  # fmt: skip
    parser.add_argument("--hidden-methods", default="knorm,streaming_llm,h2o",
                        help="the set without baseline, where agreement adds the hidden reference row")  # fmt: skip
    args = parser.parse_args()
    if args.device == "cuda" and not torch.cuda.is_available():
        raise SystemExit("--device cuda: no CUDA device here")
    if min(args.docs, args.tokens, args.repeat) < 1:
        raise SystemExit("--docs, --tokens and --repeat must be >= 1")
    torch.set_num_threads(args.threads)
    if args.model == EMBEDDED_MODEL:
        model = load_model(EMBEDDED_MODEL, "float32", args.device)
    else:
        model = build_llama(args.model, "float32", args.device)
    docs = documents(args.model, args.docs, args.tokens, args.device)
    sets = {
        "all": build_configs(("all",), ()),
        args.hidden_methods: build_configs((args.hidden_methods,), ()),
    }
    if any(c.is_baseline for c in sets[args.hidden_methods]):
        raise SystemExit(f"--hidden-methods {args.hidden_methods!r} includes baseline; it is the set without it")
    settings = EngineSettings(args.chunk, args.window, "sdpa", static=False)
    twin = sharing_weights(model)  # taken before an engine hooks the model, or the copy carries its hooks
    engines = {
        False: Engine(model, dataclasses.replace(settings, agreement=False)),
        True: Engine(twin, dataclasses.replace(settings, agreement=True)),
    }
    for engine in engines.values():  # one hidden-state hook per attention module: its own engine's
        assert all(len(m._forward_pre_hooks) == 1 for m in engine.hooked.attention_modules.values())
    assert all(p is q for p, q in zip(model.parameters(), twin.parameters(), strict=True))

    def timed(on: bool, i: int, configs: list) -> tuple[float, pa.Table]:
        if args.device == "cuda":
            torch.cuda.synchronize()
        tic = time.perf_counter()
        rows = engines[on].evaluate(f"doc{i}", docs[i], configs)
        if args.device == "cuda":
            torch.cuda.synchronize()
        return time.perf_counter() - tic, rows

    where = torch.cuda.get_device_name() if args.device == "cuda" else platform.processor() or platform.machine()
    print(f"# {where}, {args.threads} threads, torch {torch.__version__}, {args.model} fp32, uncompiled step "
          f"({settings.attn}), {args.docs} docs x {args.tokens} tokens, chunk {args.chunk}, window {args.window}, "
          f"{args.repeat} repeats (off, on interleaved) after 1 warm-up each", flush=True)  # fmt: skip
    results = []
    for name, configs in sets.items():
        for on in (False, True):  # warm-up: first-call costs (variant probe, allocator) stay out
            timed(on, 0, configs)
        batch = len(configs) + (0 if any(c.is_baseline for c in configs) else 1)
        seconds: dict[bool, list[float]] = {False: [], True: []}
        paired = []
        for r in range(args.repeat):
            for i in range(args.docs):
                off_s, off_rows = timed(False, i, configs)
                on_s, on_rows = timed(True, i, configs)
                same_numbers(off_rows, on_rows, batch - len(configs), f"{name} doc{i}")
                seconds[False].append(off_s)
                seconds[True].append(on_s)
                paired.append(on_s / off_s)
                pair = f"# {name} doc{i} repeat {r + 1}: off {off_s:.3f} s, on {on_s:.3f} s"
                print(pair, file=sys.stderr, flush=True)
        sums = []
        for i in range(args.docs):
            with SumsTimer(args.device == "cuda") as timer:
                timed(True, i, configs)
            sums.append(timer.seconds)
        results.append((name, len(configs), batch, seconds, paired, statistics.median(sums)))
    print(f"{'set':<26} {'configs':>7} {'batch off/on':>12} {'off s/doc':>9} {'on s/doc':>9} {'off cfg*tok/s':>13} "
          f"{'on cfg*tok/s':>12} {'on/off':>6} {'paired min':>10} {'paired max':>10} {'sums s/doc':>10} "
          f"{'sums/on':>7}")  # fmt: skip
    for name, n_configs, batch, seconds, paired, sums in results:
        off, on = statistics.median(seconds[False]), statistics.median(seconds[True])
        work = n_configs * args.tokens
        print(f"{name:<26} {n_configs:>7} {f'{n_configs}/{batch}':>12} {off:>9.3f} {on:>9.3f} {work / off:>13.1f} "
              f"{work / on:>12.1f} {on / off:>6.3f} {min(paired):>10.3f} {max(paired):>10.3f} {sums:>10.3f} "
              f"{sums / on:>7.3f}")  # fmt: skip
    print("nll_sum and every other shared column identical with agreement off and on: checked")


if __name__ == "__main__":
    main()
