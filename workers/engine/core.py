"""The engine: one loaded model, hooked once, evaluating documents under batches of configs.

It owns what outlives a document: the hooked model (workers/engine/hooks.py) and the compiled
chunk steps, one per (batch of configs, length bucket). The protocol itself is the chunk step's
(workers/engine/step.py), and the rows are the layout's (workers/engine/layout.py).

Which path a batch runs (:meth:`Engine.path`), decided here only:
- compiled, static shapes: ``--compile`` (on by default on CUDA) and every press traceable;
- uncompiled, exact shapes: otherwise (the CPU default, and batches holding a press that is not
  traceable, which the run names once: orchestrator/sweep/compile_check.py);
- uncompiled, static shapes: the preflight of a compiled sweep (``EngineSettings.static``).
"""

from __future__ import annotations

import dataclasses
import hashlib
import itertools
import sys
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import pyarrow as pa
import torch

from workers.contract.configs import EvalConfig
from workers.contract.plan import AnswerSpan, DocumentScores
from workers.contract.settings import EngineSettings, GenerationSettings, cache_positions, chunk_bounds
from workers.engine import cache, generation, sizing
from workers.engine.chunk_plan import Span
from workers.engine.hooks import HookedModel
from workers.engine.layout import DocumentLayout, held_from
from workers.engine.step import ChunkStep, cache_bands
from workers.presses import Press


def head_kept(step: ChunkStep, n: int) -> list[list[list[int]]]:
    """Per batch row, [layers][kv-heads] the keys each head still keeps once the document's ``n``
    positions ran (the lake's ``head_kept``): read back once per document, with the rows."""
    return torch.stack([keep[..., :n].sum(dim=-1) for keep in step.state.keep], dim=1).tolist()


def doc_seed(doc_id: str) -> int:
    """A per-document seed that is the same on every machine and Python process."""
    return int.from_bytes(hashlib.sha256(doc_id.encode()).digest()[:8], "little") >> 1


@dataclass(frozen=True)
class ExecutionPath:
    """How one batch runs: traced by torch.compile or not, at static or exact shapes."""

    compiled: bool
    static: bool


def prompt_spans(n_context: int, n_prompt: int, chunk_size: int, settings: GenerationSettings) -> list[Span]:
    """The chunks a question task's prompt runs in: the context in chunks of ``chunk_size``
    (``chunked``) or in one (``once``), deciding after each; the question after it as one chunk
    that decides nothing, or, ``query_aware``, inside the compressed part."""
    compressed = n_prompt if settings.query_aware else n_context
    if settings.protocol == "once":
        spans = [Span(0, compressed)] if compressed else []
    else:
        spans = [Span(s, e) for s, e in chunk_bounds(compressed, chunk_size)]
    if compressed < n_prompt:
        spans.append(Span(compressed, n_prompt, decide=False))
    return spans


def _most_written(spans: list[Span], n_prompt: int, settings: GenerationSettings) -> int:
    """The most keys a row's cache takes between two decisions while answering: the largest span
    that decides, or the undecided question plus the generated keys between two decisions (every
    generated key, when the cache is frozen after the prompt)."""
    decided = [s for s in spans if s.decide]
    question = n_prompt - (decided[-1].end if decided else 0)
    tail = question + (settings.decode_interval if settings.decode_eviction else settings.max_new_tokens)
    return max([s.end - s.start for s in decided] + [tail])


@dataclass(frozen=True)
class Generated:
    """One config's greedy answer (:meth:`Engine.generate`)."""

    config: EvalConfig
    token_ids: list[int]  # up to and including the stop token
    stop_reason: str  # "eos", "length", or "stop" (a stop string, see :meth:`cut`)
    # Keys held before each decoding step (summed over layers and kv-heads), and what the
    # uncompressed model holds then: step t produced token t + 1 (token 0 came from the prompt).
    kept_by_step: tuple[int, ...]
    total_by_step: tuple[int, ...]

    @property
    def keys_kept(self) -> int:
        """Keys held over the steps that produced this answer's tokens."""
        return sum(self.kept_by_step[: len(self.token_ids) - 1])

    @property
    def keys_total(self) -> int:
        return sum(self.total_by_step[: len(self.token_ids) - 1])

    @property
    def density(self) -> float:
        """Kept over what the uncompressed model holds, over the steps that produced the answer
        (1.0 for an answer of one token, read off the prompt's cache)."""
        return self.keys_kept / self.keys_total if self.keys_total else 1.0

    def cut(self, n_tokens: int, reason: str) -> Generated:
        """The answer as if generation had stopped after ``n_tokens`` (a stop string): greedy
        decoding is deterministic, so the tokens and the density are the ones that run gives."""
        return dataclasses.replace(self, token_ids=self.token_ids[:n_tokens], stop_reason=reason)


