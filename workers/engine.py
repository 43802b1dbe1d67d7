"""The evaluation protocol of docs/DESIGN.md ("The evaluation protocol"), implemented once.

A document is fed in chunks; each config of the batch is one batch row with its own
keep-mask per (layer, kv-head, position). For chunk [s, e) every layer:
  1. writes the chunk's keys/values into a preallocated cache at absolute positions,
  2. attends over kept keys before s plus ordinary causal attention inside the chunk,
  3. lets each press score keys (new ones, or every undecided one for rescoring presses),
  4. decides, once and for good, the keys that just left the protected window:
     evicted if score < threshold, sinks always kept. The window is the DMS window (or a
     press's own larger local window), or per (layer, kv-head) windows a head-aware press sets.
Evicted keys are masked, never shown to a later query, or with ``compact`` physically dropped
(workers/kv_cache.py). Each layer's attention variant (sliding window, logit soft-cap) is the
model's own (workers/attention.py), so the baseline equals a plain full-sequence forward on every
family; a layer that bypasses kvorch's attention fails the first chunk instead of being unmasked.

Density on sliding-window layers: such a layer holds, uncompressed, only the keys its next query
can see (the last ``sliding_window - 1`` before the chunk). The density columns count against
that: ``keys_total`` sums what each layer holds uncompressed, and a kept key outside a layer's
sliding window is not counted as kept (the model no longer holds it). So the baseline's density is
1 on every family, and a press's density is "kept / what the uncompressed model holds".

Chunk rows (NLL, top-1, density) are accumulated on the device and read back once per document.

Two engines implement this protocol and give the same rows (tests/test_chunk_step.py):
- the chunk step (workers/chunk_step.py): the whole step, every layer, attention, presses and
  decisions, as one graph ``torch.compile`` takes with ``fullgraph=True``; bounds are tensors and
  shapes static, so it never recompiles per chunk. It runs whenever compiling (``--compile``, on
  by default on CUDA).
- the eager per-layer engine (``_DocumentRun`` below): slices by Python bounds and runs a
  batch-1 shared prefix; faster uncompiled (the CPU default), and the engine for ``--compact``,
  for ``observe`` (head statistics) and for presses without a tensor form (the kvpress adapter).
  Compiled, its forward breaks its graph at every attention call.
"""

from __future__ import annotations

import hashlib
import inspect
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import pyarrow as pa
import torch
import torch.nn.functional as F

from workers import attention
from workers.chunk_results import ChunkResults, prediction_sums
from workers.chunk_step import ChunkStep, padded_length
from workers.configs import RANKED_POLICIES, EvalConfig
from workers.decisions import decide_by_budget, decide_by_threshold, keep_limit
from workers.kv_cache import LayerView, make_cache
from workers.nll import AnswerSpan
from workers.presses import LayerContext, Press
from workers.presses.baseline import BaselinePress
from workers.rope import LayerRotary, model_rotate
from workers.schema import ROW_SCHEMA


@dataclass(frozen=True)
class EngineSettings:
    chunk_size: int = 128
    window: int = 128
    attn: str = "sdpa"
    compile: bool = False
    compact: bool = False
    # Run batches whose presses all have a tensor form through the one-graph chunk step
    # (workers/chunk_step.py). None: when compiling, which is what the step is for; uncompiled, the
    # eager per-layer engine is faster (it attends over [0, end) and runs the shared prefix once).
    # True/False force one engine (tests compare the two).
    graph: bool | None = None
    # With compile on CUDA: replay the compiled step as a CUDA graph (torch.compile's
    # "reduce-overhead"). Off until measured on a GPU (BENCHMARKS.md).
    cuda_graphs: bool = False
    # Record each config's agreement with the uncompressed model (KL, top-1, top-5; the
    # kl_sum/top1_agree/top5_overlap_sum columns). A batch without baseline then runs it as a
    # hidden extra row: its logits are the reference.
    agreement: bool = True

    def __post_init__(self) -> None:
        if self.chunk_size < 1:
            raise ValueError(f"chunk size must be >= 1, got {self.chunk_size}")
        if self.window < 0:
            raise ValueError(f"window must be >= 0, got {self.window}")
        attention.check_backend(self.attn)


