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
from dataclasses import dataclass

import torch
from torch.utils._pytree import register_dataclass

from workers.presses.base import LayerContext, Press, StateShape
from workers.presses.registry import register


@dataclass
class QueryTensors:
    """One layer's query statistics, as fixed-shape tensors updated in place. Window: the last
    ``query_window`` non-sink queries (positions -1 = empty slot), in position order. Running:
    count, mean and M2 (Chan merge). A pytree, so the compiled layer takes it as tensors."""

    recent: torch.Tensor | None = None  # [B, H, Q, D]
    recent_positions: torch.Tensor | None = None  # [Q] int64
    count: torch.Tensor | None = None  # 0-d int64
    mean: torch.Tensor | None = None  # [B, H, D]
    m2: torch.Tensor | None = None  # [B, H, D, D]


register_dataclass(QueryTensors)


@register
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

    def _future_rotation(self, ctx: LayerContext, head_dim: int) -> torch.Tensor:
        """The RoPE matrix averaged over the next ``n_future_positions`` positions: the same for
        every layer of one rotary (Gemma 3's local and global layers differ), so once per chunk."""
        key = (self.name, ctx.rotary, self.n_future_positions, head_dim)
        if key not in ctx.chunk_memo:
            future = ctx.end + torch.arange(self.n_future_positions, device=ctx.end.device)
            ctx.chunk_memo[key] = ctx.rotary.mean_rotation(future, head_dim)
        return ctx.chunk_memo[key]

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

    def init_state(self, shape: StateShape) -> list[QueryTensors]:
        return [self._layer_state(shape) for _ in range(shape.layers)]

    def _layer_state(self, shape: StateShape) -> QueryTensors:
        lead = (shape.rows, shape.heads)
        zeros = dict(device=shape.device, dtype=torch.float32)
        if self.stats == "window":
            return QueryTensors(
                recent=torch.zeros(*lead, self.query_window, shape.head_dim, **zeros),
                recent_positions=torch.full((self.query_window,), -1, device=shape.device),
            )
        return QueryTensors(
            count=torch.zeros((), dtype=torch.int64, device=shape.device),
            mean=torch.zeros(*lead, shape.head_dim, **zeros),
            m2=torch.zeros(*lead, shape.head_dim, shape.head_dim, **zeros),
        )

    def _update_statistics(
        self, ctx: LayerContext, st: QueryTensors
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(mean [B,H,D], cov [B,H,D,D], whether any query was seen) after adding the chunk's real
        non-sink queries, as masked sums over the chunk's fixed query rows."""
        q = ctx.prerope_queries.float()
        new = ctx.real_queries & (ctx.query_positions >= self.n_sink)  # [c]
        if self.stats == "window":
            # Every layer (and every row group of this press) sees the same query positions, so
            # which slots the window keeps is worked out once per chunk and reused.
            key = ("expected_attention.window", self.n_sink, self.query_window)
            if key not in ctx.chunk_memo:
                positions = torch.cat((st.recent_positions, torch.where(new, ctx.query_positions, -1)))
                last = torch.argsort(positions, stable=True)[-self.query_window :]
                held = (positions[last] >= 0).float()  # [Q]
                ctx.chunk_memo[key] = (last, positions[last], held, held.sum())
            last, kept_positions, held, count = ctx.chunk_memo[key]
            st.recent.copy_(torch.cat((st.recent, q), dim=2).index_select(2, last))
            st.recent_positions.copy_(kept_positions)
            window = st.recent
            mean = (window * held[:, None]).sum(dim=2) / count.clamp(min=1)
            centered = (window - mean[:, :, None]) * held[:, None]
            return mean, centered.transpose(2, 3) @ centered / count.clamp(min=1), count > 0
        weight = new.float()
        n_new = new.sum()
        mean_new = (q * weight[:, None]).sum(dim=2) / n_new.clamp(min=1)
        centered = (q - mean_new[:, :, None]) * weight[:, None]
        m2_new = centered.transpose(2, 3) @ centered
        n_old = st.count
        n = (n_old + n_new).clamp(min=1)
        delta = mean_new - st.mean
        merged_mean = st.mean + delta * (n_new / n)
        merged_m2 = st.m2 + m2_new + delta[..., :, None] * delta[..., None, :] * (n_old * n_new / n)
        added = n_new > 0
        st.mean.copy_(torch.where(added, merged_mean, st.mean))
        st.m2.copy_(torch.where(added, merged_m2, st.m2))
        count = st.count.add_(n_new)  # in place: ``st.count +=`` would also set the attribute
        return st.mean, st.m2 / count.clamp(min=1), count > 0

    def score(self, ctx: LayerContext, state: QueryTensors) -> torch.Tensor:
        mean, cov, has_stats = self._update_statistics(ctx, state)
        d = ctx.queries.shape[-1]
        keys = ctx.keys_at(ctx.scored).float()  # [B, Hkv, S, D]
        in_softmax = (ctx.scored >= torch.clamp(ctx.score_from, min=self.n_sink)) & (ctx.scored < ctx.end)
        logits = self._expected_logits(keys, mean, cov, self._future_rotation(ctx, d), ctx.n_groups)
        scores = torch.softmax(logits.masked_fill(~in_softmax, float("-inf")), dim=-1).mean(dim=2)
        if self.use_vnorm:
            values = ctx.values_at(ctx.scored).float()
            scores = (scores + self.epsilon) * values.norm(dim=-1)
        scores = torch.where(in_softmax & has_stats, scores, 0.0)
        return torch.where(ctx.scored < self.n_sink, float("inf"), scores)
