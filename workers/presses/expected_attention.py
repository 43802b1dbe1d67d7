"""Expected Attention (Devoto et al., 2025, arXiv:2510.00636; kvpress ExpectedAttentionPress).

Future queries are modelled as a Gaussian fitted to the pre-RoPE queries seen so far (mean mu,
covariance Sigma), rotated by the RoPE matrix averaged over the next ``n_future_positions``
absolute positions (R). The expected attention logit of a post-RoPE key k is then
``k.(R mu)/sqrt(d) + 1/2 k^T (R Sigma R^T) k / d``. Following kvpress so thresholds carry
over: softmax over the keys scored in the call, mean over the GQA group, then
``(s + epsilon) * ||v||`` when ``use_vnorm``.

Departures from kvpress's chunked use, both deliberate: the future positions start at the
chunk's absolute end (kvpress starts them at the chunk length), and the excluded sink queries
and protected sink keys are the document's first ``n_sink`` positions (kvpress drops the first
positions of every call). The press rescores every undecided key each chunk, so a key is judged
with the statistics current when it leaves the window.

``stats="window"`` fits the Gaussian to the last ``query_window`` queries; ``stats="running"``
to every query seen so far in the document (Welford/Chan merge), as a llama.cpp integration
would accumulate.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch

from workers.presses.base import ChunkTensors, LayerContext, Press, StateShape
from workers.rope import LayerRotary


@dataclass
class QueryStatistics:
    """Per layer: the recent queries (window) or count/mean/M2 (running), per row and head."""

    recent: list[torch.Tensor | None]
    count: list[int]
    mean: list[torch.Tensor | None]
    m2: list[torch.Tensor | None]
    # Per RoPE (one per layer type: Gemma 3's local and global layers differ), the chunk end and
    # averaged RoPE matrix of that end: the same for every layer of the type, so computed once per chunk.
    rotations: dict[LayerRotary, tuple[int, torch.Tensor]] = field(default_factory=dict)

    @classmethod
    def empty(cls, n_layers: int) -> QueryStatistics:
        return cls([None] * n_layers, [0] * n_layers, [None] * n_layers, [None] * n_layers)

    def future_rotation(self, ctx: LayerContext, n_future: int, head_dim: int) -> torch.Tensor:
        cached = self.rotations.get(ctx.rotary)
        if cached is None or cached[0] != ctx.end:
            future = torch.arange(ctx.end, ctx.end + n_future, device=ctx.keys.device)
            cached = self.rotations[ctx.rotary] = (ctx.end, ctx.rotary.mean_rotation(future, head_dim))
        return cached[1]


@dataclass
class QueryTensors:
    """:class:`QueryStatistics` as fixed-shape tensors for the compiled step, per layer in the
    first axis. Window: the last ``query_window`` non-sink queries (positions -1 = empty slot),
    in position order. Running: count, mean and M2 (Chan merge)."""

    recent: torch.Tensor | None = None  # [L, B, H, Q, D]
    recent_positions: torch.Tensor | None = None  # [L, Q] int64
    count: torch.Tensor | None = None  # [L] int64
    mean: torch.Tensor | None = None  # [L, B, H, D]
    m2: torch.Tensor | None = None  # [L, B, H, D, D]


@dataclass(frozen=True)
class ExpectedAttentionPress(Press):
    name = "expected_attention"
    default_thresholds = (0.01,)
    rescores = True
    reads_keys = True
    needs_prerope_queries = True
    n_sink: int = 4
    n_future_positions: int = 512
    use_covariance: bool = True
    use_vnorm: bool = True
    epsilon: float = 0.0
    stats: str = "window"
    query_window: int = 128

    def __post_init__(self) -> None:
        if self.stats not in ("window", "running"):
            raise ValueError(f"expected_attention: stats must be 'window' or 'running', got {self.stats!r}")

    def init_state(
        self, n_rows: int, n_layers: int, n_kv_heads: int, n_positions: int, device: torch.device
    ) -> QueryStatistics:
        return QueryStatistics.empty(n_layers)

    def _update_statistics(self, ctx: LayerContext, st: QueryStatistics) -> tuple[torch.Tensor, torch.Tensor] | None:
        """Add this chunk's non-sink queries; return (mean [B,H,D], cov [B,H,D,D]) or None."""
        layer = ctx.layer
        q = ctx.prerope_queries[:, :, max(0, self.n_sink - ctx.start) :].float()
        if self.stats == "window":
            if q.shape[2]:
                prev = st.recent[layer]
                q = q if prev is None else torch.cat((prev, q), dim=2)
                st.recent[layer] = q[:, :, -self.query_window :]
            window = st.recent[layer]
            if window is None:
                return None
            mean = window.mean(dim=2)
            centered = window - mean[:, :, None]
            return mean, centered.transpose(2, 3) @ centered / window.shape[2]
        n_new = q.shape[2]
        if n_new:
            mean_new = q.mean(dim=2)
            centered = q - mean_new[:, :, None]
            m2_new = centered.transpose(2, 3) @ centered
            n_old = st.count[layer]
            if n_old == 0:
                st.mean[layer], st.m2[layer] = mean_new, m2_new
            else:
                n = n_old + n_new
                delta = mean_new - st.mean[layer]
                st.mean[layer] = st.mean[layer] + delta * (n_new / n)
                st.m2[layer] = st.m2[layer] + m2_new + delta[..., :, None] * delta[..., None, :] * (n_old * n_new / n)
            st.count[layer] += n_new
        if st.count[layer] == 0:
            return None
        return st.mean[layer], st.m2[layer] / st.count[layer]

    def _expected_logits(
        self, keys: torch.Tensor, mean: torch.Tensor, cov: torch.Tensor, rot: torch.Tensor, n_groups: int
    ) -> torch.Tensor:
        """[B, Hkv, groups, n] expected logits of keys [B, Hkv, n, D] under the query Gaussian
        (mean [B, H, D], cov [B, H, D, D]) rotated by the averaged future RoPE ``rot``."""
        b, hkv, _, d = keys.shape
        mu = (mean @ rot.T).view(b, hkv, n_groups, d)
        logits = torch.einsum("bhnd,bhgd->bhgn", keys, mu) / math.sqrt(d)
        if self.use_covariance:
            sigma = (rot @ cov @ rot.T).view(b, hkv, n_groups, d, d)
            projected = torch.einsum("bhnd,bhgde->bhgne", keys, sigma)
            logits = logits + (projected * keys[:, :, None]).sum(dim=-1) / d / 2
        return logits

    def score(self, ctx: LayerContext, state: QueryStatistics) -> torch.Tensor:
        stats = self._update_statistics(ctx, state)
        b, hkv, _, d = ctx.keys.shape
        lo = max(ctx.score_from, self.n_sink)
        n_sinks_scored = lo - ctx.score_from
        keys = ctx.keys_at(lo, ctx.end).float()
        if stats is None or keys.shape[2] == 0:
            scores = torch.zeros(b, hkv, keys.shape[2], device=keys.device)
        else:
            rot = state.future_rotation(ctx, self.n_future_positions, d)
            scores = torch.softmax(self._expected_logits(keys, *stats, rot, ctx.n_groups), dim=-1).mean(dim=2)
            if self.use_vnorm:
                values = ctx.values_at(lo, ctx.end).float()
                scores = (scores + self.epsilon) * values.norm(dim=-1)
        sinks = torch.full((b, hkv, n_sinks_scored), float("inf"), device=keys.device)
        return torch.cat((sinks, scores), dim=2)

    # --- the compiled step's form: the same statistics and scores over fixed shapes --------------

    def init_chunk_state(self, shape: StateShape) -> QueryTensors:
        lead = (shape.layers, shape.rows, shape.heads)
        zeros = dict(device=shape.device, dtype=torch.float32)
        if self.stats == "window":
            return QueryTensors(
                recent=torch.zeros(*lead, self.query_window, shape.head_dim, **zeros),
                recent_positions=torch.full((shape.layers, self.query_window), -1, device=shape.device),
            )
        return QueryTensors(
            count=torch.zeros(shape.layers, dtype=torch.int64, device=shape.device),
            mean=torch.zeros(*lead, shape.head_dim, **zeros),
            m2=torch.zeros(*lead, shape.head_dim, shape.head_dim, **zeros),
        )

    def _update_chunk_statistics(
        self, ctx: ChunkTensors, st: QueryTensors
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(mean [B,H,D], cov [B,H,D,D], whether any query was seen) after adding the chunk's real
        non-sink queries; masked sums where :meth:`_update_statistics` slices."""
        layer = ctx.layer
        q = ctx.prerope_queries.float()
        new = ctx.real_queries & (ctx.query_positions >= self.n_sink)  # [c]
        if self.stats == "window":
            queries = torch.cat((st.recent[layer], q), dim=2)
            positions = torch.cat((st.recent_positions[layer], torch.where(new, ctx.query_positions, -1)))
            last = torch.argsort(positions, stable=True)[-self.query_window :]
            st.recent[layer].copy_(queries.index_select(2, last))
            st.recent_positions[layer].copy_(positions[last])
            held = (st.recent_positions[layer] >= 0).float()  # [Q]
            count = held.sum()
            window = st.recent[layer]
            mean = (window * held[:, None]).sum(dim=2) / count.clamp(min=1)
            centered = (window - mean[:, :, None]) * held[:, None]
            return mean, centered.transpose(2, 3) @ centered / count.clamp(min=1), count > 0
        weight = new.float()
        n_new = new.sum()
        mean_new = (q * weight[:, None]).sum(dim=2) / n_new.clamp(min=1)
        centered = (q - mean_new[:, :, None]) * weight[:, None]
        m2_new = centered.transpose(2, 3) @ centered
        n_old = st.count[layer]
        n = (n_old + n_new).clamp(min=1)
        delta = mean_new - st.mean[layer]
        merged_mean = st.mean[layer] + delta * (n_new / n)
        merged_m2 = st.m2[layer] + m2_new + delta[..., :, None] * delta[..., None, :] * (n_old * n_new / n)
        added = n_new > 0
        st.mean[layer].copy_(torch.where(added, merged_mean, st.mean[layer]))
        st.m2[layer].copy_(torch.where(added, merged_m2, st.m2[layer]))
        st.count[layer] += n_new
        count = st.count[layer]
        return st.mean[layer], st.m2[layer] / count.clamp(min=1), count > 0

    def score_chunk(self, ctx: ChunkTensors, state: QueryTensors) -> torch.Tensor:
        mean, cov, has_stats = self._update_chunk_statistics(ctx, state)
        b, hkv, _, d = ctx.keys.shape
        keys = ctx.keys.index_select(2, ctx.scored).float()  # [B, Hkv, S, D]
        in_softmax = (ctx.scored >= torch.clamp(ctx.score_from, min=self.n_sink)) & (ctx.scored < ctx.end)
        future = ctx.end + torch.arange(self.n_future_positions, device=keys.device)
        logits = self._expected_logits(keys, mean, cov, ctx.rotary.mean_rotation(future, d), ctx.n_groups)
        scores = torch.softmax(logits.masked_fill(~in_softmax, float("-inf")), dim=-1).mean(dim=2)
        if self.use_vnorm:
            values = ctx.values.index_select(2, ctx.scored).float()
            scores = (scores + self.epsilon) * values.norm(dim=-1)
        scores = torch.where(in_softmax & has_stats, scores, 0.0)
        return torch.where(ctx.scored < self.n_sink, float("inf"), scores)