def doc_seed(doc_id: str) -> int:
    """A per-document seed that is the same on every machine and Python process."""
    return int.from_bytes(hashlib.sha256(doc_id.encode()).digest()[:8], "little") >> 1


class Engine:
    """Evaluates documents under a batch of configs with one loaded model."""

    def __init__(
        self, model: torch.nn.Module, settings: EngineSettings, worker: str = "local", compile_backend: str = "inductor"
    ) -> None:
        """``compile_backend`` is torch.compile's backend when ``settings.compile``: inductor for
        real runs; tests pass "eager" to check shapes and recompiles without inductor's cost."""
        self.model = model.eval()
        self.model.set_attn_implementation(attention.ATTENTION_NAME)
        self.settings = settings
        self.compile_backend = compile_backend
        self.forward = torch.compile(model, backend=compile_backend) if settings.compile else model
        # One compiled chunk step per (batch of configs, cache length), reused across documents.
        self.steps: dict[tuple[tuple[str, ...], int], ChunkStep] = {}
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

    def runs_in_graph(self, configs: list[EvalConfig]) -> bool:
        """Whether this batch runs through the one-graph chunk step: every press has a tensor form
        and the cache is the masked one (``--compact`` compacts between chunks, eagerly)."""
        graph = self.settings.compile if self.settings.graph is None else self.settings.graph
        return graph and not self.settings.compact and all(c.press.in_graph for c in configs)

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
        """The compiled step for this batch at the document's length bucket (built on first use),
        and the document's own layout (windows clamped to its length, for the density columns)."""
        n = int(token_ids.shape[0])
        layout = DocumentLayout(self, configs, n, agreement)
        n_positions = padded_length(n, self.settings.chunk_size)
        key = (tuple(c.label for c in layout.configs), n_positions, layout.reference)
        if key not in self.steps:
            variants = self.variants(token_ids)
            self.steps[key] = ChunkStep(
                self, DocumentLayout(self, configs, n_positions, agreement), n_positions, variants
            )
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
        agreement = self.settings.agreement
        if self.runs_in_graph(configs):
            step, layout = self.step_for(configs, token_ids, agreement)
            results, seconds = step.run(doc_seed(doc_id), token_ids.to(self.device), on_chunk, answer)
            return layout.rows(doc_id, step.variants, results, seconds, [step.kv_bytes] * len(seconds), answer)
        run = _DocumentRun(self, doc_id, token_ids.to(self.device), configs, agreement, answer)
        return run.execute(on_chunk)

    @torch.inference_mode()
    def inspect(
        self, doc_id: str, token_ids: torch.Tensor, configs: list[EvalConfig]
    ) -> tuple[pa.Table, DocumentScores]:
        """The rows plus every key's last score and final keep decision, for ``kvorch scores``."""
        n = int(token_ids.shape[0])
        if self.runs_in_graph(configs):
            step, layout = self.step_for(configs, token_ids, agreement=False)
            results, seconds = step.run(doc_seed(doc_id), token_ids.to(self.device))
            rows = layout.rows(doc_id, step.variants, results, seconds, [step.kv_bytes] * len(seconds))
            final_scores, final_keep = step.state["scores"], step.state["keep"]
        else:
            run = _DocumentRun(self, doc_id, token_ids.to(self.device), configs)
            rows = run.execute()
            layout, final_scores, final_keep = run.layout, run.scores, run.keep
        scores = DocumentScores(
            configs=[c.label for c in layout.configs],
            scores=torch.stack(final_scores, dim=1)[..., :n].cpu(),
            kept=torch.stack(final_keep, dim=1)[..., :n].cpu(),
        )
        return rows, scores

    @torch.inference_mode()
    def observe(self, doc_id: str, token_ids: torch.Tensor, press: Press) -> Any:
        """Run one press over the document and return its final state: for presses that measure
        the model (head statistics) rather than compress it."""
        run = _DocumentRun(self, doc_id, token_ids.to(self.device), [EvalConfig(press)])
        run.execute()
        return run.groups[0].state


@dataclass(frozen=True)
class DocumentScores:
    """Per config (in ``configs`` order): [layers, kv-heads, positions] of the last score each key
    got and whether it was still kept when the document ended."""

    configs: list[str]
    scores: torch.Tensor  # [configs, layers, kv-heads, positions] float32
    kept: torch.Tensor  # same shape, bool


