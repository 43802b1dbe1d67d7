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

import hashlib
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import pyarrow as pa
import torch

from workers.configs import EvalConfig
from workers.engine.hooks import HookedModel
from workers.engine.layout import DocumentLayout
from workers.engine.settings import EngineSettings, cache_positions
from workers.engine.step import ChunkStep
from workers.nll import AnswerSpan
from workers.plan import DocumentScores
from workers.presses import Press


def doc_seed(doc_id: str) -> int:
    """A per-document seed that is the same on every machine and Python process."""
    return int.from_bytes(hashlib.sha256(doc_id.encode()).digest()[:8], "little") >> 1


@dataclass(frozen=True)
class ExecutionPath:
    """How one batch runs: traced by torch.compile or not, at static or exact shapes."""

    compiled: bool
    static: bool


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

    @property
    def compile_seconds(self) -> float:
        """Seconds spent compiling so far, over every step this engine built (only static steps
        compile, and those are all kept)."""
        return sum(step.compile_seconds for step in self.steps.values())

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
            return self._step(layout, n_positions, path), layout
        key = (tuple(c.label for c in layout.configs), n_positions, layout.reference, path.compiled)
        if key not in self.steps:
            self.steps[key] = self._step(self._layout(configs, n_positions, agreement), n_positions, path)
        return self.steps[key], layout

    def _layout(self, configs: list[EvalConfig], n: int, agreement: bool) -> DocumentLayout:
        model_config = self.hooked.model.config
        return DocumentLayout(model_config, self.settings, configs, n, agreement, self.device, self.worker)

    def _step(self, layout: DocumentLayout, n_positions: int, path: ExecutionPath) -> ChunkStep:
        return ChunkStep(
            self.hooked, self.settings, layout, n_positions, path.static, path.compiled, self.worker,
            self.compile_backend, lambda what, seconds: self.on_compile and self.on_compile(what, seconds),
        )  # fmt: skip

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
        step, layout = self.step_for(configs, token_ids, self.settings.agreement)
        results, seconds = step.run(doc_seed(doc_id), token_ids.to(self.device), on_chunk, answer)
        kv_bytes = [step.kv_bytes] * len(seconds)
        rows = layout.rows(doc_id, self.hooked.variants(token_ids), results, seconds, kv_bytes, answer)
        return rows

    @torch.inference_mode()
    def inspect(
        self, doc_id: str, token_ids: torch.Tensor, configs: list[EvalConfig]
    ) -> tuple[pa.Table, DocumentScores]:
        """The rows plus every key's last score and final keep decision, for ``kvorch scores``."""
        n = int(token_ids.shape[0])
        step, layout = self.step_for(configs, token_ids, agreement=False)
        results, seconds = step.run(doc_seed(doc_id), token_ids.to(self.device))
        variants = self.hooked.variants(token_ids)
        rows = layout.rows(doc_id, variants, results, seconds, [step.kv_bytes] * len(seconds))
        scores = DocumentScores(
            configs=[c.label for c in layout.configs],
            scores=torch.stack(step.state["scores"], dim=1)[..., :n].cpu(),
            kept=torch.stack(step.state["keep"], dim=1)[..., :n].cpu(),
        )
        return rows, scores

    @torch.inference_mode()
    def observe(self, doc_id: str, token_ids: torch.Tensor, press: Press) -> Any:
        """Run one press over the document and return its final state: for presses that measure
        the model (head statistics) rather than compress it."""
        step, _ = self.step_for([EvalConfig(press)], token_ids, agreement=False)
        step.run(doc_seed(doc_id), token_ids.to(self.device))
        return step.press_states[0][0]  # the probe's state (shared by every layer)


