"""The rows of a document run: which batch row is which config, each press group's windows,
and the table of one row per (chunk, config) built from the step's per-chunk results.

Density on sliding-window layers: such a layer holds, uncompressed, only the keys its next query
can see (the last ``sliding_window - 1`` before the chunk). The density columns count against
that: ``keys_total`` sums what each layer holds uncompressed, and a kept key outside a layer's
sliding window is not counted as kept (the model no longer holds it). So the baseline's density is
1 on every family, and a press's density is "kept / what the uncompressed model holds".
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import pyarrow as pa
import torch

from workers.contract.allocation import UNIFORM, Allocation
from workers.contract.configs import RANKED_POLICIES, EvalConfig
from workers.contract.plan import AnswerSpan
from workers.contract.schema import GENERATION_COLUMNS, ROW_SCHEMA
from workers.contract.settings import EngineSettings, chunk_bounds
from workers.engine.allocation import head_shares
from workers.engine.chunk_results import ChunkResults
from workers.modeling import attention
from workers.presses import Press
from workers.presses.baseline import BaselinePress


@dataclass
class RowGroup:
    """Consecutive batch rows that share one press, policy and allocation (differing by
    threshold, ratio or budget)."""

    press: Press
    policy: str  # one of workers.contract.configs.POLICIES
    rows: slice
    thresholds: torch.Tensor  # [n_rows, 1, 1]
    keep_fraction: torch.Tensor  # [n_rows] float64: 1 - compression ratio (ratio policy), else 1
    budgets: torch.Tensor  # [n_rows] int64: the token budget (budget policy), else unbounded
    windows: HeadWindows
    allocation: Allocation = UNIFORM
    # [layers, kv-heads] float64 on the device: a file allocation's shares, averaging 1.
    shares: torch.Tensor | None = None


@dataclass
class HeadWindows:
    """The windows of one press, per (layer, kv-head), clamped to the document length.

    ``counted`` is what the density columns call "in window" (the DMS window, or a head-aware
    press's windows); ``protected`` adds the press's own local window (H2O's 512). Keys older
    than ``protected`` are decided by score. Most presses have one window for every head.
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
        protected = press.protected(counted).clamp(max=n)
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
    each press's rows are contiguous (presses then work on slices), grouped by (press, policy,
    allocation),
    with each group's windows clamped to ``n`` positions.

    With ``agreement`` the baseline's row is the ``reference`` of the agreement columns; a batch
    without one gets it as an extra ``hidden`` row, run like any other but never written (the
    run's own baseline rows come from the batch that asked for it).
    """

    def __init__(
        self,
        model_config: Any,
        settings: EngineSettings,
        configs: list[EvalConfig],
        n: int,
        agreement: bool,
        device: torch.device,
        worker: str,
    ) -> None:
        cfg = model_config
        add_reference = agreement and not any(c.is_baseline for c in configs)
        if add_reference:
            configs = [*configs, EvalConfig(BaselinePress())]
        self.settings, self.device, self.worker = settings, device, worker
        self.n = n
        self.n_layers = cfg.num_hidden_layers
        self.n_kv_heads = getattr(cfg, "num_key_value_heads", None) or cfg.num_attention_heads
        by_press: dict[tuple[Press, str, Allocation], list[int]] = {}
        for i, config in enumerate(configs):
            by_press.setdefault((config.press, config.policy, config.allocation), []).append(i)
        self.order = [i for rows in by_press.values() for i in rows]
        self.configs = [configs[i] for i in self.order]
        self.reference = next((r for r, c in enumerate(self.configs) if c.is_baseline), None) if agreement else None
        self.hidden = self.reference if add_reference else None
        self.groups: list[RowGroup] = []
        head_shape = (self.n_layers, cfg.num_attention_heads, self.n_kv_heads)
        first = 0
        for (press, policy, allocation), rows in by_press.items():
            taus = torch.tensor([configs[i].engine_threshold for i in rows], device=device)
            ratios = torch.tensor([configs[i].ratio or 0.0 for i in rows], device=device, dtype=torch.float64)
            budgets = [configs[i].budget for i in rows]
            unbounded = torch.iinfo(torch.int64).max
            self.groups.append(
                RowGroup(
                    press=press,
                    policy=policy,
                    rows=slice(first, first + len(rows)),
                    thresholds=taus.view(-1, 1, 1),
                    keep_fraction=(1.0 - ratios),
                    budgets=torch.tensor([unbounded if b is None else b for b in budgets], device=device),
                    windows=HeadWindows.of(press, settings.window, head_shape, n, device),
                    allocation=allocation,
                    shares=head_shares(allocation, self.n_layers, self.n_kv_heads, device),
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
        bounds: list[tuple[int, int]] | None = None,
        head_kept: list[list[list[int]]] | None = None,
    ) -> pa.Table:
        """One row per (chunk, config) in ROW_SCHEMA, from the per-chunk [chunks, B] results
        (on the CPU). The hidden reference row, if any, is not written. ``bounds``: the chunks
        the document ran in when not the chunk size's (a question task's prompt), the last one
        ending with the document. ``head_kept``: per row, [layers][kv-heads] the keys kept at the
        document's end, written on each config's last chunk row (null elsewhere)."""
        if bounds is None:
            bounds = chunk_bounds(self.n, self.settings.chunk_size)
        n_document = bounds[-1][1]
        group_of = {r: g for g in self.groups for r in range(g.rows.start, g.rows.stop)}
        columns: dict[str, list] = {f.name: [] for f in ROW_SCHEMA}
        variants = [variant or attention.GLOBAL for variant in variants]
        identities = [self._identity(config, group_of[r]) for r, config in enumerate(self.configs)]
        for k, (s, e) in enumerate(bounds):
            first_held = torch.tensor([[held_from(s, v)] for v in variants], dtype=torch.int64)  # [layers, 1]
            keys_total = int((s - first_held).sum()) * self.n_kv_heads
            counted = {id(g): g.windows.at(s, g.press.n_sink, first_held) for g in self.groups}
            n_targets = max(0, min(e, n_document - 1) - s)
            for r in range(len(self.configs)):
                if r == self.hidden:
                    continue
                in_window, protected = counted[id(group_of[r])]
                n_kept = int(results.kept[k, r])
                row = {
                    **identities[r],
                    "doc_id": doc_id,
                    "chunk_index": k,
                    "chunk_start": s,
                    "chunk_end": e,
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
                    **_optional_columns(results, k, r, answer.targets_in(s, n_targets) if answer else None),
                    "head_kept": head_kept[r] if head_kept is not None and k == len(bounds) - 1 else None,
                }
                for name, value in row.items():
                    columns[name].append(value)
        return pa.Table.from_pydict(columns, schema=ROW_SCHEMA)

    def _identity(self, config: EvalConfig, group: RowGroup) -> dict[str, object]:
        """A config's columns that every one of its rows repeats (formatted once, not per chunk)."""
        return {
            "config": config.label,
            "press": config.sweep,
            "method_params": config.press.params_json(),
            "threshold": config.threshold,
            "policy": config.policy,
            "ratio": config.ratio,
            "budget": config.budget,
            "allocation": config.allocation.label,
            "window": group.windows.mean,
            "n_sink": config.press.n_sink,
            "protected_window": config.press.protected_window,
            "batch_size": len(self.configs),
            "worker": self.worker,
            "device": str(self.device),
            "method": config.method,
        }


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
        **dict.fromkeys(GENERATION_COLUMNS),  # a question's answer: with_answers fills them
    }


def with_answers(rows: pa.Table, answers: dict[str, dict[str, object]]) -> pa.Table:
    """``rows`` with each config's generated answer (``answers``: config label -> a value per
    GENERATION_COLUMNS) on its last chunk row, the one that read the end of the prompt."""
    configs, chunks = rows.column("config").to_pylist(), rows.column("chunk_index").to_pylist()
    last = {}
    for i, (config, chunk) in enumerate(zip(configs, chunks, strict=True)):
        if chunk >= chunks[last.get(config, i)]:
            last[config] = i
    at = {i: answers[config] for config, i in last.items() if config in answers}
    for name in GENERATION_COLUMNS:
        index = rows.schema.get_field_index(name)
        values = [at[i][name] if i in at else None for i in range(rows.num_rows)]
        rows = rows.set_column(index, rows.schema.field(index), pa.array(values, rows.schema.field(index).type))
    return rows


def held_from(start: int, variant: attention.AttentionVariant) -> int:
    """The first position a layer holds before chunk ``start`` when nothing is compressed: 0, or
    for a sliding-window layer the oldest key the chunk's first query can still see."""
    if variant.sliding_window is None:
        return 0
    return max(0, start - variant.sliding_window + 1)