@dataclass
class _RowGroup:
    """Consecutive batch rows that share one press and policy (differing by threshold or ratio)."""

    press: Press
    policy: str  # one of workers.configs.POLICIES
    rows: slice
    thresholds: torch.Tensor  # [n_rows, 1, 1]
    keep_fraction: torch.Tensor  # [n_rows] float64: 1 - compression ratio (ratio policy), else 1
    budgets: torch.Tensor  # [n_rows] int64: the token budget (budget policy), else unbounded
    state: Any
    windows: HeadWindows


@dataclass
class HeadWindows:
    """The windows of one press, per (layer, kv-head), clamped to the document length.

    ``counted`` is what the density columns call "in window" (the DMS window, or a head-aware
    press's windows); ``protected`` adds the press's own local window (H2O's 512). Keys older
    than ``protected`` are decided by score. Most presses have one window for every head, and the
    engine then takes the same slices it always did.
    """

    counted: torch.Tensor  # [layers, kv-heads] int64, CPU
    protected: torch.Tensor  # [layers, kv-heads] int64, CPU
    protected_on_device: torch.Tensor  # [layers, kv-heads, 1]
    ranges: list[tuple[int, int]]  # per layer: (min, max) protected window

    @classmethod
    def of(
        cls, press: Press, dms_window: int, shape: tuple[int, int, int], n: int, device: torch.device
    ) -> HeadWindows:
        n_layers, n_heads, n_kv_heads = shape
        counted = press.head_windows(n_layers, n_heads, n_kv_heads)
        if counted is None:
            counted = torch.full((n_layers, n_kv_heads), dms_window, dtype=torch.int64)
        elif tuple(counted.shape) != (n_layers, n_kv_heads):
            raise ValueError(
                f"{press.label()}: head windows of shape {tuple(counted.shape)}, the model has "
                f"{n_layers} layers x {n_kv_heads} kv-heads"
            )
        counted = counted.to(torch.int64).clamp(0, n)
        protected = counted.clamp(min=min(press.protected_window, n))
        ranges = [(int(row.min()), int(row.max())) for row in protected]
        return cls(counted, protected, protected.to(device)[..., None], ranges)

    @property
    def mean(self) -> int:
        """The ``window`` column: the DMS window, or the mean of a press's per-head windows."""
        return round(float(self.counted.double().mean()))

    @property
    def uniform(self) -> bool:
        return all(lo == hi for lo, hi in self.ranges) and len({lo for lo, _ in self.ranges}) == 1

    def at(self, s: int, n_sink: int, first_held: torch.Tensor) -> tuple[int, int]:
        """(keys in window, keys protected: window + sinks before it), summed over heads, before s.

        ``first_held`` [layers, 1]: the first position each layer holds uncompressed (0, or the
        start of a sliding-window layer's window); keys before it count in no column.
        """
        held = s - first_held
        window = self.protected.clamp(max=s)
        sinks_outside = ((s - window).clamp(max=n_sink) - first_held).clamp(min=0)
        in_window = torch.minimum(self.counted.clamp(max=s), held)
        return int(in_window.sum()), int((torch.minimum(window, held) + sinks_outside).sum())


