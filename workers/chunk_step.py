"""The chunk step as one graph: every layer's forward, attention over the masked cache, every
press's scoring and every config's keep decisions, traced whole by ``torch.compile(fullgraph=True)``.

The eager engine (workers/engine.py, ``_DocumentRun``) slices by Python chunk bounds, which a
compiler would specialize into a new graph per chunk, so it had to run attention and presses
outside the compiled forward: one graph break per layer, every press as per-layer Python. Here
nothing chunk-dependent is a Python value:

- the chunk index is a 0-d tensor in the document state, advanced inside the step, so a chunk's
  bounds, positions and token ids are tensors and the host only calls the step once per chunk;
- shapes are static: the cache holds ``N`` positions (the document length rounded up to a
  length bucket, :func:`padded_length`), the last chunk is padded to the chunk size, and every
  slice of the eager engine is a mask over those fixed shapes;
- presses score through :meth:`Press.score_chunk`, branch-free tensor code over the positions
  the step names (``ChunkTensors.scored``).

So one compiled graph serves every chunk of every document of a bucket, and per-chunk results
(NLL, top-1, agreement, answer span, kept keys) accumulate in device tensors read back once per document.
The numbers are the eager engine's (tests/test_chunk_step.py): the same keys kept, NLL within
float rounding. ``--compact`` and presses without a tensor form (the kvpress adapter) stay on
the eager engine.
"""

from __future__ import annotations

import dataclasses
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import torch

from workers import attention
from workers.attention import AttentionVariant
from workers.chunk_results import ChunkResults, prediction_sums
from workers.configs import RANKED_POLICIES
from workers.decisions import keep_limit
from workers.nll import AnswerSpan
from workers.presses import ChunkTensors, StateShape

if TYPE_CHECKING:
    from workers.engine import DocumentLayout, Engine, _RowGroup


# Compiled steps one process may hold (batches of configs x length buckets).
MAX_COMPILED_STEPS = 64


