"""The evaluation protocol against independent references: full-sequence forwards with explicit
masks, the invariants of docs/DESIGN.md ("Invariants"), and batching/backend independence."""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import ClassVar

import pytest
import torch

from tests.helpers import chunk_sums, full_forward_nll
from workers.contract.configs import EvalConfig
from workers.contract.defaults import BACKENDS
from workers.contract.settings import EngineSettings
from workers.engine.core import Engine
from workers.modeling.attention import attention_probabilities, grouped_attention
from workers.presses import ALL_METHODS, REGISTRY, LayerContext, Press, parse_method

INF = float("inf")


def by_config(table) -> dict[str, list[dict]]:
    out: dict[str, list[dict]] = {}
    for row in table.to_pylist():
        out.setdefault(row["config"], []).append(row)
    return out


def default_configs() -> list[EvalConfig]:
    return [EvalConfig(REGISTRY[m](), tau) for m in ALL_METHODS for tau in REGISTRY[m].default_thresholds]


@pytest.mark.parametrize("attn", BACKENDS)
@pytest.mark.parametrize("chunk", [1, 64, 128])
def test_baseline_rows_equal_full_sequence_forward(tiny_model, tokens, attn, chunk):
    reference = chunk_sums(full_forward_nll(tiny_model, tokens), len(tokens), chunk)
    rows = Engine(tiny_model, EngineSettings(chunk, 32, attn)).evaluate(
        "d", tokens, [EvalConfig(parse_method("baseline"))]
    )
    got = [r["nll_sum"] for r in rows.to_pylist()]
    assert got == pytest.approx(reference, rel=1e-4)
    assert sum(r["n_tokens"] for r in rows.to_pylist()) == len(tokens) - 1


