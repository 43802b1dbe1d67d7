"""Every scorer against an independent computation done the naive way: attention weights from
an eager full forward, Monte-Carlo expected attention, numpy statistics."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from tests.helpers import layer_context, tiny_llama
from workers.contract.configs import EvalConfig
from workers.contract.settings import EngineSettings
from workers.engine.core import Engine
from workers.modeling.rope import LayerRotary, rotate_half
from workers.presses import StateShape, parse_method

N = 192


@pytest.fixture(scope="module")
def model():
    return tiny_llama()


@pytest.fixture(scope="module")
def ids():
    return torch.randint(0, 97, (N,), generator=torch.Generator().manual_seed(5))


@pytest.fixture(scope="module")
def eager_attention(model, ids):
    """[layers, heads, N, N] attention weights of an ordinary eager forward."""
    model.set_attn_implementation("eager")
    with torch.no_grad():
        out = model(ids[None], output_attentions=True)
    return torch.stack([a[0] for a in out.attentions]).double()


def final_scores(model, ids, method: str, attn: str = "sdpa", chunk: int = 64) -> torch.Tensor:
    """[layers, kv-heads, N]: with the window over the whole document no key is ever decided, so
    rescoring presses hold the scores computed from every query of the document."""
    _, scores = Engine(model, EngineSettings(chunk, N, attn)).inspect("d", ids, [EvalConfig(parse_method(method), 0.0)])
    return scores.scores[0].double()


def group_mean(per_head: torch.Tensor, groups: int = 2) -> torch.Tensor:
    """[layers, heads, N] -> [layers, kv-heads, N]: mean over each kv-head's query heads."""
    layers, heads, n = per_head.shape
    return per_head.view(layers, heads // groups, groups, n).mean(dim=2)


@pytest.mark.parametrize("attn", ["eager", "sdpa"])
def test_observed_attention_is_mean_received_attention(model, ids, eager_attention, attn):
    received = eager_attention.sum(dim=2)  # [L, H, N] summed over queries
    seen_by = torch.arange(N, 0, -1, dtype=torch.float64)
    expected = group_mean(received) / seen_by
    torch.testing.assert_close(final_scores(model, ids, "observed_attention", attn), expected, rtol=1e-4, atol=1e-6)


def test_h2o_is_accumulated_received_attention(model, ids, eager_attention):
    expected = group_mean(eager_attention.sum(dim=2))
    torch.testing.assert_close(final_scores(model, ids, "h2o"), expected, rtol=1e-4, atol=1e-6)


def naive_snapkv(attention: torch.Tensor, start: int, window_size: int, kernel_size: int) -> torch.Tensor:
    """SnapKV of the chunk [start, n) by explicit loops over [layers, heads, n, n] eager probabilities:
    the observation window is the chunk's last min(window_size, n - start) queries; key j < first
    (the first observing query) scores the mean over the GQA group and over a kernel of offsets of
    the window-averaged attention, counting keys outside [0, first) as zero (kvpress's zero-padded
    pool over the keys before the window); the window's own keys score +inf."""
    layers, heads, n, _ = attention.shape
    first = n - min(window_size, n - start)
    expected = torch.full((layers, heads // 2, n), float("inf"), dtype=torch.float64)
    half = kernel_size // 2
    for layer in range(layers):
        for kv in range(heads // 2):
            for j in range(first):
                total = 0.0
                for h in (2 * kv, 2 * kv + 1):
                    for key in range(j - half, j + half + 1):
                        if 0 <= key < first:
                            total += float(attention[layer, h, first:, key].mean())
                expected[layer, kv, j] = total / (2 * kernel_size)
    return expected


@pytest.mark.parametrize(
    ("n", "chunk", "window_size", "kernel_size"),
    [
        (96, 96, 16, 7),  # a first chunk, observation window shorter than the chunk
        (192, 64, 64, 5),  # the defaults: the last chunk is the observation window
        (176, 64, 96, 5),  # a last chunk of 48 shorter than window_size: its 48 queries observe
    ],
)
def test_snapkv_pools_only_the_keys_before_the_observation_window(
    model, ids, eager_attention, n, chunk, window_size, kernel_size
):
    """With the DMS window over the whole document no key is decided, so each key holds the last
    chunk's SnapKV score; the keys just before the observation window are where pooling over the
    window's own columns would differ."""
    press = parse_method(f"snapkv:window_size={window_size},kernel_size={kernel_size}")
    _, scores = Engine(model, EngineSettings(chunk, n)).inspect("d", ids[:n], [EvalConfig(press, 0.0)])
    # A causal forward's attention over a prefix is the full forward's, cut to the prefix.
    expected = naive_snapkv(eager_attention[:, :, :n, :n], (n - 1) // chunk * chunk, window_size, kernel_size)
    torch.testing.assert_close(scores.scores[0].double(), expected, rtol=1e-4, atol=1e-6)


def test_tova_is_last_query_attention_averaged_over_heads(model, ids, eager_attention):
    last = eager_attention[:, :, -1].mean(dim=1)  # [L, N]
    expected = last[:, None].expand(-1, 2, -1).clone()
    expected[:, :, -1] = float("inf")
    torch.testing.assert_close(final_scores(model, ids, "tova"), expected, rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize("method", ["observed_attention", "h2o", "snapkv", "tova", "expected_attention", "knorm"])
def test_scores_identical_under_eager_and_sdpa(model, ids, method):
    torch.testing.assert_close(
        final_scores(model, ids, method, "eager"), final_scores(model, ids, method, "sdpa"), rtol=1e-5, atol=1e-7
    )


def test_sinks_are_absolute_positions(model, ids):
    """With window 0 only sinks survive; the same first positions whatever the chunk size."""
    for chunk in (64, 128):
        _, scores = Engine(model, EngineSettings(chunk, 0)).inspect(
            "d", ids, [EvalConfig(parse_method("streaming_llm"))]
        )
        kept = scores.kept[0]
        assert kept[..., :4].all() and not kept[..., 4:].any(), chunk


def _ea_context(n_future: int):
    """A LayerContext with random keys and pre-RoPE queries rotated by a real model's RoPE."""
    g = torch.Generator().manual_seed(11)
    rope_model = tiny_llama()
    rotary = rope_model.model.rotary_emb
    start, end, d = 100, 140, 8

    def cos_sin(positions):
        cos, sin = rotary(torch.zeros(1), positions[None])
        return cos[0], sin[0]

    queries = 0.7 * torch.randn(1, 4, end - start, d, generator=g) + torch.tensor(
        [0.5, -0.3, 0.2, 0.1, 0, 0.4, -0.2, 0.3]
    )
    keys = 0.6 * torch.randn(1, 2, end, d, generator=g)
    ctx = layer_context(
        start, end, end - 30, keys, torch.ones(1, 2, end, d), queries,
        prerope_queries=queries, rotary=LayerRotary(cos_sin, rotate_half),
    )  # fmt: skip
    return ctx, cos_sin


@pytest.mark.parametrize("n_future", [1, 16])
def test_expected_attention_matches_monte_carlo(n_future):
    """E[exp(q.k/sqrt d)] for q ~ N(mu, Sigma) of the chunk's queries, mapped to the future by the
    RoPE rotation averaged over the next n_future absolute positions (exact for n_future=1),
    normalised over the scored keys and averaged over the GQA group as kvpress does."""
    ctx, cos_sin = _ea_context(n_future)
    press = parse_method(f"expected_attention:n_future_positions={n_future},use_vnorm=false,n_sink=0")
    shape = StateShape(1, 1, 4, 2, 8, int(ctx.end), torch.device("cpu"))
    scores = press.score(ctx, press.init_state(shape)[0])[0].double()  # [Hkv, 30]: the scored positions

    q = ctx.prerope_queries[0].double()  # [H, c, d]
    mu = q.mean(dim=1)
    cov = torch.stack([torch.cov(qh.T, correction=0) for qh in q])
    cos, sin = cos_sin(torch.arange(ctx.end, ctx.end + n_future))
    torch.manual_seed(0)
    samples = torch.distributions.MultivariateNormal(mu, covariance_matrix=cov + 1e-9 * torch.eye(8)).sample((200_000,))
    # R_bar q = mean over future positions p of R(p) q
    half = 4
    rotated = torch.zeros_like(samples)
    for p in range(n_future):
        c, s = cos[p].double(), sin[p].double()
        rot_half = torch.cat((-samples[..., half:], samples[..., :half]), dim=-1)
        rotated += samples * c + rot_half * s
    rotated /= n_future
    keys = ctx.keys_at(torch.arange(int(ctx.score_from), int(ctx.end)))[0].double()  # [Hkv, n, d]
    heads_per_kv = 2
    expected = []
    for kv in range(2):
        per_head = []
        for h in range(kv * heads_per_kv, (kv + 1) * heads_per_kv):
            mc = torch.exp(rotated[:, h] @ keys[kv].T / math.sqrt(8)).mean(dim=0)  # [n]
            per_head.append(mc / mc.sum())
        expected.append(torch.stack(per_head).mean(dim=0))
    torch.testing.assert_close(scores, torch.stack(expected), rtol=2e-2, atol=1e-4)


def test_running_statistics_equal_numpy_over_all_queries():
    press = parse_method("expected_attention:stats=running")
    state = press.init_state(StateShape(1, 1, 3, 1, 4, 200, torch.device("cpu")))[0]  # layer 0
    g = torch.Generator().manual_seed(2)
    seen = []
    for start in range(0, 200, 50):
        q = torch.randn(1, 3, 50, 4, generator=g) * torch.tensor([1.0, 2.0, 0.5, 1.5]) + 3
        keys = torch.zeros(1, 1, start + 50, 4)
        ctx = layer_context(start, start + 50, start, keys, keys, q, prerope_queries=q)
        mean, cov, seen_any = press._update_statistics(ctx, state)
        assert seen_any
        seen.append(q[0, :, max(0, press.n_sink - start) :].numpy())
    all_queries = np.concatenate(seen, axis=1)  # [H, n, d]
    for h in range(3):
        np.testing.assert_allclose(mean[0, h].numpy(), all_queries[h].mean(axis=0), rtol=1e-5)
        np.testing.assert_allclose(cov[0, h].numpy(), np.cov(all_queries[h].T, bias=True), rtol=1e-4, atol=1e-5)
    assert all_queries.shape[1] == 200 - press.n_sink


def test_attention_sinks_matter_on_the_embedded_model(smollm2, smollm2_tokenizer):
    """The StreamingLLM finding: the same window without its 4 sink tokens is far worse."""
    from orchestrator.corpus import load_corpus
    from workers.contract.tokenization import resolve

    ids = torch.tensor(resolve(smollm2_tokenizer, "auto").ids(load_corpus("pydoc")[1].text, 512))
    configs = [EvalConfig(parse_method("window")), EvalConfig(parse_method("streaming_llm"))]
    rows = Engine(smollm2, EngineSettings(64, 64)).evaluate("d", ids, configs).to_pylist()
    ppl = {
        label: math.exp(sum(r["nll_sum"] for r in rows if r["config"] == label) / (len(ids) - 1))
        for label in ("window", "streaming_llm")
    }
    assert ppl["window"] > 1.5 * ppl["streaming_llm"], ppl


def test_kvzap_scores_are_the_surrogates_outputs_on_attention_inputs(model, ids, tmp_path):
    """A tiny surrogate written in the published format round-trips from disk, and its scores
    equal a direct matmul on each layer's attention input (from an independent eager forward)."""
    from workers.presses.kvzap import build_surrogate, load_surrogate, save_surrogate

    torch.manual_seed(7)
    for hidden_dim in (None, 16):
        surrogate = build_surrogate(32, 2, hidden_dim, 2)
        save_surrogate(surrogate, tmp_path / f"kvzap-{hidden_dim}", hidden_dim)
        loaded = load_surrogate(str(tmp_path / f"kvzap-{hidden_dim}"))
        for a, b in zip(surrogate.state_dict().values(), loaded.state_dict().values()):
            assert torch.equal(a, b)
        scores = final_scores(model, ids, f"kvzap:path={tmp_path / f'kvzap-{hidden_dim}'}")
        model.set_attn_implementation("eager")
        with torch.no_grad():
            hidden = model(ids[None], output_hidden_states=True).hidden_states
            for layer, block in enumerate(model.model.layers):
                attn_input = block.input_layernorm(hidden[layer])[0]  # [N, hidden]
                module = surrogate[layer]
                if hidden_dim is None:
                    expected = attn_input @ module.weight.T + module.bias
                else:
                    inner = F.gelu(attn_input @ module[0].weight.T + module[0].bias)
                    expected = inner @ module[2].weight.T + module[2].bias
                expected = expected.T.double()  # [Hkv, N]
                torch.testing.assert_close(scores[layer], expected, rtol=1e-4, atol=1e-5)