class DocumentLayout:
    """The batch rows of a document run and what the density columns need: configs ordered so
    each press's rows are contiguous (presses then work on slices), grouped by (press, policy),
    with each group's windows clamped to ``n`` positions. Both engines build one; the eager one
    adds the press states.

    With ``agreement`` the baseline's row is the ``reference`` of the agreement columns; a batch
    without one gets it as an extra ``hidden`` row, run like any other but never written (the
    run's own baseline rows come from the batch that asked for it).
    """

    def __init__(self, engine: Engine, configs: list[EvalConfig], n: int, agreement: bool = False) -> None:
        cfg = engine.model.config
        add_reference = agreement and not any(c.is_baseline for c in configs)
        if add_reference:
            configs = [*configs, EvalConfig(BaselinePress())]
        device = engine.device
        self.engine = engine
        self.n = n
        self.n_layers = cfg.num_hidden_layers
        self.n_kv_heads = getattr(cfg, "num_key_value_heads", None) or cfg.num_attention_heads
        by_press: dict[tuple[Press, str], list[int]] = {}
        for i, config in enumerate(configs):
            by_press.setdefault((config.press, config.policy), []).append(i)
        self.order = [i for rows in by_press.values() for i in rows]
        self.configs = [configs[i] for i in self.order]
        self.reference = next((r for r, c in enumerate(self.configs) if c.is_baseline), None) if agreement else None
        self.hidden = self.reference if add_reference else None
        self.groups: list[_RowGroup] = []
        head_shape = (self.n_layers, cfg.num_attention_heads, self.n_kv_heads)
        first = 0
        for (press, policy), rows in by_press.items():
            taus = torch.tensor([configs[i].engine_threshold for i in rows], device=device)
            ratios = torch.tensor([configs[i].ratio or 0.0 for i in rows], device=device, dtype=torch.float64)
            budgets = [configs[i].budget for i in rows]
            unbounded = torch.iinfo(torch.int64).max
            self.groups.append(
                _RowGroup(
                    press=press,
                    policy=policy,
                    rows=slice(first, first + len(rows)),
                    thresholds=taus.view(-1, 1, 1),
                    keep_fraction=(1.0 - ratios),
                    budgets=torch.tensor([unbounded if b is None else b for b in budgets], device=device),
                    state=None,
                    windows=HeadWindows.of(press, engine.settings.window, head_shape, n, device),
                )
            )
            if policy in RANKED_POLICIES and not self.groups[-1].windows.uniform:
                raise ValueError(f"{press.label()} has per-head windows: use it under the threshold policy")
            first += len(rows)

    def rows(
        self,
        doc_id: str,
        variants: list[attention.AttentionVariant | None],
        results: ChunkResults,
        seconds: list[float],
        kv_bytes: list[int],
        answer: AnswerSpan | None = None,
    ) -> pa.Table:
        """One row per (chunk, config) in ROW_SCHEMA, from the per-chunk [chunks, B] results
        (on the CPU). The hidden reference row, if any, is not written."""
        chunk = self.engine.settings.chunk_size
        bounds = [(s, min(s + chunk, self.n)) for s in range(0, self.n, chunk)]
        group_of = {}
        for group in self.groups:
            for r in range(group.rows.start, group.rows.stop):
                group_of[r] = group
        columns: dict[str, list] = {f.name: [] for f in ROW_SCHEMA}
        variants = [variant or attention.GLOBAL for variant in variants]
        # A config's identity columns, formatted once, not once per chunk.
        names = [(c.label, c.press.label(), c.press.params_json()) for c in self.configs]
        for k, (s, e) in enumerate(bounds):
            first_held = torch.tensor([[held_from(s, v)] for v in variants], dtype=torch.int64)  # [layers, 1]
            keys_total = int((s - first_held).sum()) * self.n_kv_heads
            counted = {id(g): g.windows.at(s, g.press.n_sink, first_held) for g in self.groups}
            n_targets = max(0, min(e, self.n - 1) - s)
            for r, config in enumerate(self.configs):
                if r == self.hidden:
                    continue
                group = group_of[r]
                in_window, protected = counted[id(group)]
                n_kept = int(results.kept[k, r])
                row = {
                    "doc_id": doc_id,
                    "chunk_index": k,
                    "chunk_start": s,
                    "chunk_end": e,
                    "config": names[r][0],
                    "press": names[r][1],
                    "method_params": names[r][2],
                    "threshold": config.threshold,
                    "policy": config.policy,
                    "ratio": config.ratio,
                    "budget": config.budget,
                    "window": group.windows.mean,
                    "n_sink": config.press.n_sink,
                    "protected_window": config.press.protected_window,
                    "nll_sum": float(results.nll[k, r]),
                    "n_tokens": n_targets,
                    "n_correct": int(results.correct[k, r]),
                    "keys_total": keys_total,
                    "keys_in_window": in_window,
                    "keys_outside_window": keys_total - in_window,
                    "keys_kept": n_kept,
                    "keys_discarded_outside_window": keys_total - n_kept,
                    "keys_protected": protected,
                    "keys_kept_unprotected": n_kept - protected,
                    "forward_seconds": seconds[k],
                    "kv_cache_bytes": kv_bytes[k],
                    "batch_size": len(self.configs),
                    "worker": self.engine.worker,
                    "device": str(self.engine.device),
                    "method": config.method,
                    **_optional_columns(results, k, r, answer.targets_in(s, n_targets) if answer else None),
                }
                for name, value in row.items():
                    columns[name].append(value)
        return pa.Table.from_pydict(columns, schema=ROW_SCHEMA)