class Engine:
    """Evaluates documents under a batch of configs with one loaded model."""

    def __init__(
        self, model: torch.nn.Module, settings: EngineSettings, worker: str = "local", compile_backend: str = "inductor"
    ) -> None:
        """``compile_backend`` is torch.compile's backend when ``settings.compile``: inductor for
        real runs; tests pass "eager" or a counting backend to check graphs and recompiles
        without inductor's cost."""
        self.hooked = HookedModel(model)
        self.model, self.device = self.hooked.model, self.hooked.device
        self.settings = settings
        self.compile_backend = compile_backend
        self.worker = worker
        # Static-shape steps per (batch of configs, cache length, reference row, compiled),
        # reused across documents.
        self.steps: dict[tuple, ChunkStep] = {}
        # Told (what, None) when a step starts compiling and (what, seconds) when it is done:
        # the actor forwards both to the driver's progress line.
        self.on_compile: Callable[[str, float | None], None] | None = None
        # Per threshold config (label): the densest fraction of a document one (layer, kv-head)
        # held so far, which sizes its held cache for the next document (workers/engine/capacity.py).
        self.densities: dict[str, list[float]] = {}
        self.retired_compile_seconds = 0.0  # of static steps replaced by larger ones
        self.last_run: tuple[ChunkStep, DocumentLayout] | None = None

    @property
    def compile_seconds(self) -> float:
        """Seconds spent compiling so far, over every step this engine built (only static steps
        compile, and those are all kept)."""
        return self.retired_compile_seconds + sum(step.compile_seconds for step in self.steps.values())

    def path(self, configs: list[EvalConfig]) -> ExecutionPath:
        """The one place that decides how a batch runs (see the module docstring)."""
        traceable = all(c.press.traceable for c in configs)
        settings = self.settings
        return ExecutionPath(compiled=settings.compile and traceable, static=settings.static_shapes and traceable)

    def step_for(
        self, configs: list[EvalConfig], token_ids: torch.Tensor, agreement: bool
    ) -> tuple[ChunkStep, DocumentLayout]:
        """The step for this batch and document (a static one is built once per length bucket and
        reused), and the document's own layout (windows clamped to its length, for the rows)."""
        n = int(token_ids.shape[0])
        self.hooked.variants(token_ids)
        layout = self._layout(configs, n, agreement)
        path = self.path(configs)
        n_positions = cache_positions(n, self.settings.chunk_size, path.static)
        if not path.static:
            pools = self.group_pools(layout, n_positions, False, grow=True)
            return self._step(layout, n_positions, path, pools), layout
        # A static step keeps its pools for every document of its bucket (new pools are a new
        # graph); only a document that overflows them replaces it (_run), and a step built before
        # its threshold configs ever ran (holding every position for them) is replaced once, when
        # what they hold is known.
        key = (tuple(c.label for c in layout.configs), n_positions, layout.reference, path.compiled)
        if key in self.steps and self.steps[key].provisional and not self._unlearned(layout):
            self._rebuild_if_smaller(key, configs, n_positions, agreement)
        if key not in self.steps:
            static_layout = self._layout(configs, n_positions, agreement)
            pools = self.group_pools(static_layout, n_positions, True)
            self.steps[key] = self._step(static_layout, n_positions, path, pools)
            self.steps[key].key = key
            self.steps[key].provisional = self._unlearned(layout)
        return self.steps[key], layout

    def _rebuild_if_smaller(self, key: tuple, configs: list[EvalConfig], n_positions: int, agreement: bool) -> None:
        """A static step built before its threshold configs ran, now that what they hold is known:
        dropped (to be built again with their pools) where their pools would change, and where
        its compile did not fail (a failed compile is not retried); kept as it is otherwise."""
        step = self.steps[key]
        step.provisional = False
        pools = self.group_pools(self._layout(configs, n_positions, agreement), n_positions, True)
        if step.bands != cache_bands(step.layout.groups, pools, n_positions) and (
            step.compiled or not self.settings.compile
        ):
            self.retired_compile_seconds += self.steps.pop(key).compile_seconds

    def _unlearned(self, layout: DocumentLayout) -> bool:
        """Whether a config of the batch has its keys' scores decide what it holds and never ran."""
        return any(c.label not in self.densities for c in sizing.scores_decide(layout))

    def group_pools(
        self, layout: DocumentLayout, n_positions: int, static: bool, write: int | None = None, grow: bool = False
    ) -> list[cache.PoolBand | None]:
        """Each press group's pool of pages per layer (workers/engine/sizing.py), sized for what
        its configs can hold (the policy's bound, or what threshold configs held in earlier
        documents) plus the most keys written between two decisions (``write``: a chunk unless
        said otherwise). No pool (every position) under ``--cache masked`` and FlexAttention
        (whose block mask reads positions). ``grow``: a threshold config never run starts empty
        and grows between chunks (exact shapes), instead of holding every position."""
        chunk = self.settings.chunk_size if write is None else write
        full = self.settings.cache == "masked" or self.settings.attn == "flex"
        return sizing.group_pools(layout, n_positions, chunk, self.densities, static, full, grow)

    def _learn(self, step: ChunkStep, layout: DocumentLayout, n: int, doc_id: str) -> bool:
        """Record what each threshold config held in this document, per layer; True when a pool
        ran out of pages (then the document runs again, with that config's bounds doubled)."""
        peaks, overflows = step.held_back()
        kv_heads = layout.n_kv_heads
        for config, peak, overflow in zip(layout.configs, peaks, overflows, strict=True):
            old = self.densities.get(config.label, [0.0] * len(peak))
            # per layer: what the heads held together, as one head's fraction of the document
            density = [held / max(1, n * kv_heads) for held in peak]
            self.densities[config.label] = [
                max(was, 2 * max(was, now) if overflow else now) for was, now in zip(old, density, strict=True)
            ]
        if any(overflows):
            names = sorted({c.label for c, o in zip(layout.configs, overflows, strict=True) if o})
            print(
                f"kvorch: {self.worker}: {doc_id}: {', '.join(names)} held more keys than its cache had slots "
                "for; running the document again with more",
                file=sys.stderr,
                flush=True,
            )
        return any(overflows)

    def _layout(self, configs: list[EvalConfig], n: int, agreement: bool) -> DocumentLayout:
        model_config = self.hooked.model.config
        return DocumentLayout(model_config, self.settings, configs, n, agreement, self.device, self.worker)

    def _step(
        self, layout: DocumentLayout, n_positions: int, path: ExecutionPath, pools: list[cache.PoolBand | None]
    ) -> ChunkStep:
        return ChunkStep(
            self.hooked, self.settings, layout, n_positions, path.static, path.compiled, self.worker,
            self.compile_backend, lambda what, seconds: self.on_compile and self.on_compile(what, seconds), pools,
        )  # fmt: skip

    def _run(
        self,
        doc_id: str,
        token_ids: torch.Tensor,
        configs: list[EvalConfig],
        agreement: bool,
        on_chunk: Callable[[int], None] | None = None,
        answer: AnswerSpan | None = None,
    ) -> tuple[ChunkStep, DocumentLayout, Any, list[float]]:
        """Run the document, again with more slots while a held band overflows (at most until
        every band is full, which cannot overflow): never a row from a cache that dropped a key
        its policy kept. Progress is told for the first run only."""
        n = int(token_ids.shape[0])
        while True:
            step, layout = self.step_for(configs, token_ids, agreement)
            results, seconds = step.run(doc_seed(doc_id), token_ids.to(self.device), on_chunk, answer)
            if not self._learn(step, layout, n, doc_id):
                self.last_run = (step, layout)  # for benches: the slots and peaks of the last document
                return step, layout, results, seconds
            if step.static:  # its compile time stays counted with the engine's
                self.retired_compile_seconds += self.steps.pop(step.key).compile_seconds
            on_chunk = None

    @torch.inference_mode()
    def evaluate(
        self,
        doc_id: str,
        token_ids: torch.Tensor,
        configs: list[EvalConfig],
        on_chunk: Callable[[int], None] | None = None,
        answer: AnswerSpan | None = None,
    ) -> pa.Table:
        """One row per (chunk, config) of this document, in ROW_SCHEMA.

        ``on_chunk`` is called after every chunk with its number of tokens: the actor counts
        progress (and fires its test fault hook) there, at the only granularity finer than a
        document. ``answer``: a retrieval probe's answer span, whose own NLL and hits fill the
        answer columns.
        """
        step, layout, results, seconds = self._run(
            doc_id, token_ids, configs, self.settings.agreement, on_chunk, answer
        )
        kv_bytes = [step.kv_bytes] * len(seconds)
        kept = head_kept(step, int(token_ids.shape[0]))
        rows = layout.rows(doc_id, self.hooked.variants(token_ids), results, seconds, kv_bytes, answer, head_kept=kept)
        return rows

    @torch.inference_mode()
    def generate(
        self,
        doc_id: str,
        context_ids: torch.Tensor,
        question_ids: torch.Tensor,
        configs: list[EvalConfig],
        settings: GenerationSettings,
        stop_token_ids: list[int],
    ) -> tuple[pa.Table, list[Generated]]:
        """The prompt's rows (one per chunk and config, as :meth:`evaluate`'s) and each config's
        greedy answer to a question about a context, in the order of ``configs``: the prompt
        (context, then question) runs through the settings' protocol, then every config
        generates from its own cache (generation.decode). Exact shapes, uncompiled; run again with
        more slots while a held band overflows, as :meth:`_run` does."""
        prompt_ids = torch.cat([context_ids, question_ids]).to(self.device)
        n_prompt = int(prompt_ids.shape[0])
        n = n_prompt + settings.max_new_tokens
        spans = prompt_spans(int(context_ids.shape[0]), n_prompt, self.settings.chunk_size, settings)
        variants = self.hooked.variants(prompt_ids)
        write = _most_written(spans, n_prompt, settings)
        for attempt in itertools.count():
            layout = self._layout(configs, n, self.settings.agreement)

            def keys_total_at(position: int, kv_heads: int = layout.n_kv_heads) -> int:
                return sum(position - held_from(position, v) for v in variants) * kv_heads

            # A second overflow (a bound the policy fixes, outgrown): full bands, which cannot overflow.
            pools = self.group_pools(layout, n, False, write) if attempt < 2 else [None] * len(layout.groups)
            step = self._step(layout, n, ExecutionPath(compiled=False, static=False), pools)
            results, seconds = step.run(doc_seed(doc_id), prompt_ids, spans=spans)
            decoded = generation.decode(
                step, n_prompt, len(spans), settings.max_new_tokens, stop_token_ids, keys_total_at,
                settings.decode_eviction, settings.decode_interval,
            )  # fmt: skip
            if not self._learn(step, layout, n, doc_id):
                break
        self.last_run = (step, layout)
        by_row = {i: r for r, i in enumerate(layout.order)}
        bounds = [(s.start, s.end) for s in spans]
        rows = layout.rows(doc_id, variants, results, seconds, [step.kv_bytes] * len(seconds), bounds=bounds)
        return rows, [
            Generated(
                config,
                decoded.token_ids[by_row[i]],
                decoded.stop_reasons[by_row[i]],
                tuple(decoded.kept_by_step[by_row[i]]),
                tuple(decoded.total_by_step),
            )
            for i, config in enumerate(configs)
        ]

    @torch.inference_mode()
    def inspect(
        self, doc_id: str, token_ids: torch.Tensor, configs: list[EvalConfig]
    ) -> tuple[pa.Table, DocumentScores]:
        """The rows plus every key's last score and final keep decision, for ``kvorch scores``."""
        n = int(token_ids.shape[0])
        step, layout, results, seconds = self._run(doc_id, token_ids, configs, agreement=False)
        variants = self.hooked.variants(token_ids)
        kv_bytes = [step.kv_bytes] * len(seconds)
        rows = layout.rows(doc_id, variants, results, seconds, kv_bytes, head_kept=head_kept(step, n))
        scores = DocumentScores(
            configs=[c.label for c in layout.configs],
            scores=torch.stack(step.state.scores, dim=1)[..., :n].cpu(),
            kept=torch.stack(step.state.keep, dim=1)[..., :n].cpu(),
        )
        return rows, scores

    @torch.inference_mode()
    def observe(self, doc_id: str, token_ids: torch.Tensor, press: Press) -> Any:
        """Run one press over the document and return its final state: for presses that measure
        the model (head statistics) rather than compress it."""
        step, _, _, _ = self._run(doc_id, token_ids, [EvalConfig(press)], agreement=False)
        return step.press_states[0][0]  # the probe's state (shared by every layer)