def padded_length(n: int, chunk: int) -> int:
    """The cache length a document of ``n`` tokens runs at: whole chunks, rounded up to a power of
    two of chunks, so documents of similar length share one compiled graph (a few buckets per
    corpus, not one per length) at the cost of attending over at most twice the padding."""
    chunks = -(-n // chunk)
    return chunk * (1 << max(0, chunks - 1).bit_length())


@dataclass
class _GroupPlan:
    """What the traced step knows of one press group: static Python values per layer (so the graph
    specializes on them once) and constant tensors."""

    group: _RowGroup
    state: Any
    rows: slice
    n_sink: int
    rescores: bool
    ranked: bool  # ratio or budget policy: keys ranked by score against a keep limit
    widest: list[int]  # per layer: the widest protected window (clamped to N)
    narrowest: list[int]
    protected: torch.Tensor  # [layers, kv-heads, 1] int64 on the device
    n_scored: list[int]  # per layer: how many positions the press returns scores for
    attention_queries: int  # observing queries per chunk (needs_attention)


class ChunkStep:
    """The compiled step of one batch of configs at one cache length ``N``; reused for every
    document of that length bucket (the engine keeps one per (configs, N))."""

    def __init__(self, engine: Engine, layout: DocumentLayout, n_positions: int, variants: list[AttentionVariant]):
        self.engine = engine
        self.layout = layout
        self.variants = variants
        self.n = n_positions
        model = engine.model
        cfg = model.config
        self.chunk = engine.settings.chunk_size
        self.batch = len(layout.configs)
        self.n_layers = layout.n_layers
        self.n_kv_heads = layout.n_kv_heads
        self.n_heads = cfg.num_attention_heads
        self.head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads
        self.device = engine.device
        self.dtype = next(model.parameters()).dtype
        self.backend = engine.settings.attn
        self.groups = [self._plan(group) for group in layout.groups]
        # On CUDA the compiled step can replay as one CUDA graph ("reduce-overhead"): a chunk is one
        # launch. Its state then lives at static addresses, refilled in place per document.
        self.cuda_graphs = engine.settings.compile and engine.settings.cuda_graphs and self.device.type == "cuda"
        step = self._step
        if engine.settings.compile:
            # Every (batch of configs, length bucket) is one more graph of the same code object;
            # dynamo's default limit of 8 would silently run the rest uncompiled.
            torch._dynamo.config.recompile_limit = max(torch._dynamo.config.recompile_limit, MAX_COMPILED_STEPS)
            mode = "reduce-overhead" if self.cuda_graphs else None
            step = torch.compile(step, backend=engine.compile_backend, fullgraph=True, dynamic=False, mode=mode)
        self.compiled = step
        self.compiled_once = False
        self.state: dict[str, Any] = {}

    def _plan(self, group: _RowGroup) -> _GroupPlan:
        press, c = group.press, self.chunk
        ranges = group.windows.ranges
        widest = [hi for _, hi in ranges]
        if not press.rescores:
            n_scored = [c] * self.n_layers
        elif group.policy in RANKED_POLICIES:
            n_scored = [self.n] * self.n_layers
        else:
            n_scored = [min(self.n, hi + c) for hi in widest]
        return _GroupPlan(
            group=group,
            state=None,  # per document, in reset()
            rows=group.rows,
            n_sink=press.n_sink,
            rescores=press.rescores,
            ranked=group.policy in RANKED_POLICIES,
            widest=widest,
            narrowest=[lo for lo, _ in ranges],
            protected=group.windows.protected_on_device,
            n_scored=n_scored,
            attention_queries=min(press.attention_queries or c, c),
        )

    # --- per document ------------------------------------------------------------------------

    def reset(self, doc_seed: int, token_ids: torch.Tensor, answer: AnswerSpan | None = None) -> None:
        """Fresh document state in the step's fixed shapes. The first document allocates it; later
        ones refill the same tensors in place, so a CUDA graph replays over the same addresses and
        nothing is reallocated per document."""
        n_doc = int(token_ids.shape[0])
        shape = StateShape(0, self.n_layers, self.n_heads, self.n_kv_heads, self.head_dim, self.n, self.device)
        press_states = [
            plan.group.press.init_chunk_state(dataclasses.replace(shape, rows=plan.rows.stop - plan.rows.start))
            for plan in self.groups
        ]
        if not self.state:
            self.state = self._allocate(press_states)
            if self.cuda_graphs:
                for tensor in _tensors(self.state):
                    torch._dynamo.mark_static_address(tensor)
        else:
            for name in ("keys", "values", "scores"):
                for tensor in self.state[name]:
                    tensor.zero_()
            for tensor in self.state["keep"]:
                tensor.fill_(True)
            for name in ("tokens", "chunk"):
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
        for plan, state in zip(self.groups, self.state["press_states"], strict=True):
            plan.state = state

    def _allocate(self, press_states: list[Any]) -> dict[str, Any]:
        b, hkv, n, d = self.batch, self.n_kv_heads, self.n, self.head_dim
        kw = dict(device=self.device)
        return {
            "keys": [torch.zeros(b, hkv, n, d, dtype=self.dtype, **kw) for _ in range(self.n_layers)],
            "values": [torch.zeros(b, hkv, n, d, dtype=self.dtype, **kw) for _ in range(self.n_layers)],
            "keep": [torch.ones(b, hkv, n, dtype=torch.bool, **kw) for _ in range(self.n_layers)],
            "scores": [torch.zeros(b, hkv, n, **kw) for _ in range(self.n_layers)],
            "tokens": torch.zeros(n + 1, dtype=torch.int64, **kw),
            "length": torch.zeros((), dtype=torch.int64, **kw),
            "doc_seed": torch.zeros((), dtype=torch.int64, **kw),
            "chunk": torch.zeros((), dtype=torch.int64, **kw),
            "answer_from": torch.zeros((), dtype=torch.int64, **kw),
            "answer_to": torch.zeros((), dtype=torch.int64, **kw),
            # Answer sums always, so probes and corpus documents share one graph.
            "results": ChunkResults.zeros(n // self.chunk, b, self.device, self.layout.reference is not None, True),
            "press_states": press_states,
        }

    def run(
        self,
        doc_seed: int,
        token_ids: torch.Tensor,
        on_chunk: Callable[[], None] | None = None,
        answer: AnswerSpan | None = None,
    ) -> tuple[ChunkResults, list[float]]:
        """Run every chunk of one document: its results [chunks, B] on the CPU, and each chunk's
        seconds (the document's time split evenly: timing a chunk alone would need a device sync
        per chunk)."""
        self.reset(doc_seed, token_ids, answer)
        n_chunks = -(-int(token_ids.shape[0]) // self.chunk)
        if self.engine.settings.compile and not self.compiled_once:
            # The first call compiles the whole unrolled step: seconds on a GPU, minutes on a
            # CPU (11 min cold for 10 configs x 16 layers on 2 cores). Say so where it is waited on
            # (the actor's log, the Ray dashboard), or the first chunk looks like a hang.
            print(
                f"kvorch: {self.engine.worker}: compiling the chunk step ({self.batch} configs x {self.n} "
                f"positions, {self.n_layers} layers); the first chunk waits for it",
                file=sys.stderr,
                flush=True,
            )
            self.compiled_once = True
        tic = time.perf_counter()
        for _ in range(n_chunks):
            self.compiled(self.state)
            if on_chunk is not None:
                on_chunk()
        results = self.state["results"].head(n_chunks, answer is not None)
        seconds = (time.perf_counter() - tic) / n_chunks
        return results, [seconds] * n_chunks

    @property
    def kv_bytes(self) -> int:
        """Keys + values the cache holds, over all layers (the masked cache: every position)."""
        per_layer = self.batch * self.n_kv_heads * self.n * self.head_dim * 2
        return per_layer * self.n_layers * torch.finfo(self.dtype).bits // 8

    # --- the traced step ---------------------------------------------------------------------

    def _step(self, state: dict[str, Any]) -> None:
        c, b = self.chunk, self.batch
        chunk = state["chunk"]
        start = chunk * c
        end = torch.minimum(start + c, state["length"])
        query_positions = start + torch.arange(c, device=self.device)
        ids = state["tokens"][query_positions]
        run = _StepRun(self, state, start, end, query_positions)
        logits = self.engine.model(
            input_ids=ids[None].expand(b, -1),
            position_ids=query_positions[None],
            use_cache=False,
            kvorch_run=run,
        ).logits
        targets = state["tokens"][query_positions + 1][None].expand(b, -1)
        has_target = query_positions + 1 < state["length"]
        in_answer = (query_positions >= state["answer_from"]) & (query_positions < state["answer_to"])
        sums = prediction_sums(logits.float(), targets, has_target, self.layout.reference, in_answer)
        results = state["results"]
        for name, value in [*sums.items(), ("kept", run.kept)]:
            getattr(results, name).index_copy_(0, chunk[None], value[None])
        self.engine.hidden_states.clear()
        chunk.add_(1)


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
    """The attention run of one traced step (``kvorch_run`` of workers/attention.py): writes the
    chunk's keys, attends over the masked cache, scores and decides, all as tensor code."""

    def __init__(
        self,
        step: ChunkStep,
        state: dict[str, Any],
        start: torch.Tensor,
        end: torch.Tensor,
        query_positions: torch.Tensor,
    ) -> None:
        self.step = step
        self.state = state
        self.start = start
        self.end = end
        self.query_positions = query_positions
        self.positions = torch.arange(step.n, device=step.device)
        self.kept = torch.zeros(step.batch, dtype=torch.int64, device=step.device)
        self.chunk_rope: dict[Any, tuple[torch.Tensor, torch.Tensor]] = {}

    def attend(
        self,
        layer: int,
        query: torch.Tensor,
        key: torch.Tensor,
        value: torch.Tensor,
        scaling: float,
        variant: AttentionVariant,
    ) -> torch.Tensor:
        step, s = self.step, self.start
        keys, values, keep = self.state["keys"][layer], self.state["values"][layer], self.state["keep"][layer]
        keys.index_copy_(2, self.query_positions, key)
        values.index_copy_(2, self.query_positions, value)
        first_held = (s - variant.sliding_window + 1).clamp(min=0) if variant.sliding_window else 0
        counted = keep & (self.positions >= first_held) & (self.positions < s)
        self.kept += counted.sum(dim=(1, 2))
        pattern = attention.band(self.query_positions, self.positions, variant)  # [c, N]
        if step.backend == "flex":
            out = attention.flex_grouped_attention(query, keys, values, keep, self.state["chunk"], scaling, variant)
            probs = None
        else:
            visible = keep[:, :, None, :] & pattern
            out, probs = attention.grouped_attention(query, keys, values, visible, scaling, step.backend, variant)
        for plan in step.groups:
            self._score_and_decide(layer, plan, query, keys, values, key, probs, pattern, scaling, variant)
        return out.transpose(1, 2)

    def _attention(
        self,
        plan: _GroupPlan,
        layer: int,
        query: torch.Tensor,
        keys: torch.Tensor,
        probs: torch.Tensor | None,
        pattern: torch.Tensor,
        scaling: float,
        variant: AttentionVariant,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """([R, H, q, N] probabilities of the press's q observing queries, [q] which are real):
        the last q real queries of the chunk; rows that are not real are zero."""
        q = plan.attention_queries
        index = (self.end - self.start) - q + torch.arange(q, device=query.device)
        real = index >= 0
        index = index.clamp(min=0)
        rows = plan.rows
        if probs is not None:
            chosen = probs[rows].index_select(2, index)
        else:
            visible = self.state["keep"][layer][rows][:, :, None, :] & pattern.index_select(0, index)
            chosen = attention.attention_probabilities(
                query[rows].index_select(2, index), keys[rows], visible, scaling, variant
            )
        return chosen * real[:, None].to(chosen.dtype), real

    def _score_and_decide(
        self,
        layer: int,
        plan: _GroupPlan,
        query: torch.Tensor,
        keys: torch.Tensor,
        values: torch.Tensor,
        new_keys: torch.Tensor,
        probs: torch.Tensor | None,
        pattern: torch.Tensor,
        scaling: float,
        variant: AttentionVariant,
    ) -> None:
        step, s, e, rows = self.step, self.start, self.end, plan.rows
        press = plan.group.press
        if not plan.rescores:
            score_from = s
            scored = self.query_positions
        elif plan.ranked:
            score_from = torch.zeros_like(s)
            scored = self.positions
        else:
            score_from = (s - plan.widest[layer]).clamp(min=0)
            scored = (score_from + torch.arange(plan.n_scored[layer], device=s.device)).clamp(max=step.n - 1)
        attention_probs = attention_rows = None
        if press.needs_attention:
            attention_probs, attention_rows = self._attention(
                plan, layer, query, keys, probs, pattern, scaling, variant
            )
        rotary = step.engine.layer_rotaries[layer]
        prerope = None
        if press.needs_prerope_queries:
            if rotary not in self.chunk_rope:
                self.chunk_rope[rotary] = rotary(self.query_positions)
            prerope = rotary.unrotate(query[rows], *self.chunk_rope[rotary])
        ctx = ChunkTensors(
            layer=layer,
            start=s,
            end=e,
            score_from=score_from,
            positions=self.positions,
            query_positions=self.query_positions,
            keys=keys[rows],
            values=values[rows],
            new_keys=new_keys[rows],
            queries=query[rows],
            doc_seed=self.state["doc_seed"],
            scored=scored,
            attention=attention_probs,
            attention_rows=attention_rows,
            prerope_queries=prerope,
            hidden_states=step.engine.hidden_states[layer][rows] if press.needs_hidden_states else None,
            rotary=rotary,
        )
        new = press.score_chunk(ctx, plan.state).float()
        scores = self.state["scores"][layer][rows]
        index = scored.expand_as(new)
        updated = (scored >= score_from) & (scored < e)
        scores.scatter_(2, index, torch.where(updated, new, scores.gather(2, index)))
        if plan.ranked:
            self._decide_by_budget(layer, plan, scores)
        else:
            self._decide_by_threshold(layer, plan, scores)

    def _decide_by_threshold(self, layer: int, plan: _GroupPlan, scores: torch.Tensor) -> None:
        """Keys leaving their head's protected window this chunk, [start - w, end - w), are kept
        for good iff score >= threshold (sinks always): the eager engine's rule as a mask."""
        window = plan.protected[layer]  # [kv-heads, 1]
        leaving = (self.positions >= self.start - window) & (self.positions < self.end - window)
        decision = (scores >= plan.group.thresholds) | (self.positions < plan.n_sink)
        keep = self.state["keep"][layer][plan.rows]
        keep.copy_(torch.where(leaving, decision, keep))

    def _decide_by_budget(self, layer: int, plan: _GroupPlan, scores: torch.Tensor) -> None:
        """The eager engine's budget rule over [n_sink, boundary) as masks: ranks come from a
        stable sort by score then a stable sort that moves positions outside the range last, so
        every in-range key gets the rank it has in the eager engine's slice."""
        n_sink, e = plan.n_sink, self.end
        boundary = (e - plan.narrowest[layer]).clamp(min=0)
        protected = n_sink + (e - boundary)
        allowed = (keep_limit(plan.group.keep_fraction, plan.group.budgets, e) - protected).clamp(min=0)  # [rows]
        in_range = (self.positions >= n_sink) & (self.positions < boundary)
        keep = self.state["keep"][layer][plan.rows]
        ranked = torch.where(in_range & keep, scores, float("-inf"))
        by_score = ranked.argsort(dim=-1, descending=True, stable=True)
        outside_last = (~in_range)[by_score].to(torch.uint8).argsort(dim=-1, stable=True)
        order = by_score.gather(-1, outside_last)
        rank = torch.empty_like(order).scatter_(
            -1, order, torch.arange(order.shape[-1], device=order.device).expand_as(order)
        )
        keep.copy_(keep & ((rank < allowed.view(-1, 1, 1)) | ~in_range))
