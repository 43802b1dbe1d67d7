"""The engine: one loaded model, hooked once, evaluating documents under batches of configs.

It owns what outlives a document: the model's attention hooks (kvorch's attention function,
and a pre-hook that captures each attention module's input for presses that score from hidden
states), each layer's attention variant and RoPE, and the compiled chunk steps, one per (batch
of configs, length bucket). The protocol itself is the chunk step's (workers/engine/step.py),
and the rows are the layout's (workers/engine/layout.py).

Which path a batch runs (:meth:`Engine.path`), decided here only:
- compiled, static shapes: ``--compile`` (on by default on CUDA) and every press traceable;
- uncompiled, exact shapes: otherwise (the CPU default, and batches holding a press that is not
  traceable, which the run names once: orchestrator/sweep/compile_check.py);
- uncompiled, static shapes: the preflight of a compiled sweep (``EngineSettings.static``).
A layer that bypasses kvorch's attention fails the first forward instead of being unmasked.
"""

from __future__ import annotations

import hashlib
import inspect
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import pyarrow as pa
import torch

from workers import attention
from workers.configs import EvalConfig
from workers.engine.layout import DocumentLayout
from workers.engine.settings import EngineSettings, cache_positions
from workers.engine.step import ChunkStep
from workers.nll import AnswerSpan
from workers.presses import Press
from workers.rope import LayerRotary, model_rotate


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
        self.model = model.eval()
        self.model.set_attn_implementation(attention.ATTENTION_NAME)
        self.settings = settings
        self.compile_backend = compile_backend
        # Static-shape steps per (batch of configs, cache length, reference row), reused across documents.
        self.steps: dict[tuple, ChunkStep] = {}
        self._variants: list[attention.AttentionVariant] | None = None
        self.worker = worker
        self.device = next(model.parameters()).device
        self.model_type = str(getattr(model.config, "model_type", type(model).__name__))
        self.layer_rotaries = _layer_rotaries(model, self.model_type, self.device)
        # The attention modules' inputs, captured for presses that score from hidden states
        # (KVzap). A forward pre-hook observes; it changes nothing the model computes.
        self.hidden_states: dict[int, torch.Tensor] = {}
        self.attention_modules: dict[int, torch.nn.Module] = {}
        for module in model.modules():
            if isinstance(getattr(module, "layer_idx", None), int) and type(module).__name__.endswith("Attention"):
                self.attention_modules[module.layer_idx] = module
                module.register_forward_pre_hook(self._capture_hidden_states, with_kwargs=True)

    def _capture_hidden_states(self, module: torch.nn.Module, args: tuple, kwargs: dict) -> None:
        self.hidden_states[module.layer_idx] = args[0] if args else kwargs["hidden_states"]

    def path(self, configs: list[EvalConfig]) -> ExecutionPath:
        """The one place that decides how a batch runs (see the module docstring)."""
        traceable = all(c.press.traceable for c in configs)
        settings = self.settings
        return ExecutionPath(compiled=settings.compile and traceable, static=settings.static_shapes and traceable)

    def variants(self, token_ids: torch.Tensor) -> list[attention.AttentionVariant]:
        """Each layer's attention variant, from a one-token forward that records what every layer
        asks for; a layer that never reaches kvorch's attention is refused here."""
        if self._variants is None:
            probe = _VariantProbe(self.model.config.num_hidden_layers)
            self.model(input_ids=token_ids[:1][None].to(self.device), use_cache=False, kvorch_run=probe)
            self.hidden_states.clear()
            self._variants = check_every_layer_attended(self.model_type, probe.variants)
        return self._variants

    def step_for(
        self, configs: list[EvalConfig], token_ids: torch.Tensor, agreement: bool
    ) -> tuple[ChunkStep, DocumentLayout]:
        """The step for this batch and document (a static one is built once per length bucket and
        reused), and the document's own layout (windows clamped to its length, for the rows)."""
        n = int(token_ids.shape[0])
        self.variants(token_ids)
        layout = DocumentLayout(self, configs, n, agreement)
        path = self.path(configs)
        n_positions = cache_positions(n, self.settings.chunk_size, path.static)
        if not path.static:
            return ChunkStep(self, layout, n_positions, static=False, compiled=False), layout
        key = (tuple(c.label for c in layout.configs), n_positions, layout.reference, path.compiled)
        if key not in self.steps:
            step_layout = DocumentLayout(self, configs, n_positions, agreement)
            self.steps[key] = ChunkStep(self, step_layout, n_positions, static=True, compiled=path.compiled)
        return self.steps[key], layout

    @torch.inference_mode()
    def evaluate(
        self,
        doc_id: str,
        token_ids: torch.Tensor,
        configs: list[EvalConfig],
        on_chunk: Callable[[], None] | None = None,
        answer: AnswerSpan | None = None,
    ) -> pa.Table:
        """One row per (chunk, config) of this document, in ROW_SCHEMA.

        ``on_chunk`` is called after every chunk: the actor counts progress (and fires its test
        fault hook) there, at the only granularity finer than a document. ``answer``: a retrieval
        probe's answer span, whose own NLL and hits fill the answer columns.
        """
        step, layout = self.step_for(configs, token_ids, self.settings.agreement)
        results, seconds = step.run(doc_seed(doc_id), token_ids.to(self.device), on_chunk, answer)
        kv_bytes = [step.kv_bytes] * len(seconds)
        return layout.rows(doc_id, self.variants(token_ids), results, seconds, kv_bytes, answer)

    @torch.inference_mode()
    def inspect(
        self, doc_id: str, token_ids: torch.Tensor, configs: list[EvalConfig]
    ) -> tuple[pa.Table, DocumentScores]:
        """The rows plus every key's last score and final keep decision, for ``kvorch scores``."""
        n = int(token_ids.shape[0])
        step, layout = self.step_for(configs, token_ids, agreement=False)
        results, seconds = step.run(doc_seed(doc_id), token_ids.to(self.device))
        rows = layout.rows(doc_id, self.variants(token_ids), results, seconds, [step.kv_bytes] * len(seconds))
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
        return step.press_states[0]