def _optional_columns(results: ChunkResults, k: int, r: int, answer_tokens: int | None) -> dict:
    """The agreement and answer columns of row (chunk k, config r): null when not recorded."""
    agreement = results.kl is not None
    answer = answer_tokens is not None
    return {
        "kl_sum": float(results.kl[k, r]) if agreement else None,
        "top1_agree": int(results.top1[k, r]) if agreement else None,
        "top5_overlap_sum": float(results.top5[k, r]) if agreement else None,
        "answer_nll_sum": float(results.answer_nll[k, r]) if answer else None,
        "answer_tokens": answer_tokens,
        "answer_correct": int(results.answer_correct[k, r]) if answer else None,
    }


class _DocumentRun:
    """The KV state of one document under a batch of configs; the attention run of the engine."""

    def __init__(
        self,
        engine: Engine,
        doc_id: str,
        token_ids: torch.Tensor,
        configs: list[EvalConfig],
        agreement: bool = False,
        answer: AnswerSpan | None = None,
    ) -> None:
        cfg = engine.model.config
        self.engine = engine
        self.settings = engine.settings
        self.doc_id = doc_id
        self.seed = doc_seed(doc_id)
        self.tokens = token_ids
        self.n = n = int(token_ids.shape[0])
        self.answer = answer
        self.layout = DocumentLayout(engine, configs, n, agreement)
        self.n_layers, self.n_kv_heads = self.layout.n_layers, self.layout.n_kv_heads
        self.configs, self.groups = self.layout.configs, self.layout.groups
        head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads
        device, dtype = engine.device, next(engine.model.parameters()).dtype
        for group in self.groups:
            n_rows = group.rows.stop - group.rows.start
            group.state = group.press.init_state(n_rows, self.n_layers, self.n_kv_heads, n, device)

        b = len(self.configs)
        shape = (b, self.n_kv_heads, n)
        self.cache = make_cache(self.settings.compact, self.n_layers, shape, head_dim, device, dtype)
        self.keep = [torch.ones(shape, device=device, dtype=torch.bool) for _ in range(self.n_layers)]
        self.scores = [torch.zeros(shape, device=device) for _ in range(self.n_layers)]
        self.start = self.end = 0
        self.kept = torch.zeros(b, device=device, dtype=torch.int64)
        # Per layer, the attention variant the model asked for (seen in the first chunk).
        self.variants: list[attention.AttentionVariant | None] = [None] * self.n_layers
        # Per RoPE, the chunk's (cos, sin), for presses that read pre-RoPE queries.
        self.chunk_rope: dict[LayerRotary, tuple[torch.Tensor, torch.Tensor]] = {}
        # Until a chunk starts past every group's protected window nothing can have been
        # evicted, so every row computes the same thing: such chunks run once, with batch 1.
        self.shared_until = min(lo for g in self.groups for lo, _ in g.windows.ranges)
        self.shared = False
        self.kv_bytes: list[int] = []  # per chunk: keys + values held over all layers

    # --- the chunk loop -------------------------------------------------------------------

    def execute(self, on_chunk: Callable[[], None] | None = None) -> pa.Table:
        chunk = self.settings.chunk_size
        b = len(self.configs)
        device = self.engine.device
        bounds = [(s, min(s + chunk, self.n)) for s in range(0, self.n, chunk)]
        reference = self.layout.reference
        results = ChunkResults.zeros(len(bounds), b, device, reference is not None, self.answer is not None)
        seconds = []
        for k, (s, e) in enumerate(bounds):
            tic = time.perf_counter()
            self.start, self.end = s, e
            self.kept.zero_()
            positions = torch.arange(s, e, device=device)
            self.chunk_rope.clear()
            self.shared = s <= self.shared_until
            self.cache.begin_chunk(s, e)
            self.kv_bytes.append(0)
            ids, model_positions = self._model_inputs(s, e, positions)
            logits = self.engine.forward(
                input_ids=ids[None].expand(1 if self.shared else b, -1),
                position_ids=model_positions[None],
                use_cache=False,
                kvorch_run=self,
            ).logits
            if k == 0:
                self._check_every_layer_attended()
            self.cache.end_chunk(self.keep)
            n_targets = min(e, self.n - 1) - s
            if n_targets > 0:
                pred = logits[:, :n_targets].float()
                targets = self.tokens[s + 1 : s + 1 + n_targets][None].expand(pred.shape[0], -1)
                in_answer = None
                if self.answer is not None:
                    offsets = torch.arange(s, s + n_targets, device=device) - self.answer.predicted_from
                    in_answer = (offsets >= 0) & (offsets < self.answer.tokens)
                # A shared chunk is one row, the same for every config (so its own reference).
                row_reference = None if reference is None else (0 if self.shared else reference)
                sums = prediction_sums(pred, targets, None, row_reference, in_answer)
                for name, value in sums.items():
                    getattr(results, name)[k] = value  # broadcasts a shared chunk to every row
            results.kept[k] = self.kept
            self.engine.hidden_states.clear()
            if device.type == "cuda":
                torch.cuda.synchronize(device)
            seconds.append(time.perf_counter() - tic)
            if on_chunk is not None:
                on_chunk()
        return self.layout.rows(
            self.doc_id, self.variants, results.head(len(bounds)), seconds, self.kv_bytes, self.answer
        )

    def _check_every_layer_attended(self) -> None:
        check_every_layer_attended(self.engine.model_type, self.variants)

    def _model_inputs(self, s: int, e: int, positions: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Token ids and position ids of chunk [s, e). A compiled forward gets every chunk at the
        full chunk size, the last one padded (its pad queries are dropped in ``attend`` and its pad
        logits are never targets), so one compiled graph serves the whole document."""
        ids = self.tokens[s:e]
        if not self.settings.compile:
            return ids, positions
        # Built the same way for every chunk, padded or not, so the compiled graph's guards on its
        # input (shape, strides, inference-mode dispatch keys) hold for all of them.
        ids = torch.cat((ids, ids[-1:].expand(self.settings.chunk_size - (e - s))))
        return ids, torch.arange(s, s + self.settings.chunk_size, device=positions.device)

    # Never traced: this engine slices by Python chunk bounds, which a compiler would specialize
    # into a new graph per chunk. Its compiled forward (--compact, or presses without a tensor
    # form) breaks its graph here; workers/chunk_step.py is the engine that compiles whole.
    @torch.compiler.disable
    def attend(
        self,
        layer: int,
        query: torch.Tensor,
        key: torch.Tensor,
        value: torch.Tensor,
        scaling: float,
        variant: attention.AttentionVariant,
    ) -> torch.Tensor:
        """Called by every attention layer for the current chunk; returns [B, c, H, D] (B = 1 for a
        shared chunk, whose single row is broadcast to every config's cache and press)."""
        s, e = self.start, self.end
        self.variants[layer] = variant
        pad = query.shape[2] - (e - s)  # a compiled forward's padded last chunk
        if pad:
            query, key, value = query[:, :, : e - s], key[:, :, : e - s], value[:, :, : e - s]
            if layer in self.engine.hidden_states:
                self.engine.hidden_states[layer] = self.engine.hidden_states[layer][:, : e - s]
        view = self.cache.update(layer, key, value, self.keep[layer], variant)
        self.kv_bytes[-1] += view.held_bytes
        self.kept += self.keep[layer][:, :, held_from(s, variant) : s].sum(dim=(1, 2))
        rows = query.shape[0]
        out, probs = attention.grouped_attention(
            query, view.keys[:rows], view.values[:rows], view.visible[:rows], scaling, self.settings.attn, variant
        )
        if self.shared:
            b = len(self.configs)
            query = query.expand(b, -1, -1, -1)
            probs = None if probs is None else probs.expand(b, -1, -1, -1)
            if layer in self.engine.hidden_states:
                self.engine.hidden_states[layer] = self.engine.hidden_states[layer].expand(b, -1, -1)
        for group in self.groups:
            self._score_and_decide(layer, group, query, view, probs, scaling, variant)
        if pad:
            out = F.pad(out, (0, 0, 0, pad))  # before the transpose: strides as an unpadded chunk's
        return out.transpose(1, 2)  # [B, c, H, D]

    def _score_and_decide(
        self,
        layer: int,
        group: _RowGroup,
        query: torch.Tensor,
        view: LayerView,
        probs: torch.Tensor | None,
        scaling: float,
        variant: attention.AttentionVariant,
    ) -> None:
        s, e, rows, press = self.start, self.end, group.rows, group.press
        rotary = self.engine.layer_rotaries[layer]
        narrowest, widest = group.windows.ranges[layer]
        decided = max(0, s - widest)  # keys before this were decided after earlier chunks, in every head
        if press.rescores:
            # Under a ranked policy every kept key stays a candidate, so all are rescored.
            score_from = decided if group.policy == "threshold" else 0
        else:
            score_from = s
        attention_probs = None
        if press.needs_attention:
            n_queries = press.attention_queries or (e - s)
            if probs is not None:
                attention_probs = view.at_positions(probs[rows, :, -n_queries:], rows)
            else:
                attention_probs = view.at_positions(
                    attention.attention_probabilities(
                        query[rows, :, -n_queries:],
                        view.keys[rows],
                        view.visible[rows, :, -n_queries:],
                        scaling,
                        variant,
                    ),
                    rows,
                )
        prerope = None
        if press.needs_prerope_queries:
            if rotary not in self.chunk_rope:
                self.chunk_rope[rotary] = rotary(torch.arange(s, e, device=query.device))
            prerope = rotary.unrotate(query[rows], *self.chunk_rope[rotary])
        # Keys inside every head's window are undecided, hence held; older ones may be evicted.
        keys, values, keys_from = view.for_press(rows, max(0, s - narrowest))
        ctx = LayerContext(
            layer=layer,
            start=s,
            end=e,
            score_from=score_from,
            keys=keys,
            values=values,
            keys_from=keys_from,
            queries=query[rows],
            visible=self.keep[layer][rows, :, :e],
            doc_seed=self.seed,
            attention=attention_probs,
            prerope_queries=prerope,
            hidden_states=self.engine.hidden_states[layer][rows] if press.needs_hidden_states else None,
            module=self.engine.attention_modules.get(layer),
            rotary=rotary,
        )
        self.scores[layer][rows, :, score_from:e] = press.score(ctx, group.state)
        if group.policy == "threshold":
            self._decide_by_threshold(layer, group, decided, max(0, e - narrowest))
        else:
            self._decide_by_budget(layer, group, max(0, e - narrowest))

    def _decide_by_threshold(self, layer: int, group: _RowGroup, decided: int, newly_decided: int) -> None:
        """The threshold rule (workers/decisions.py) on this layer's keys of ``group``; with
        per-head windows each head decides only the keys leaving its own window."""
        leaving = None
        narrowest, widest = group.windows.ranges[layer]
        if narrowest != widest and newly_decided > decided:
            positions = torch.arange(decided, newly_decided, device=self.engine.device)
            window = group.windows.protected_on_device[layer]  # [kv-heads, 1]
            leaving = (positions >= self.start - window) & (positions < self.end - window)
        rows = group.rows
        decide_by_threshold(
            self.keep[layer][rows], self.scores[layer][rows], group.thresholds, group.press.n_sink, decided,
            newly_decided, leaving,
        )  # fmt: skip

    def _decide_by_budget(self, layer: int, group: _RowGroup, boundary: int) -> None:
        rows = group.rows
        decide_by_budget(
            self.keep[layer][rows],
            self.scores[layer][rows],
            keep_limit(group.keep_fraction, group.budgets, self.end),
            group.press.n_sink,
            self.end,
            boundary,
        )


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


def held_from(start: int, variant: attention.AttentionVariant) -> int:
    """The first position a layer holds before chunk ``start`` when nothing is compressed: 0, or
    for a sliding-window layer the oldest key the chunk's first query can still see."""
    if variant.sliding_window is None:
        return 0
    return max(0, start - variant.sliding_window + 1)


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
