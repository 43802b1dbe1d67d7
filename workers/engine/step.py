"""The chunk step: the one implementation of the evaluation protocol's per-chunk work.

For chunk [s, e) every layer of the batched forward (one batch row per config):
  1. writes the chunk's keys/values into each config's cache (workers/engine/cache.py: a held
     band keeps only what its configs keep, a full one every position),
  2. attends over the kept keys before s plus ordinary causal attention inside the chunk (the
     layer's own variant: sliding window, soft-cap), band by band,
  3. lets each press score keys (new ones, or every undecided one for rescoring presses),
  4. decides, once and for good, the keys that just left the protected window
     (workers/engine/decisions.py), and the held bands drop the keys just evicted.

Every chunk-dependent bound is a 0-d tensor and every rule a mask over the positions the step
attends over, so the same code runs two ways (:class:`Shapes`):

- **static** (what ``torch.compile`` traces, ``fullgraph=True``): the cache holds ``N``
  positions, the document length rounded up to a length bucket (settings.padded_length), every
  chunk has ``c`` query rows (the last one padded), the chunk index lives in the document state
  and advances inside the step. One graph serves every chunk of every document of a bucket; the
  host calls it once per chunk and reads results back once per document. Inside that graph each
  layer's work is one nested compile region (:class:`_StepRun`), compiled once and reused by
  every layer alike, so compiling costs about one layer's work, not one per layer.
- **exact** (uncompiled; the CPU default): the cache holds the document's ``n`` positions, a
  chunk attends over ``[0, e)`` only, the last chunk is exact, and while no key can have been
  evicted (the first chunks, inside every press's protected window) the forward runs one row
  for every config. The same lines, over smaller tensors: eager PyTorch pays for every
  padded position, a compiled graph does not recompile for any.

Per-chunk results (NLL, top-1, agreement, answer span, kept keys) accumulate in device tensors
read back once per document.
"""

from __future__ import annotations

import dataclasses
import functools
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch

from workers.contract.configs import RANKED_POLICIES
from workers.contract.errors import error_line
from workers.contract.plan import AnswerSpan
from workers.contract.settings import EngineSettings, chunk_bounds
from workers.engine import cache
from workers.engine.chunk_results import ChunkResults, prediction_sums
from workers.engine.decisions import decide_by_budget, decide_by_threshold, keep_limit, leaving_window
from workers.engine.hooks import HookedModel
from workers.engine.layout import DocumentLayout, RowGroup
from workers.modeling import attention
from workers.modeling.attention import AttentionVariant
from workers.presses import LayerContext, StateShape

# Compiled steps one process may hold (batches of configs x length buckets).
MAX_COMPILED_STEPS = 64
# Distinct compiled layers one step may hold: layers that differ in a fact (attention variant,
# rotary, a press's per-layer window) each need their own. Past it dynamo raises, and the step
# runs uncompiled with a notice (ChunkStep._compile).
MAX_LAYER_REGIONS = 64
# Compile each layer's work as a region reused by every layer (False: one unrolled graph, what the
# step compiled before; bench/compile_time.py and bench/sweep_throughput.py compare the two).
LAYER_REGIONS = True


@dataclass
class _GroupPlan:
    """What the step knows of one press group: Python values per layer (a compiled graph
    specializes on them once) and constant tensors."""

    group: RowGroup
    rows: slice
    n_sink: int
    rescores: bool
    ranked: bool  # ratio or budget policy: keys ranked by score against a keep limit
    widest: list[int]  # per layer: the widest protected window (clamped to N)
    narrowest: list[int]
    protected: torch.Tensor  # [layers, kv-heads, 1] int64 on the device
    attention_queries: int  # observing queries per chunk (needs_attention)
    band: int  # which band of the cache holds the group's rows (workers/engine/cache.py)
    local: slice  # the group's rows within that band


@dataclass
class _Chunk:
    """One chunk's bounds as the step's code sees them: tensors, plus the static shape facts."""

    index: torch.Tensor  # 0-d int64
    start: torch.Tensor  # 0-d int64
    end: torch.Tensor  # 0-d int64: one past the last real position
    query_positions: torch.Tensor  # [c] int64
    positions: torch.Tensor  # [T] int64: the key positions attended over (0..T-1)
    # One forward row for every config: no key can have been evicted yet (exact shapes only).
    shared: bool = False