@dataclass(frozen=True)
class DocumentScores:
    """Per config (in ``configs`` order): [layers, kv-heads, positions] of the last score each key
    got and whether it was still kept when the document ended."""

    configs: list[str]
    scores: torch.Tensor  # [configs, layers, kv-heads, positions] float32
    kept: torch.Tensor  # same shape, bool


def check_every_layer_attended(
    model_type: str, variants: list[attention.AttentionVariant | None]
) -> list[attention.AttentionVariant]:
    """A layer whose attention never reached kvorch's would attend unmasked: refuse the model."""
    missing = [layer for layer, variant in enumerate(variants) if variant is None]
    if missing:
        raise attention.UnsupportedAttention(
            f"{model_type}: layer(s) {missing} do not run their attention through transformers' "
            "attention interface, so kvorch cannot apply its keep-mask to them"
        )
    return list(variants)


class _VariantProbe:
    """An attention run that only records each layer's variant (and returns zeros)."""

    def __init__(self, n_layers: int) -> None:
        self.variants: list[attention.AttentionVariant | None] = [None] * n_layers

    def attend(
        self,
        layer: int,
        query: torch.Tensor,
        key: torch.Tensor,
        value: torch.Tensor,
        scaling: float,
        variant: attention.AttentionVariant,
    ) -> torch.Tensor:
        self.variants[layer] = variant
        b, h, c, _ = query.shape
        return query.new_zeros(b, c, h, value.shape[-1])


def _layer_rotaries(model: torch.nn.Module, model_type: str, device: torch.device) -> list[LayerRotary]:
    """Per layer, the model's RoPE as presses read it. Layers of one type share one object.

    Models with several RoPEs (Gemma 3: local and global layers with different bases) take a
    ``layer_type`` in their rotary module; the layer's type comes from ``config.layer_types``.
    A model without RoPE gets an object that refuses, naming the family, when a press calls it.
    """
    config = model.config
    n_layers = config.num_hidden_layers
    module = getattr(model.base_model, "rotary_emb", None)
    rotate = model_rotate(model)
    if module is None or rotate is None:
        reason = "have no rotary embedding" if module is None else "have a rotary embedding of unknown layout"

        def refuse(positions: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
            raise ValueError(f"it needs RoPE, and {model_type} models {reason}")

        return [LayerRotary(refuse, rotate or (lambda x: x))] * n_layers
    layer_types = list(getattr(config, "layer_types", None) or [None] * n_layers)
    takes_layer_type = "layer_type" in inspect.signature(module.forward).parameters
    probe = torch.zeros(1, device=device, dtype=torch.float32)

    def embed_for(layer_type: str | None):
        def embed(positions: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
            extra = {"layer_type": layer_type} if takes_layer_type else {}
            cos, sin = module(probe, positions[None], **extra)
            return cos[0].float(), sin[0].float()

        return embed

    by_type = {t: LayerRotary(embed_for(t if takes_layer_type else None), rotate) for t in set(layer_types)}
    return [by_type[t] for t in layer_types]