@pytest.mark.parametrize("method", ["window", "streaming_llm"])
@pytest.mark.parametrize("chunk,window", [(32, 48), (64, 64), (50, 0)])
def test_structural_presses_equal_masked_full_forward(tiny_model, tokens, method, chunk, window):
    """Chunked eviction == one forward where query i sees j <= i with j inside its chunk, the
    window before it, or the document's sinks: eviction by masking at absolute positions."""
    press = parse_method(method)
    n = len(tokens)
    i = torch.arange(n)[:, None]
    j = torch.arange(n)[None, :]
    chunk_start = (i // chunk) * chunk
    visible = (j <= i) & ((j >= chunk_start - window) | (j < press.n_sink))
    reference = chunk_sums(full_forward_nll(tiny_model, tokens, visible), n, chunk)
    rows = Engine(tiny_model, EngineSettings(chunk, window, "sdpa")).evaluate("d", tokens, [EvalConfig(press)])
    assert [r["nll_sum"] for r in rows.to_pylist()] == pytest.approx(reference, rel=1e-4)


def test_minus_infinite_threshold_equals_baseline(tiny_model, tokens):
    configs = [EvalConfig(parse_method("baseline"))] + [
        EvalConfig(REGISTRY[m](), -INF) for m in ALL_METHODS if REGISTRY[m].default_thresholds != (None,)
    ]
    rows = by_config(Engine(tiny_model, EngineSettings(64, 32)).evaluate("d", tokens, configs))
    baseline = [r["nll_sum"] for r in rows.pop("baseline")]
    assert len(rows) == len(configs) - 1
    for label, config_rows in rows.items():
        assert [r["nll_sum"] for r in config_rows] == pytest.approx(baseline, rel=1e-5), label
        assert all(r["keys_kept"] == r["keys_total"] for r in config_rows), label


def test_window_longer_than_document_equals_baseline(tiny_model, tokens):
    rows = by_config(Engine(tiny_model, EngineSettings(64, len(tokens))).evaluate("d", tokens, default_configs()))
    baseline = [r["nll_sum"] for r in rows["baseline"]]
    for label, config_rows in rows.items():
        assert [r["nll_sum"] for r in config_rows] == pytest.approx(baseline, rel=1e-5), label
        assert all(r["keys_kept"] == r["keys_total"] for r in config_rows), label


@dataclass(frozen=True)
class SpyPress(Press):
    """Random scores that change every chunk, recording what each chunk's queries could see."""

    name: ClassVar[str] = "spy"
    rescores: ClassVar[bool] = True
    needs_attention: ClassVar[bool] = True
    traceable: ClassVar[bool] = False  # Python lists
    seen: list = field(default_factory=list, compare=False, hash=False)  # (layer, start, visible)

    def score(self, ctx: LayerContext, state: None) -> torch.Tensor:
        """Records which keys before the chunk its first query attended to (probability > 0: an
        evicted key is masked to exactly 0), per query head."""
        start, layer = int(ctx.start), int(ctx.layer)
        self.seen.append((layer, start, ctx.attention[0, :, 0, :start] > 0))
        generator = torch.Generator().manual_seed(start * 31 + layer)
        return torch.rand(ctx.rows, ctx.kv_heads, ctx.scored.shape[0], generator=generator)


def test_evictions_are_irreversible(tiny_model, tokens):
    """Rescored keys flip above/below the threshold every chunk; an evicted key must stay gone."""
    press = SpyPress()
    Engine(tiny_model, EngineSettings(16, 16)).evaluate("d", tokens, [EvalConfig(press, 0.5)])
    for layer in (0, 1):
        masks = [(start, visible) for lay, start, visible in press.seen if lay == layer]
        evicted_any = False
        for (start, earlier), (_, later) in zip(masks, masks[1:]):
            evicted = ~earlier
            evicted_any |= bool(evicted.any())
            assert not later[:, :start][evicted].any(), f"layer {layer}: a key evicted before {start} came back"
        assert evicted_any


def test_density_columns_add_up(tiny_model, tokens):
    rows = Engine(tiny_model, EngineSettings(32, 48)).evaluate("d", tokens, default_configs()).to_pylist()
    heads = 2 * 2
    for r in rows:
        s = r["chunk_start"]
        assert r["keys_total"] == s * heads
        assert r["keys_kept"] + r["keys_discarded_outside_window"] == r["keys_total"]
        assert r["keys_in_window"] + r["keys_outside_window"] == r["keys_total"]
        assert r["keys_in_window"] == min(48, s) * heads
        assert r["keys_discarded_outside_window"] <= r["keys_outside_window"]
        assert r["keys_protected"] <= r["keys_kept"]
        assert r["keys_kept_unprotected"] == r["keys_kept"] - r["keys_protected"]
        assert 0 <= r["keys_kept_unprotected"] <= r["keys_total"] - r["keys_protected"]
    assert any(r["keys_discarded_outside_window"] > 0 for r in rows)


@pytest.mark.parametrize("chunk", [16, 64])
def test_streaming_llm_keeps_exactly_sinks_and_window(tiny_model, tokens, chunk):
    window, heads = 40, 4
    rows = Engine(tiny_model, EngineSettings(chunk, window)).evaluate(
        "d", tokens, [EvalConfig(parse_method("streaming_llm"))]
    )
    for r in rows.to_pylist():
        s = r["chunk_start"]
        expected = len(set(range(min(4, s))) | set(range(max(0, s - window), s)))
        assert r["keys_kept"] == expected * heads
        assert r["keys_protected"] == expected * heads
        assert r["keys_kept_unprotected"] == 0


def assert_rows_equal(a: list[dict], b: list[dict], rel: float) -> None:
    assert len(a) == len(b)
    for x, y in zip(a, b):
        assert x["nll_sum"] == pytest.approx(y["nll_sum"], rel=rel)
        assert x["n_correct"] == y["n_correct"]
        assert x["keys_kept"] == y["keys_kept"]


def test_batched_configs_equal_each_config_alone(tiny_model, tokens):
    configs = default_configs() + [
        EvalConfig(parse_method("random"), 0.3),
        EvalConfig(parse_method("expected_attention:stats=running"), 0.02),
    ]
    engine = Engine(tiny_model, EngineSettings(48, 32))
    batched = by_config(engine.evaluate("d", tokens, configs))
    assert set(batched) == {c.label for c in configs}
    for config in configs:
        alone = engine.evaluate("d", tokens, [config]).to_pylist()
        assert_rows_equal(batched[config.label], alone, rel=1e-5)


def test_eager_and_sdpa_give_the_same_rows(tiny_model, tokens):
    eager = by_config(Engine(tiny_model, EngineSettings(64, 32, "eager")).evaluate("d", tokens, default_configs()))
    sdpa = by_config(Engine(tiny_model, EngineSettings(64, 32, "sdpa")).evaluate("d", tokens, default_configs()))
    for label in eager:
        assert_rows_equal(eager[label], sdpa[label], rel=1e-5)


def test_attention_probabilities_equal_eager_softmax():
    g = torch.Generator().manual_seed(3)
    q = torch.randn(3, 6, 5, 8, generator=g)
    k = torch.randn(3, 2, 20, 8, generator=g)
    v = torch.randn(3, 2, 20, 8, generator=g)
    visible = torch.rand(3, 2, 5, 20, generator=g) > 0.4
    visible[..., 0] = True
    probs = attention_probabilities(q, k, visible, 0.3)
    # naive: repeat each kv-head for its group of query heads, mask, softmax
    kk = k.repeat_interleave(3, dim=1)
    mask = visible.repeat_interleave(3, dim=1)
    naive = torch.softmax((q @ kk.transpose(2, 3) * 0.3).masked_fill(~mask, -INF), dim=-1)
    torch.testing.assert_close(probs, naive, rtol=1e-5, atol=1e-6)
    out_eager, probs_eager = grouped_attention(q, k, v, visible, 0.3, "eager")
    out_sdpa, _ = grouped_attention(q, k, v, visible, 0.3, "sdpa")
    torch.testing.assert_close(probs_eager, naive, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(out_eager, naive @ v.repeat_interleave(3, dim=1), rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(out_sdpa, out_eager, rtol=1e-5, atol=1e-5)


def test_embedded_model_baseline_equals_full_forward(smollm2, smollm2_tokenizer):
    from orchestrator.corpus import load_corpus
    from workers.contract.tokenization import resolve

    ids = torch.tensor(resolve(smollm2_tokenizer, "auto").ids(load_corpus("pydoc")[0].text, 300))
    reference = chunk_sums(full_forward_nll(smollm2, ids), len(ids), 128)
    rows = Engine(smollm2, EngineSettings(128, 128, "sdpa")).evaluate("d", ids, [EvalConfig(parse_method("baseline"))])
    got = [r["nll_sum"] for r in rows.to_pylist()]
    assert got == pytest.approx(reference, rel=1e-4)
    assert math.exp(sum(got) / (len(ids) - 1)) < 100  # real trained weights, not noise


def test_ratio_policy_keeps_the_budget_of_best_scores(tiny_model, tokens):
    """kept <= ceil((1 - r) * seen) per (layer, head) with sinks and window counted, filled by
    the highest-scoring keys: with knorm and window 0, the kept set is the shortest keys."""
    window, chunk, ratio = 16, 32, 0.6
    rows, scores = Engine(tiny_model, EngineSettings(chunk, window)).inspect(
        "d", tokens, [EvalConfig(parse_method("knorm"), ratio=ratio), EvalConfig(parse_method("random"), ratio=ratio)]
    )
    for r in rows.to_pylist():
        s, n_sink = r["chunk_start"], r["n_sink"]
        protected = len(set(range(min(n_sink, s))) | set(range(max(0, s - window), s)))
        assert r["keys_kept"] == max(math.ceil((1 - ratio) * s), protected) * 4, r
        assert r["policy"] == "ratio" and r["ratio"] == ratio


def test_ratio_policy_matches_a_naive_simulation(tokens):
    """One layer (keys independent of evictions) and knorm's fixed scores: replay the budget rule
    key by key in plain Python and compare the final kept sets."""
    from tests.helpers import tiny_llama

    window, chunk, ratio = 16, 32, 0.6
    _, dump = Engine(tiny_llama(n_layers=1), EngineSettings(chunk, window)).inspect(
        "d", tokens, [EvalConfig(parse_method("knorm"), ratio=ratio)]
    )
    n = len(tokens)
    for head in range(2):
        score = dump.scores[0, 0, head].tolist()
        kept = set()
        for e in range(chunk, n + 1, chunk) if n % chunk == 0 else [*range(chunk, n, chunk), n]:
            kept |= set(range(e - chunk, e))
            boundary = max(0, e - window)
            candidates = sorted((p for p in kept if p < boundary), key=lambda p: -score[p])
            allowed = max(0, math.ceil((1 - ratio) * e) - (e - boundary))
            kept -= set(candidates[allowed:])
        assert kept == set(torch.nonzero(dump.kept[0, 0, head]).flatten().tolist())