class ChunkStep:
    """The step of one batch of configs at one cache length; with static shapes it is reused for
    every document of that length bucket (the engine keeps one per (configs, N))."""

    def __init__(
        self,
        hooked: HookedModel,
        settings: EngineSettings,
        layout: DocumentLayout,
        n_positions: int,
        static: bool,
        compiled: bool,
        worker: str,
        compile_backend: str,
        on_compile: Callable[[str, float | None], None] | None = None,
        group_slots: list[int] | None = None,
    ) -> None:
        """``compile_backend``: torch.compile's backend when ``compiled`` (inductor; tests count
        graphs with their own); ``worker`` names the actor in the compile notice; ``on_compile``
        hears (what, None) when compiling starts and (what, seconds) when it ends.
        ``group_slots``: each press group's slots per (layer, kv-head) (workers/engine/capacity.py);
        None, or the cache length, for the full masked cache."""
        self.hooked = hooked
        self.on_compile = on_compile
        self.worker = worker
        self.layout = layout
        self.static = static
        self.n = n_positions
        cfg = hooked.model.config
        self.chunk = settings.chunk_size
        self.batch = len(layout.configs)
        self.n_layers = layout.n_layers
        self.n_kv_heads = layout.n_kv_heads
        self.n_heads = cfg.num_attention_heads
        self.head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads
        self.device = hooked.device
        self.dtype = hooked.dtype
        self.backend = settings.attn
        self.bands = _bands(layout.groups, group_slots or [n_positions] * len(layout.groups), n_positions)
        self.groups = [self._plan(group) for group in layout.groups]
        self.positions = torch.arange(self.n, device=self.device)
        # What each layer's work reads beyond its tensors (see _StepRun): the layer index as a
        # tensor, each distinct rotary once (layers of one type share one), which inputs to hand in.
        self.layer_index = torch.arange(self.n_layers, device=self.device)
        self.rotaries = list(dict.fromkeys(hooked.layer_rotaries))
        self.rotary_ids = [self.rotaries.index(rotary) for rotary in hooked.layer_rotaries]
        self.needs_hidden_states = any(g.press.needs_hidden_states for g in layout.groups)
        self.traceable = all(g.press.traceable for g in layout.groups)
        # Until a chunk starts past every group's protected window nothing can have been evicted,
        # so every row computes the same thing: exact shapes run such chunks once, with batch 1.
        self.shared_until = min(lo for g in layout.groups for lo, _ in g.windows.ranges)
        # On CUDA the compiled step can replay as one CUDA graph ("reduce-overhead"): a chunk is one
        # launch. Its state then lives at static addresses, refilled in place per document.
        self.compiled = compiled
        self.cuda_graphs = compiled and settings.cuda_graphs and self.device.type == "cuda"
        step = self._static_step
        if compiled:
            # Every (batch of configs, length bucket) is one more graph of the same code object;
            # dynamo's default limit of 8 would silently run the rest uncompiled.
            torch._dynamo.config.recompile_limit = max(torch._dynamo.config.recompile_limit, MAX_COMPILED_STEPS)
            mode = "reduce-overhead" if self.cuda_graphs else None
            step = torch.compile(step, backend=compile_backend, fullgraph=True, dynamic=False, mode=mode)
        self.static_step = step
        # FlexAttention inside a nested compile region fails torch 2.13's functionalization (an
        # internal assert): with --attn flex the step compiles unrolled, one graph of every layer.
        self.regional = compiled and LAYER_REGIONS and self.backend != "flex"
        self.layer_region = torch.compiler.nested_compile_region(
            lambda inputs, facts: layer_work(self, inputs, facts, {}), max_reuse_entries=MAX_LAYER_REGIONS
        )
        self.compiled_once = False
        self.key: tuple | None = None  # the engine's key of a static step
        # Seconds the first document waited for the compile (its warm-up chunk included); 0
        # uncompiled. Reported apart from the rows' forward seconds (TaskResult.compile_seconds).
        self.compile_seconds = 0.0
        self.state: dict[str, Any] = {}
        self.press_states: list[Any] = []

    def _plan(self, group: RowGroup) -> _GroupPlan:
        press = group.press
        ranges = group.windows.ranges
        band = next(i for i, b in enumerate(self.bands) if b.rows.start <= group.rows.start < b.rows.stop)
        first = self.bands[band].rows.start
        return _GroupPlan(
            group=group,
            rows=group.rows,
            n_sink=press.n_sink,
            rescores=press.rescores,
            ranked=group.policy in RANKED_POLICIES,
            widest=[hi for _, hi in ranges],
            narrowest=[lo for lo, _ in ranges],
            protected=group.windows.protected_on_device,
            attention_queries=min(press.attention_queries or self.chunk, self.chunk),
            band=band,
            local=slice(group.rows.start - first, group.rows.stop - first),
        )

    # --- per document ------------------------------------------------------------------------

    def reset(self, doc_seed: int, token_ids: torch.Tensor, answer: AnswerSpan | None = None) -> None:
        """Fresh document state. With static shapes the first document allocates it and later ones
        refill the same tensors in place, so a CUDA graph replays over the same addresses; with
        exact shapes every document allocates its own (its length is the cache's)."""
        n_doc = int(token_ids.shape[0])
        shape = StateShape(0, self.n_layers, self.n_heads, self.n_kv_heads, self.head_dim, self.n, self.device)
        press_states = [
            plan.group.press.init_state(dataclasses.replace(shape, rows=plan.rows.stop - plan.rows.start))
            for plan in self.groups
        ]
        if not self.state or not self.static:
            self.state = self._allocate(press_states)
            if self.cuda_graphs:
                for tensor in _tensors(self.state):
                    torch._dynamo.mark_static_address(tensor)
        else:
            for layer in self.state["cache"]:
                for band in layer:
                    cache.clear(band)
            for tensor in self.state["scores"]:
                tensor.zero_()
            for tensor in self.state["keep"]:
                tensor.fill_(True)
            for name in ("tokens", "chunk", "peak", "overflow"):
                self.state[name].zero_()
            for tensor in self.state["results"].fields().values():
                tensor.zero_()
            _refill(self.state["press_states"], press_states)
        self.state["tokens"][:n_doc] = token_ids
        self.state["length"].fill_(n_doc)
        self.state["doc_seed"].fill_(doc_seed)
        # The positions whose predictions are answer tokens: none for a document that is no probe.
        self.state["answer_from"].fill_(answer.predicted_from if answer else 0)
        self.state["answer_to"].fill_(answer.predicted_from + answer.tokens if answer else 0)
        self.press_states = self.state["press_states"]

    def _allocate(self, press_states: list[Any]) -> dict[str, Any]:
        b, hkv, n, d = self.batch, self.n_kv_heads, self.n, self.head_dim
        kw = dict(device=self.device)
        return {
            "cache": [
                [cache.allocate(band, hkv, d, self.dtype, self.device) for band in self.bands]
                for _ in range(self.n_layers)
            ],
            "keep": [torch.ones(b, hkv, n, dtype=torch.bool, **kw) for _ in range(self.n_layers)],
            "scores": [torch.zeros(b, hkv, n, **kw) for _ in range(self.n_layers)],
            "tokens": torch.zeros(n + 1, dtype=torch.int64, **kw),
            "length": torch.zeros((), dtype=torch.int64, **kw),
            "doc_seed": torch.zeros((), dtype=torch.int64, **kw),
            "chunk": torch.zeros((), dtype=torch.int64, **kw),
            "answer_from": torch.zeros((), dtype=torch.int64, **kw),
            "answer_to": torch.zeros((), dtype=torch.int64, **kw),
            # Per row: the most keys one (layer, kv-head) held before a chunk (what its band
            # needs room for, learned by the engine), and whether a band ran out of slots.
            "peak": torch.zeros(b, dtype=torch.int64, **kw),
            "overflow": torch.zeros(b, dtype=torch.bool, **kw),
            # Answer sums always, so probes and corpus documents share one graph.
            "results": ChunkResults.zeros(-(-n // self.chunk), b, self.device, self.layout.reference is not None, True),
            "press_states": press_states,
        }

    def run(
        self,
        doc_seed: int,
        token_ids: torch.Tensor,
        on_chunk: Callable[[int], None] | None = None,
        answer: AnswerSpan | None = None,
    ) -> tuple[ChunkResults, list[float]]:
        """Run every chunk of one document: its results [chunks, B] on the CPU, and each chunk's
        seconds (on the CPU each chunk's own; on an asynchronous device the document's time split
        evenly, since timing a chunk alone would need a device sync per chunk)."""
        if self.compiled and not self.compiled_once:
            self._compile(doc_seed, token_ids, answer)
        self.reset(doc_seed, token_ids, answer)
        n_doc = int(token_ids.shape[0])
        bounds = chunk_bounds(n_doc, self.chunk)
        seconds = []
        started = tic = time.perf_counter()
        for k, (s, e) in enumerate(bounds):
            if self.static:
                self.static_step(self.state)
            else:
                self._exact_step(k, s, e)
            toc = time.perf_counter()
            seconds.append(toc - tic)
            tic = toc
            if on_chunk is not None:
                on_chunk(e - s)
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            seconds = [(time.perf_counter() - started) / len(bounds)] * len(bounds)
        return self.state["results"].head(len(bounds), answer is not None), seconds

    def _compile(self, doc_seed: int, token_ids: torch.Tensor, answer: AnswerSpan | None) -> None:
        """Compile before the document runs, on a warm-up chunk whose results are thrown away (the
        document is reset after it), so the compile is timed apart from every chunk's forward.

        The whole unrolled step compiles at once: seconds on a GPU, minutes cold on a CPU. Both
        ends are said where they are waited on (the actor's log, the Ray dashboard), or the first
        chunk looks like a hang. A compile that fails leaves this batch on the same step run
        uncompiled, with one notice naming the cause: never worse than not compiling.
        """
        what = f"the chunk step ({self.batch} configs x {self.n} positions, {self.n_layers} layers)"
        print(f"kvorch: {self.worker}: compiling {what}; the first chunk waits for it", file=sys.stderr, flush=True)
        if self.on_compile is not None:
            self.on_compile(what, None)
        self.compiled_once = True
        self.reset(doc_seed, token_ids, answer)
        tic = time.perf_counter()
        try:
            self.static_step(self.state)
            if self.device.type == "cuda":
                torch.cuda.synchronize(self.device)
        except Exception as exc:  # noqa: BLE001 - any compiler failure: the step still runs
            self.static_step, self.compiled, self.cuda_graphs = self._static_step, False, False
            # torch wraps a compiler's error ("backend='inductor' raised:"); name the compiler's own.
            cause = getattr(exc, "inner_exception", None) or exc
            print(
                f"kvorch: {self.worker}: compiling {what} failed ({error_line(cause)[:300]}); "
                "this batch runs the same step uncompiled",
                file=sys.stderr,
                flush=True,
            )
        self.compile_seconds = time.perf_counter() - tic
        if self.on_compile is not None:
            self.on_compile(what, self.compile_seconds)
        if self.compiled:
            took = f"{self.compile_seconds:.1f} s"
            print(f"kvorch: {self.worker}: compiled {what} in {took}", file=sys.stderr, flush=True)

    @property
    def kv_bytes(self) -> int:
        """Keys + values the cache holds, over all layers and bands: the bytes of the very tensors
        allocated (a held band's slots, not the document's positions)."""
        return sum(band.keys.nbytes + band.values.nbytes for layer in self.state["cache"] for band in layer)

    def held_back(self) -> tuple[list[int], list[bool]]:
        """Per row, after a document: the most keys a (layer, kv-head) held before a chunk, and
        whether its band ran out of slots (the engine then runs the document again)."""
        return self.state["peak"].tolist(), self.state["overflow"].tolist()

    # --- the two ways to drive one chunk ---------------------------------------------------

    def _static_step(self, state: dict[str, Any]) -> None:
        """What torch.compile traces: the chunk index is state, so bounds are computed here."""
        chunk = state["chunk"]
        start = chunk * self.chunk
        end = torch.minimum(start + self.chunk, state["length"])
        query_positions = start + torch.arange(self.chunk, device=self.device)
        self._chunk(_Chunk(chunk, start, end, query_positions, self.positions))
        chunk.add_(1)

    def _exact_step(self, k: int, s: int, e: int) -> None:
        """Uncompiled: the host knows the bounds, so tensors are cut to them."""
        as_tensor = dict(device=self.device, dtype=torch.int64)
        bounds = _Chunk(
            index=torch.tensor(k, **as_tensor),
            start=torch.tensor(s, **as_tensor),
            end=torch.tensor(e, **as_tensor),
            query_positions=self.positions[s:e],
            positions=self.positions[:e],
            shared=s <= self.shared_until,
        )
        self._chunk(bounds)

    def _chunk(self, chunk: _Chunk) -> None:
        state, b = self.state, self.batch
        forward_rows = 1 if chunk.shared else b
        ids = state["tokens"][chunk.query_positions]
        run = _StepRun(self, chunk)
        logits = self.hooked.model(
            input_ids=ids[None].expand(forward_rows, -1),
            position_ids=chunk.query_positions[None],
            use_cache=False,
            kvorch_run=run,
        ).logits
        targets = state["tokens"][chunk.query_positions + 1][None].expand(forward_rows, -1)
        has_target = chunk.query_positions + 1 < state["length"]
        in_answer = (chunk.query_positions >= state["answer_from"]) & (chunk.query_positions < state["answer_to"])
        # A shared chunk is one row, the same for every config (so its own reference).
        reference = None if self.layout.reference is None else (0 if chunk.shared else self.layout.reference)
        sums = prediction_sums(logits.float(), targets, has_target, reference, in_answer)
        results = state["results"]
        for name, value in [*sums.items(), ("kept", run.kept)]:
            getattr(results, name).index_copy_(0, chunk.index[None], value.expand(b)[None])
        self.hooked.hidden_states.clear()


def _bands(groups: list[RowGroup], slots: list[int], n_positions: int) -> list[cache.Band]:
    """The cache's bands: consecutive press groups of equal slots share one (one forward's rows
    attend band by band, so a dense group never sets the shape of a sparse one)."""
    bands: list[cache.Band] = []
    for group, n_slots in zip(groups, slots, strict=True):
        n_slots = min(n_slots, n_positions)
        if bands and bands[-1].slots == n_slots:
            last = bands.pop()
            bands.append(cache.Band(slice(last.rows.start, group.rows.stop), n_slots, last.full))
        else:
            bands.append(cache.Band(group.rows, n_slots, n_slots >= n_positions))
    return bands


def _tensors(tree: Any) -> list[torch.Tensor]:
    """Every tensor in a state tree (dicts, lists, dataclasses of tensors; modules are skipped)."""
    if isinstance(tree, torch.Tensor):
        return [tree]
    if isinstance(tree, dict):
        return [t for value in tree.values() for t in _tensors(value)]
    if isinstance(tree, (list, tuple)):
        return [t for value in tree for t in _tensors(value)]
    if dataclasses.is_dataclass(tree) and not isinstance(tree, type):
        return [t for f in dataclasses.fields(tree) for t in _tensors(getattr(tree, f.name))]
    return []


def _refill(old: Any, new: Any) -> None:
    """Copy a fresh state tree into an existing one of the same structure and shapes."""
    for target, source in zip(_tensors(old), _tensors(new), strict=True):
        target.copy_(source)


class _StepRun:
    """The attention run of one chunk (``kvorch_run`` of workers/modeling/attention.py): hands each layer's
    tensors to :func:`layer_work`, the chunk's work at one layer.

    Compiled, ``layer_work`` is a nested compile region (``torch.compiler.nested_compile_region``):
    traced and compiled once, then stamped out for every layer whose Python facts are equal, so
    compiling costs one layer's work, not one per layer. Everything that differs between layers
    is either a tensor handed in (the layer's cache, keep mask, scores, press state, index) or a
    constant among the facts (the attention variant, the rotary, each group's windows): a layer
    that differs in a fact gets its own region, never a wrong one."""

    def __init__(self, step: ChunkStep, chunk: _Chunk) -> None:
        self.step = step
        self.state = step.state
        self.chunk = chunk
        self.kept = torch.zeros(step.batch, dtype=torch.int64, device=step.device)
        # Uncompiled, results that depend only on the chunk are shared by every layer; a compiled
        # region keeps its own (a shared dict would be Python state the region cannot reuse).
        self.chunk_memo: dict = {}

    def attend(
        self,
        layer: int,
        query: torch.Tensor,
        key: torch.Tensor,
        value: torch.Tensor,
        scaling: float,
        variant: AttentionVariant,
    ) -> torch.Tensor:
        """Returns [rows, c, H, D], rows = 1 for a shared chunk (broadcast to every config's cache
        and press), else the batch."""
        step, chunk, state = self.step, self.chunk, self.state
        inputs = {
            "query": query,
            "key": key,
            "value": value,
            "cache": state["cache"][layer],
            "keep": state["keep"][layer],
            "scores": state["scores"][layer],
            "layer": step.layer_index[layer],
            "index": chunk.index,
            "start": chunk.start,
            "end": chunk.end,
            "query_positions": chunk.query_positions,
            "positions": chunk.positions,
            "doc_seed": state["doc_seed"],
            "peak": state["peak"],
            "overflow": state["overflow"],
            "hidden": step.hooked.hidden_states.get(layer) if step.needs_hidden_states else None,
            "module": None if step.traceable else step.hooked.attention_modules.get(layer),
            "protected": [plan.protected[layer] for plan in step.groups],
            "press_states": [None if states is None else states[layer] for states in step.press_states],
        }
        windows = tuple((plan.narrowest[layer], plan.widest[layer]) for plan in step.groups)
        facts = (variant.sliding_window, variant.softcap, step.rotary_ids[layer], chunk.shared, scaling, windows)
        if step.compiled and step.regional:
            out, kept = step.layer_region(inputs, facts)
        else:
            out, kept = layer_work(step, inputs, facts, self.chunk_memo)
        self.kept += kept
        return out


def layer_work(step: ChunkStep, inputs: dict[str, Any], facts: tuple, memo: dict) -> tuple[torch.Tensor, torch.Tensor]:
    """One layer's work in one chunk: write the chunk's keys into every band of the cache, attend
    over what each band holds, let every press group score and decide, then let the held bands
    drop what was evicted. Returns (attention output [rows, c, H, D], keys held per config [B]).

    ``inputs`` holds only tensors (and modules), ``facts`` only constants (see :class:`_StepRun`);
    the cache, keep mask, scores and press states are written in place. ``memo``: results that
    depend only on the chunk, keyed by constants."""
    sliding_window, softcap, rotary_id, shared, scaling, windows = facts
    variant = AttentionVariant(sliding_window, softcap)
    bounds = (inputs[name] for name in ("index", "start", "end", "query_positions", "positions"))
    chunk = _Chunk(*bounds, shared=shared)
    query, key, value = inputs["query"], inputs["key"], inputs["value"]
    b, span = step.batch, chunk.positions.shape[0]
    s, positions = chunk.start, chunk.positions
    bands = inputs["cache"]
    for band, band_cache in zip(step.bands, bands, strict=True):
        rows = band.rows if not shared else slice(0, 1)
        size = (band.size, -1, -1, -1)
        overflow = cache.write(band_cache, key[rows].expand(size), value[rows].expand(size), chunk.query_positions)
        if overflow is not None:  # a held band
            flags = inputs["overflow"][band.rows]
            flags.logical_or_(overflow)
    keep = inputs["keep"][:, :, :span]
    before = keep & (positions < s)
    per_head = before.sum(dim=-1)  # [B, Hkv]: what each (row, kv-head) holds before the chunk
    inputs["peak"].copy_(torch.maximum(inputs["peak"], per_head.amax(dim=-1)))
    if variant.sliding_window:  # such a layer holds, uncompressed, only what its window sees
        kept = (before & (positions >= s - variant.sliding_window + 1)).sum(dim=(1, 2))
    else:
        kept = per_head.sum(dim=-1)
    pattern_key = ("pattern", sliding_window)
    if pattern_key not in memo:  # shared by every layer of this variant in the chunk
        memo[pattern_key] = attention.band(chunk.query_positions, positions, variant)  # [c, T]
    pattern = memo[pattern_key]
    views: list[_BandView] = []
    if step.backend == "flex" and step.static:  # one full band (the masked cache: ChunkStep)
        full = bands[0]
        out = attention.flex_grouped_attention(
            query, full.keys[:, :, :span], full.values[:, :, :span], keep, chunk.index, scaling, variant
        )
        views.append(_BandView(full, None, None))
    else:  # flex at exact shapes runs sdpa's math (FlexAttention pays only compiled)
        outs = []
        # A shared chunk is one forward row: band 0's first row holds what every row holds.
        for band, band_cache in zip(step.bands[:1] if shared else step.bands, bands, strict=False):
            rows = slice(0, 1) if shared else band.rows
            held = cache.first_row(band_cache) if shared else band_cache
            seen = cache.visible(held, keep[rows], pattern, chunk.query_positions, span, variant)
            out, probs = cache.attend(held, query[rows], seen, scaling, step.backend, variant)
            outs.append(out)
            views.append(_BandView(held, probs, seen))
        out = outs[0] if len(outs) == 1 else torch.cat(outs)
    if chunk.shared:
        query = query.expand(b, -1, -1, -1)
        key, value = key.expand(b, -1, -1, -1), value.expand(b, -1, -1, -1)
    scores = inputs["scores"][:, :, :span]
    tensors = _Layer(query, key, value, keep, scores, views, pattern, scaling, variant)
    work = _LayerWork(step, chunk, memo, tensors, inputs, step.rotaries[rotary_id], rotary_id)
    for i, plan in enumerate(step.groups):
        work.score_and_decide(plan, inputs["press_states"][i], inputs["protected"][i], *windows[i])
    for band, band_cache in zip(step.bands, bands, strict=True):
        cache.compact(band_cache, keep[band.rows], span)
    return out.transpose(1, 2), kept


@dataclass
class _BandView:
    """What one band's attention produced this chunk: the cache it read (for a shared chunk, the
    first row of band 0, which holds what every row holds), the probabilities over its slots
    when the eager math ran, and which slots each query saw (None under FlexAttention)."""

    cache: cache.BandCache
    probs: torch.Tensor | None  # [R, H, c, S]
    seen: torch.Tensor | None  # [R, Hkv, c, S]


@dataclass
class _Layer:
    """What one layer's attention hands every press group in this chunk."""

    query: torch.Tensor  # [B, H, c, D]
    new_keys: torch.Tensor  # [B, Hkv, c, D]
    new_values: torch.Tensor
    keep: torch.Tensor  # [B, Hkv, T] bool, a view of the layer's keep-mask (written in place)
    scores: torch.Tensor  # [B, Hkv, T] float32, a view of the layer's scores (written in place)
    views: list[_BandView]  # per band (one for a shared chunk)
    pattern: torch.Tensor  # [c, T] causal (and sliding-window) band
    scaling: float
    variant: AttentionVariant


@dataclass
class _LayerWork:
    """Each press group's scoring and keep decisions at one layer in one chunk."""

    step: ChunkStep
    chunk: _Chunk
    memo: dict
    t: _Layer
    inputs: dict[str, Any]
    rotary: Any  # the layer's LayerRotary
    rotary_id: int

    def _observers(self, q: int) -> tuple[torch.Tensor, torch.Tensor]:
        """([q] query rows, [q] which are real): the chunk's last q real queries (rows of a padded
        last chunk that are not real point at row 0 and are zeroed). Once per chunk and q."""
        key = ("observers", q)
        if key not in self.memo:
            chunk = self.chunk
            index = (chunk.end - chunk.start) - q + torch.arange(q, device=chunk.start.device)
            self.memo[key] = (index.clamp(min=0), index >= 0)
        return self.memo[key]

    def _band_rows(self, tensor: torch.Tensor, plan: _GroupPlan) -> torch.Tensor:
        """The group's rows of a band view's tensor (a shared chunk's one row, broadcast)."""
        if self.chunk.shared:
            return tensor[:1].expand(plan.rows.stop - plan.rows.start, *tensor.shape[1:])
        return tensor[plan.local]

    def _attention(self, plan: _GroupPlan) -> tuple[torch.Tensor, torch.Tensor]:
        """([R, H, q, T] probabilities of the press's q observing queries over positions, [q] which
        are real): the last q real queries of the chunk; rows that are not real are zero."""
        t = self.t
        q = min(plan.attention_queries, self.chunk.query_positions.shape[0])  # exact shapes: no pad rows
        index, real = self._observers(q)
        view = t.views[0 if self.chunk.shared else plan.band]
        if view.probs is not None:
            chosen = self._band_rows(view.probs, plan).index_select(2, index)
        else:
            if view.seen is not None:
                seen = self._band_rows(view.seen, plan).index_select(2, index)
            else:  # flex computed no mask
                seen = t.keep[plan.rows, :, None, :] & t.pattern.index_select(0, index)
            n = seen.shape[-1]
            keys = self._band_rows(view.cache.keys, plan)[:, :, :n]
            chosen = attention.attention_probabilities(
                t.query[plan.rows].index_select(2, index), keys, seen, t.scaling, t.variant
            )
        held = None if view.cache.positions is None else self._band_rows(view.cache.positions, plan)
        chosen = cache.to_positions(held, chosen, t.keep.shape[-1])
        if self.step.static:  # only a padded last chunk has observer rows that are not real
            chosen = chosen * real[:, None].to(chosen.dtype)
        return chosen, real

    def _leaving(self, narrowest: int, widest: int, protected: torch.Tensor) -> torch.Tensor:
        """Keys leaving the group's protected window in this chunk: [T] for a window shared by every
        kv-head (once per chunk and window), [kv-heads, T] for per-head windows (``protected``)."""
        chunk = self.chunk
        if narrowest != widest:
            return leaving_window(chunk.positions, chunk.start, chunk.end, protected)
        key = ("leaving", narrowest)
        if key not in self.memo:
            self.memo[key] = leaving_window(chunk.positions, chunk.start, chunk.end, narrowest)
        return self.memo[key]

    def _sinks(self, n_sink: int) -> torch.Tensor:
        """[T] the document's first ``n_sink`` positions, always kept (once per chunk)."""
        key = ("sinks", n_sink)
        if key not in self.memo:
            self.memo[key] = self.chunk.positions < n_sink
        return self.memo[key]

    def _chunk_rope(self) -> tuple[torch.Tensor, torch.Tensor]:
        """(cos, sin) of the chunk's query positions under the layer's rotary (once per chunk)."""
        key = ("rope", self.rotary_id)
        if key not in self.memo:
            self.memo[key] = self.rotary(self.chunk.query_positions)
        return self.memo[key]

    def score_and_decide(
        self, plan: _GroupPlan, press_state: Any, protected: torch.Tensor, narrowest: int, widest: int
    ) -> None:
        step, chunk, rows, t = self.step, self.chunk, plan.rows, self.t
        s, e, positions = chunk.start, chunk.end, chunk.positions
        span = positions.shape[0]
        press = plan.group.press
        if not plan.rescores:
            score_from, scored = s, chunk.query_positions
        elif plan.ranked:  # every kept key stays a candidate under a keep limit, so all are rescored
            score_from, scored = torch.zeros_like(s), positions
        else:  # keys older than the widest window were decided after earlier chunks, in every head
            score_from = (s - widest).clamp(min=0)
            n_scored = min(span, widest + chunk.query_positions.shape[0])
            scored = (score_from + torch.arange(n_scored, device=s.device)).clamp(max=span - 1)
        attention_probs = attention_rows = None
        if press.needs_attention:
            attention_probs, attention_rows = self._attention(plan)
        prerope = None
        if press.needs_prerope_queries:
            prerope = self.rotary.unrotate(t.query[rows], *self._chunk_rope())
        held = cache.select_rows(self.inputs["cache"][plan.band], plan.local)  # the group's own keys
        hidden = self.inputs["hidden"]
        if hidden is not None and chunk.shared:
            hidden = hidden.expand(step.batch, -1, -1)
        ctx = LayerContext(
            layer=self.inputs["layer"],
            start=s,
            end=e,
            score_from=score_from,
            positions=positions,
            query_positions=chunk.query_positions,
            keys_at=functools.partial(cache.keys_at, held, held.keys),
            values_at=functools.partial(cache.keys_at, held, held.values),
            kv_heads=step.n_kv_heads,
            new_keys=t.new_keys[rows],
            new_values=t.new_values[rows],
            queries=t.query[rows],
            doc_seed=self.inputs["doc_seed"],
            scored=scored,
            attention=attention_probs,
            attention_rows=attention_rows,
            prerope_queries=prerope,
            hidden_states=hidden[rows] if press.needs_hidden_states else None,
            rotary=self.rotary,
            module=None if press.traceable else self.inputs["module"],
            chunk_memo=self.memo,
        )
        # Positions in ``scored`` are distinct and start at score_from; those at or past ``end``
        # (future keys, a padded chunk's rows) get scores that are rewritten before any rule reads them.
        scores, keep = t.scores[rows], t.keep[rows]
        scores.index_copy_(2, scored, press.score(ctx, press_state).float())
        group = plan.group
        if plan.ranked:
            limit = keep_limit(group.keep_fraction, group.budgets, e)
            decide_by_budget(keep, scores, positions, e, narrowest, limit, plan.n_sink)
        else:
            leaving = self._leaving(narrowest, widest, protected)
            decide_by_threshold(keep, scores, leaving, group.thresholds, self._sinks(plan.n_sink))
