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
  layer's work is one nested compile region, compiled once and reused by every layer alike, so
  compiling costs about one layer's work, not one per layer (workers/engine/compiling.py).
- **exact** (uncompiled; the CPU default): the cache holds the document's ``n`` positions, a
  chunk attends over ``[0, e)`` only, the last chunk is exact, and while no key can have been
  evicted (the first chunks, inside every press's protected window) the forward runs one row
  for every config. The same lines, over smaller tensors: eager PyTorch pays for every
  padded position, a compiled graph does not recompile for any.

Per-chunk results (NLL, top-1, agreement, answer span, kept keys) accumulate in device tensors
read back once per document.

The step's work, one file per job: this file drives a document's chunks (the step's lifecycle);
workers/engine/compiling.py compiles it; workers/engine/document_state.py holds what a chunk reads
and writes; workers/engine/layer_work.py is one layer's work in one chunk, and
workers/engine/scoring.py each press group's scores and decisions inside it.
"""

from __future__ import annotations

import dataclasses
import time
from collections.abc import Callable
from typing import Any

import torch

from workers.contract.configs import RANKED_POLICIES
from workers.contract.plan import AnswerSpan
from workers.contract.settings import EngineSettings, chunk_bounds
from workers.engine import cache, compiling, pool
from workers.engine.chunk_plan import ChunkBounds, GroupPlan, LayerFacts, Span, StepPlan
from workers.engine.chunk_results import ChunkResults, prediction_sums
from workers.engine.document_state import DocumentState, StateSizes
from workers.engine.hooks import HookedModel
from workers.engine.layer_work import layer_work
from workers.engine.layout import DocumentLayout, RowGroup
from workers.modeling.attention import AttentionVariant
from workers.presses import StateShape


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
        group_pools: list[cache.PoolBand | None] | None = None,
    ) -> None:
        """``compile_backend``: torch.compile's backend when ``compiled`` (inductor; tests count
        graphs with their own); ``worker`` names the actor in the compile notice; ``on_compile``
        hears (what, None) when compiling starts and (what, seconds) when it ends.
        ``group_pools``: each press group's pool (workers/engine/capacity.py), None for a group
        that holds every position (and for the full masked cache)."""
        self.hooked, self.layout, self.static, self.n = hooked, layout, static, n_positions
        self.worker, self.on_compile = worker, on_compile
        self._shape(hooked, settings, layout)
        self.bands = cache_bands(layout.groups, group_pools or [None] * len(layout.groups), n_positions)
        self.groups = [self._plan(group) for group in layout.groups]
        self.positions = torch.arange(self.n, device=self.device)
        # What each layer's work reads beyond its tensors (workers/engine/layer_work.py): the layer
        # index as a tensor, each distinct rotary once (layers of one type share one).
        self.layer_index = torch.arange(self.n_layers, device=self.device)
        self.rotaries = list(dict.fromkeys(hooked.layer_rotaries))
        self.rotary_ids = [self.rotaries.index(rotary) for rotary in hooked.layer_rotaries]
        self.plan = StepPlan(self.batch, self.n_kv_heads, self.bands, self.groups, self.backend, static, self.rotaries)
        self.needs_hidden_states = any(g.press.needs_hidden_states for g in layout.groups)
        self.traceable = all(g.press.traceable for g in layout.groups)
        # Until a chunk starts past every group's protected window nothing can have been evicted,
        # so every row computes the same thing: exact shapes run such chunks once, with batch 1.
        self.shared_until = min(lo for g in layout.groups for lo, _ in g.windows.ranges)
        # On CUDA the compiled step can replay as one CUDA graph: its state then lives at static
        # addresses, refilled in place per document.
        self.compiled = compiled
        self.cuda_graphs = compiled and settings.cuda_graphs and self.device.type == "cuda"
        self.static_step = self._static_step
        if compiled:
            self.static_step = compiling.compiled(self._static_step, compile_backend, self.cuda_graphs)
        self.regional = compiled and compiling.regional(self.backend)
        self.layer_region = compiling.layer_region(lambda inputs, facts: layer_work(self.plan, inputs, facts, {}))
        self.compiled_once = False
        self.key: tuple | None = None  # the engine's key of a static step
        # Built before a threshold config of it ever ran: replaced once what they hold is known.
        self.provisional = False
        # Seconds the first document waited for the compile (its warm-up chunk included); 0
        # uncompiled. Reported apart from the rows' forward seconds (TaskResult.compile_seconds).
        self.compile_seconds = 0.0
        # Exact shapes: the end of the last chunk after which the policy decided (ChunkBounds.deferred).
        self.decided_until = 0
        self.state: DocumentState | None = None
        self.press_states: list[Any] = []

    def _shape(self, hooked: HookedModel, settings: EngineSettings, layout: DocumentLayout) -> None:
        """The model's and the batch's sizes, the device and the kernel."""
        cfg = hooked.model.config
        self.chunk_size = settings.chunk_size
        self.batch = len(layout.configs)
        self.n_layers = layout.n_layers
        self.n_kv_heads = layout.n_kv_heads
        self.n_heads = cfg.num_attention_heads
        self.head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads
        self.device = hooked.device
        self.dtype = hooked.dtype
        self.backend = settings.attn

    def _plan(self, group: RowGroup) -> GroupPlan:
        press = group.press
        ranges = group.windows.ranges
        band = next(i for i, b in enumerate(self.bands) if b.rows.start <= group.rows.start < b.rows.stop)
        first = self.bands[band].rows.start
        return GroupPlan(
            group=group,
            rows=group.rows,
            n_sink=press.n_sink,
            rescores=press.rescores,
            ranked=group.policy in RANKED_POLICIES,
            widest=[hi for _, hi in ranges],
            narrowest=[lo for lo, _ in ranges],
            protected=group.windows.protected_on_device,
            attention_queries=min(press.attention_queries or self.chunk_size, self.chunk_size),
            band=band,
            local=slice(group.rows.start - first, group.rows.stop - first),
        )

    # --- per document ------------------------------------------------------------------------

    def reset(
        self, doc_seed: int, token_ids: torch.Tensor, answer: AnswerSpan | None = None, min_chunks: int = 0
    ) -> None:
        """Fresh document state. With static shapes the first document allocates it and later ones
        refill the same tensors in place, so a CUDA graph replays over the same addresses; with
        exact shapes every document allocates its own (its length is the cache's)."""
        modules = tuple(self.hooked.attention_modules.get(layer) for layer in range(self.n_layers))
        shape = StateShape(0, self.n_layers, self.n_heads, self.n_kv_heads, self.head_dim, self.n, self.device, modules)
        press_states = [
            plan.group.press.init_state(dataclasses.replace(shape, rows=plan.rows.stop - plan.rows.start))
            for plan in self.groups
        ]
        if self.state is None or not self.static:
            sizes = StateSizes(
                self.batch, self.n_layers, self.n_kv_heads, self.head_dim, self.n, self.chunk_size,
                self.dtype, self.device, self.layout.reference is not None, min_chunks,
            )  # fmt: skip
            self.state = DocumentState.allocate(self.bands, sizes, press_states)
            if self.cuda_graphs:
                for tensor in self.state.tensors():
                    torch._dynamo.mark_static_address(tensor)
        else:
            self.state.refill(press_states)
        self.state.load(doc_seed, token_ids, answer)
        self.press_states = self.state.press_states

    def run(
        self,
        doc_seed: int,
        token_ids: torch.Tensor,
        on_chunk: Callable[[int], None] | None = None,
        answer: AnswerSpan | None = None,
        spans: list[Span] | None = None,
    ) -> tuple[ChunkResults, list[float]]:
        """Run every chunk of one document: its results [chunks, B] on the CPU, and each chunk's
        seconds (on the CPU each chunk's own; on an asynchronous device the document's time split
        evenly, since timing a chunk alone would need a device sync per chunk). ``spans``: chunks
        of the host's own (exact shapes only; the generation protocols), else the chunk size's."""
        if self.compiled and not self.compiled_once:
            self._warm_up(doc_seed, token_ids, answer)
        if spans is None:
            spans = [Span(start, end) for start, end in chunk_bounds(int(token_ids.shape[0]), self.chunk_size)]
        elif self.static:
            raise ValueError("chunks of the host's own need exact shapes: a static step's chunks are its chunk size")
        self.reset(doc_seed, token_ids, answer, min_chunks=len(spans))
        seconds = []
        started = tic = time.perf_counter()
        self.decided_until = 0
        for index, (start, end, decide) in enumerate(spans):
            if self.static:
                self.static_step(self.state)
            else:  # after the last span, a question's answer is decoded a token at a time
                after = spans[index + 1].end - spans[index + 1].start if index + 1 < len(spans) else 1
                self._exact_step(index, start, end, decide, after)
                self.grow_pools()
            if decide:
                self.decided_until = end
            toc = time.perf_counter()
            seconds.append(toc - tic)
            tic = toc
            if on_chunk is not None:
                on_chunk(end - start)
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            seconds = [(time.perf_counter() - started) / len(spans)] * len(spans)
        return self.state.results.head(len(spans), answer is not None), seconds

    def _warm_up(self, doc_seed: int, token_ids: torch.Tensor, answer: AnswerSpan | None) -> None:
        """Compile on a warm-up chunk of this document (reset after it: its results are thrown
        away); a compile that fails leaves this batch on the same step, uncompiled."""
        self.compiled_once = True
        self.reset(doc_seed, token_ids, answer)
        what = f"the chunk step ({self.batch} configs x {self.n} positions, {self.n_layers} layers)"
        self.compile_seconds, compiled = compiling.warm_up(
            what, self.worker, self.on_compile, lambda: self.static_step(self.state), self.device
        )
        if not compiled:
            self.static_step, self.compiled, self.cuda_graphs = self._static_step, False, False

    def grow_pools(self) -> None:
        """Exact shapes, after a chunk: a pool whose threshold configs never ran before
        (``PoolBand.grows``) gets the pages its owners need to hold what they hold now plus the
        next write (where the chunk's compaction found too few, it laid out the kept keys alone:
        pool.compact), so it holds what its configs keep from their first document on, never drops
        a key, and never runs a document twice. One read of the pools' needs per chunk, and only
        for such a pool: once its configs ran, the engine sizes them from what they held."""
        growing = [b for b, band in enumerate(self.bands) if isinstance(band, cache.PoolBand) and band.grows]
        if not growing:
            return
        layers = self.state.cache
        needs = torch.stack(
            [pool.pages_needed(layer[b], self.bands[b].write) for b in growing for layer in layers]
        ).tolist()
        for i, b in enumerate(growing):
            band = self.bands[b]
            pages = list(band.pages)
            for layer, need in enumerate(needs[i * len(layers) : (i + 1) * len(layers)]):
                if need > pages[layer]:
                    layers[layer][b] = pool.grown(layers[layer][b], need, band.write)
                    pages[layer] = need
            self.bands[b] = dataclasses.replace(band, pages=tuple(pages))  # the plan's and state's list

    @property
    def kv_bytes(self) -> int:
        """Keys + values the cache holds, over all layers and bands: the bytes of the very tensors
        allocated (a pool's pages, not the document's positions)."""
        return sum(band.keys.nbytes + band.values.nbytes for layer in self.state.cache for band in layer)

    def held_back(self) -> tuple[list[list[int]], list[bool]]:
        """After a document: per row and layer the most keys the layer's kv-heads held together
        before a chunk, and per row whether its pool ran out of pages (the engine then runs the
        document again)."""
        return self.state.peak.T.tolist(), self.state.overflow.tolist()

    # --- the two ways to drive one chunk ---------------------------------------------------

    def _static_step(self, state: DocumentState) -> None:
        """What torch.compile traces: the chunk index is state, so bounds are computed here."""
        index = state.chunk_index
        start = index * self.chunk_size
        end = torch.minimum(start + self.chunk_size, state.length)
        query_positions = start + torch.arange(self.chunk_size, device=self.device)
        self._forward(ChunkBounds(index, start, end, query_positions, self.positions))
        index.add_(1)

    def _exact_step(self, index: int, start: int, end: int, decide: bool = True, next_write: int = 1) -> None:
        """Uncompiled: the host knows the bounds, so tensors are cut to them (and how many keys the
        next chunk writes: ``next_write``)."""
        as_tensor = dict(device=self.device, dtype=torch.int64)
        bounds = ChunkBounds(
            index=torch.tensor(index, **as_tensor),
            start=torch.tensor(start, **as_tensor),
            end=torch.tensor(end, **as_tensor),
            query_positions=self.positions[start:end],
            positions=self.positions[:end],
            shared=start <= self.shared_until,
            deferred=start - self.decided_until,
        )
        self._forward(bounds, decide, next_write)

    def _forward(self, bounds: ChunkBounds, decide: bool = True, next_write: int | None = None) -> None:
        """One chunk: the batched forward (every layer's work runs inside it, through kvorch's
        attention function), then its predictions scored into the results."""
        state, b = self.state, self.batch
        forward_rows = 1 if bounds.shared else b
        ids = state.tokens[bounds.query_positions]
        run = LayerRun(self, bounds, decide, next_write=next_write or self.chunk_size)
        logits = self.hooked.model(
            input_ids=ids[None].expand(forward_rows, -1),
            position_ids=bounds.query_positions[None],
            use_cache=False,
            kvorch_run=run,
        ).logits
        targets = state.tokens[bounds.query_positions + 1][None].expand(forward_rows, -1)
        has_target = bounds.query_positions + 1 < state.length
        in_answer = (bounds.query_positions >= state.answer_from) & (bounds.query_positions < state.answer_to)
        # A shared chunk is one row, the same for every config (so its own reference).
        reference = None if self.layout.reference is None else (0 if bounds.shared else self.layout.reference)
        sums = prediction_sums(logits.float(), targets, has_target, reference, in_answer)
        last = (bounds.end - bounds.start - 1).view(1)  # the chunk's last real position
        state.next_token.copy_(logits.index_select(1, last)[:, 0].argmax(dim=-1).expand(b))
        results = state.results
        for name, value in [*sums.items(), ("kept", run.kept)]:
            getattr(results, name).index_copy_(0, bounds.index[None], value.expand(b)[None])
        self.hooked.hidden_states.clear()


class LayerRun:
    """The attention run of one chunk (``kvorch_run`` of workers/modeling/attention.py): hands
    each layer's tensors to :func:`~workers.engine.layer_work.layer_work`, as one compiled region
    per distinct layer when the step compiles regionally, and sums the keys each config holds
    over the layers."""

    def __init__(
        self, step: ChunkStep, bounds: ChunkBounds, decide: bool = True, rank: bool = True, next_write: int = 1
    ) -> None:
        """``decide``: False scores but evicts nothing this chunk; ``rank``: False lets only the
        threshold groups decide (a decoding step between two re-applications of a keep limit);
        ``next_write``: the keys the next chunk writes per (row, kv-head), the room each pool
        segment is laid out with after this chunk."""
        self.next_write = next_write
        self.step = step
        self.decide = decide
        self.rank = rank
        self.state = step.state
        self.bounds = bounds
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
        step, bounds, state = self.step, self.bounds, self.state
        # Only tensors (and modules): a region's inputs. Their names are read in layer_work and
        # GroupScoring alone.
        inputs = {
            "query": query,
            "key": key,
            "value": value,
            "cache": state.cache[layer],
            "keep": state.keep[layer],
            "scores": state.scores[layer],
            "layer": step.layer_index[layer],
            "index": bounds.index,
            "start": bounds.start,
            "end": bounds.end,
            "query_positions": bounds.query_positions,
            "positions": bounds.positions,
            "doc_seed": state.doc_seed,
            "peak": state.peak[layer],
            "overflow": state.overflow,
            "hidden": step.hooked.hidden_states.get(layer) if step.needs_hidden_states else None,
            "module": None if step.traceable else step.hooked.attention_modules.get(layer),
            "protected": [plan.protected[layer] for plan in step.groups],
            "press_states": [None if states is None else states[layer] for states in step.press_states],
        }
        facts = LayerFacts(
            sliding_window=variant.sliding_window,
            softcap=variant.softcap,
            rotary_id=step.rotary_ids[layer],
            shared=bounds.shared,
            scaling=scaling,
            windows=tuple((plan.narrowest[layer], plan.widest[layer]) for plan in step.groups),
            decide=self.decide,
            deferred=bounds.deferred,
            rank=self.rank,
            next_write=self.next_write,
        )
        if step.compiled and step.regional:
            out, kept = step.layer_region(inputs, facts)
        else:
            out, kept = layer_work(step.plan, inputs, facts, self.chunk_memo)
        self.kept += kept
        return out


def cache_bands(
    groups: list[RowGroup], pools: list[cache.PoolBand | None], n_positions: int
) -> list[cache.Band | cache.PoolBand]:
    """The cache's bands: each held group its own pool; consecutive groups that hold every
    position share one full band (one forward's rows attend band by band, so a dense group never
    sets the shape of a sparse one)."""
    bands: list[cache.Band | cache.PoolBand] = []
    for group, group_pool in zip(groups, pools, strict=True):
        if group_pool is not None:
            bands.append(group_pool)
        elif bands and bands[-1].full:
            bands.append(cache.Band(slice(bands.pop().rows.start, group.rows.stop), n_positions))
        else:
            bands.append(cache.Band(group.rows, n_positions))
    return bands
