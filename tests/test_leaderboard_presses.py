"""The leaderboard's presses (issue 37) against independent computations: numpy, one key at a
time, from the papers' definitions (kvpress's conventions where the docstring says so).

Each press scores a LayerContext built from Python bounds (tests.helpers.layer_context); the
reference never calls kvorch's code. kvpress's own implementations: tests_kvpress/test_kvpress_leaderboard.py.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

from tests.helpers import layer_context, tiny_llama
from workers.contract.settings import EngineSettings
from workers.engine.core import Engine
from workers.modeling.rope import LayerRotary, rotate_half
from workers.presses import StateShape, parse_method

B, HKV, H, D = 2, 2, 4, 8


def random_tensors(n: int, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    keys = torch.randn(B, HKV, n, D, generator=g) + 0.5 * torch.randn(B, HKV, 1, D, generator=g)
    values = torch.randn(B, HKV, n, D, generator=g)
    queries = torch.randn(B, H, n, D, generator=g)
    return keys, values, queries


def test_keydiff_is_minus_the_cosine_to_the_mean_unit_key():
    """Rescoring from position 40 of 100: the anchor is over every key before the end, evicted
    ones (zeros) adding nothing."""
    keys, values, queries = random_tensors(100)
    kept = torch.ones(B, HKV, 100, dtype=torch.bool)
    kept[:, :, 10:20] = False  # evicted: a masked cache still reads them
    ctx = layer_context(60, 100, 40, keys, values, queries[:, :, 60:], kept=kept)
    scores = parse_method("keydiff").score(ctx, None).numpy()
    k = keys.double().numpy()
    for b in range(B):
        for h in range(HKV):
            held = [k[b, h, i] for i in range(100) if not 10 <= i < 20]
            anchor = np.mean([x / np.linalg.norm(x) for x in held], axis=0)
            for j, pos in enumerate(range(40, 100)):
                x = k[b, h, pos]
                expected = -x @ anchor / (np.linalg.norm(x) * np.linalg.norm(anchor))
                assert scores[b, h, j] == pytest.approx(expected, abs=1e-5)


def naive_lagkv(k: np.ndarray, v: np.ndarray, end: int, n_sink: int, lag: int, held=None) -> np.ndarray:
    """[end] scores of one head: rank inside the partition / lag of the mean of the key and value
    spreads softmaxed over the partition's held keys (the evicted ones rank lowest, the reference
    range over held keys only); +inf without a complete reference."""
    held = np.ones(end, dtype=bool) if held is None else held
    out = np.full(end, np.inf)
    p = 0
    while n_sink + (p + 2) * lag <= end:
        part = range(n_sink + p * lag, n_sink + (p + 1) * lag)
        alive = held[list(part)]
        total = np.full(lag, -1.0)
        total[alive] = 0
        for x in (k, v):
            ref = x[n_sink + (p + 1) * lag : n_sink + (p + 2) * lag][
                held[n_sink + (p + 1) * lag : n_sink + (p + 2) * lag]
            ]
            lo, hi = ref.min(axis=0), ref.max(axis=0)
            spread = np.array([((x[i] - lo) / (hi - lo)).std(ddof=1) for i in part])
            total[alive] += np.exp(spread[alive]) / np.exp(spread[alive]).sum() / 2
        for rank, i in enumerate(np.argsort(total, kind="stable")):
            out[part[i]] = rank / lag
        p += 1
    return out


@pytest.mark.parametrize(
    ("end", "lag", "evicted"), [(100, 16, False), (100, 16, True), (70, 32, False), (40, 32, False)]
)
def test_lagkv_ranks_each_partition_against_the_next(end, lag, evicted):
    keys, values, queries = random_tensors(end, seed=1)
    kept = torch.rand(B, HKV, end, generator=torch.Generator().manual_seed(3)) > (0.3 if evicted else -1)
    ctx = layer_context(end - 20, end, 0, keys, values, queries[:, :, end - 20 :], kept=kept)
    scores = parse_method(f"lagkv:lag_size={lag}").score(ctx, None).double().numpy()
    for b in range(B):
        for h in range(HKV):
            k, v = keys[b, h].double().numpy(), values[b, h].double().numpy()
            expected = naive_lagkv(k, v, end, 4, lag, kept[b, h].numpy())
            np.testing.assert_allclose(scores[b, h], expected, rtol=0, atol=1e-9)


def rope_context(n_chunk: int, start: int, pad: int = 0, seed: int = 2):
    """A chunk [start, start + n_chunk) (+ ``pad`` rows past the end, as a padded last chunk) of
    keys rotated by a real model's RoPE, and the pre-RoPE keys the reference reads."""
    rotary = tiny_llama().model.rotary_emb

    def cos_sin(positions):
        cos, sin = rotary(torch.zeros(1), positions[None])
        return cos[0], sin[0]

    end = start + n_chunk
    prerope, values, queries = random_tensors(end + pad, seed)
    cos, sin = cos_sin(torch.arange(end + pad))
    keys = prerope * cos + rotate_half(prerope) * sin
    ctx = layer_context(start, end, start, keys[:, :, :end], values[:, :, :end], queries[:, :, start : end + pad])
    ctx.query_positions = torch.arange(start, end + pad)
    ctx.new_keys, ctx.new_values = keys[:, :, start : end + pad], values[:, :, start : end + pad]
    ctx.scored = ctx.query_positions
    ctx.rotary = LayerRotary(cos_sin, rotate_half)
    return ctx, prerope.double().numpy(), values.double().numpy(), queries.double().numpy()


def naive_leverage(x: np.ndarray) -> np.ndarray:
    """diag(X (X^T X)^-1 X^T) of the keys x [n, D] centred."""
    x = x - x.mean(axis=0)
    return np.einsum("nd,de,ne->n", x, np.linalg.inv(x.T @ x), x)


def z_scored(per_head: np.ndarray) -> np.ndarray:
    return (per_head - per_head.mean()) / per_head.std(ddof=1)


@pytest.mark.parametrize("pad", [0, 5])
def test_leverage_is_the_z_scored_exact_leverage_of_the_chunks_prerope_keys(pad):
    ctx, prerope, _, _ = rope_context(40, 60, pad)
    scores = parse_method("leverage").score(ctx, None).double().numpy()[..., :40]
    for b in range(B):
        expected = z_scored(np.stack([naive_leverage(prerope[b, h, 60:100]) for h in range(HKV)]))
        np.testing.assert_allclose(scores[b], expected, rtol=1e-4, atol=1e-4)


def naive_compactor(prerope, values, queries, keys, inner: range, blending: float) -> np.ndarray:
    """[Hkv, len(inner)]: blending x z(leverage) + z(pooled non-causal attention x ||v||)."""
    lev = z_scored(np.stack([naive_leverage(prerope[h, inner]) for h in range(HKV)]))
    attn = np.zeros((HKV, len(inner)))
    for h in range(H):
        kv = h // (H // HKV)
        logits = queries[h, inner] @ keys[kv, inner].T  # no 1/sqrt(d), as kvpress
        probs = np.exp(logits - logits.max(axis=1, keepdims=True))
        attn[kv] += (probs / probs.sum(axis=1, keepdims=True)).sum(axis=0) / (H // HKV)
    attn *= np.linalg.norm(values[:, inner], axis=-1)
    padded = np.pad(attn, ((0, 0), (1, 1)))
    pooled = (padded[:, :-2] + padded[:, 1:-1] + padded[:, 2:]) / 3
    return blending * lev + z_scored(pooled)


@pytest.mark.parametrize(("start", "end_keep"), [(0, 4), (40, 0)])
def test_compactor_blends_leverage_and_non_causal_attention(start, end_keep):
    """A first chunk (the first 8 positions are sinks) and a later one; the last ``end_keep``."""
    ctx, prerope, values, queries = rope_context(40, start, seed=3)
    press = parse_method(f"compactor:sink_size_end={end_keep},blending=0.6")
    scores = press.score(ctx, None).double().numpy()
    keys = ctx.new_keys.double().numpy()
    first = max(8 - start, 0)
    inner = range(first, 40 - end_keep)
    for b in range(B):
        local = naive_compactor(
            prerope[b, :, start:], values[b, :, start:], queries[b, :, start:], keys[b], inner, blending=0.6
        )
        np.testing.assert_allclose(scores[b][:, first : 40 - end_keep], local, rtol=1e-4, atol=1e-4)
        assert np.isinf(scores[b][:, :first]).all() and np.isinf(scores[b][:, 40 - end_keep :]).all()


def test_chunkkv_scores_every_key_its_chunks_mean_scorer_score():
    """Knorm under chunks of 6 positions: a key scores the mean over its chunk's keys that exist
    and over the kv-heads of -||k||; chunks are absolute positions, rescored as keys arrive."""
    keys, values, queries = random_tensors(50, seed=4)
    press = parse_method("chunkkv:press=knorm,chunk_length=6")
    state = press.init_state(StateShape(B, 1, H, HKV, D, 50, torch.device("cpu")))[0]
    for start, end in ((0, 20), (20, 40), (40, 50)):
        ctx = layer_context(start, end, 0, keys[:, :, :end], values[:, :, :end], queries[:, :, start:end])
        scores = press.score(ctx, state).double().numpy()
    k = keys.double().numpy()
    for b in range(B):
        for pos in range(50):
            first = pos // 6 * 6
            members = range(first, min(first + 6, 50))
            expected = np.mean([-np.linalg.norm(k[b, h, j]) for j in members for h in range(HKV)])
            assert scores[b, :, pos] == pytest.approx([expected] * HKV, abs=1e-5)


def test_criticalkv_reweights_by_the_l1_norm_of_each_heads_projected_value():
    """(knorm + epsilon) x mean over the kv-head's query heads of ||v W_o^h||_1, with W_o the
    model's o_proj (rows h*D..(h+1)*D of its transposed weight feed the output from head h)."""
    model = tiny_llama()
    modules = tuple(layer.self_attn for layer in model.model.layers)
    keys, values, queries = random_tensors(30, seed=5)
    press = parse_method("criticalkv:press=knorm,epsilon=0.5")
    state = press.init_state(StateShape(B, 2, H, HKV, D, 30, torch.device("cpu"), modules))[1]  # layer 1
    scores = press.score(layer_context(0, 30, 0, keys, values, queries), state).double().numpy()
    w = model.model.layers[1].self_attn.o_proj.weight.detach().double().numpy()  # [hidden, H * D]
    k, v = keys.double().numpy(), values.double().numpy()
    for b in range(B):
        for kv in range(HKV):
            for pos in range(30):
                heads = range(kv * (H // HKV), (kv + 1) * (H // HKV))
                norm = np.mean([np.abs(w[:, h * D : (h + 1) * D] @ v[b, kv, pos]).sum() for h in heads])
                expected = (-np.linalg.norm(k[b, kv, pos]) + 0.5) * norm
                assert scores[b, kv, pos] == pytest.approx(expected, rel=1e-5)


@pytest.mark.parametrize(("n_sink", "window"), [(0, 0), (2, 4)])
def test_criticalkv_keeps_the_scorers_top_half_of_the_limit_then_the_reweighted_best(n_sink, window):
    """kvpress's two stages on one prefill: the top floor(0.5 x limit) keys by knorm's own score
    (less the sinks and window, kept and counted), then the rest of the limit by the reweighted
    score; a plain per-head two-stage top-k gives the same kept sets."""
    from workers.engine.decisions import decide_by_budget

    model = tiny_llama()
    modules = tuple(layer.self_attn for layer in model.model.layers)
    keys, values, queries = random_tensors(30, seed=7)
    press = parse_method("criticalkv:press=knorm")
    state = press.init_state(StateShape(B, 2, H, HKV, D, 30, torch.device("cpu"), modules))[0]
    scores = press.score(layer_context(0, 30, 0, keys, values, queries), state).float()
    share, inner = press.first_stage(state)
    limit = 20
    keep = torch.ones(B, HKV, 30, dtype=torch.bool)
    decide_by_budget(
        keep, scores, torch.arange(30), torch.tensor(30), window, torch.full((B,), limit), n_sink, (share, inner)
    )
    first_n = max(int(share * limit) - n_sink - window, 0)
    rest_n = limit - n_sink - window - first_n
    outside = set(range(n_sink)) | set(range(30 - window, 30))
    two_stage_differs = False
    for b in range(B):
        for h in range(HKV):
            competing = [p for p in range(30) if p not in outside]
            first = sorted(competing, key=lambda p: -inner[b, h, p].item())[:first_n]
            rest = sorted(set(competing) - set(first), key=lambda p: -scores[b, h, p].item())[:rest_n]
            second_only = sorted(competing, key=lambda p: -scores[b, h, p].item())[: first_n + rest_n]
            two_stage_differs |= set(first) | set(rest) != set(second_only)
            assert set(keep[b, h].nonzero()[:, 0].tolist()) == set(first) | set(rest) | outside
    assert two_stage_differs, "the first stage never changed what was kept"


def test_criticalkv_first_stage_is_labelled_and_refused_with_adakv():
    """A ratio other than kvpress's 0.5 labels the config; with adakv the two stages are refused."""
    from orchestrator.errors import KvorchError
    from orchestrator.sweep.spec import build_configs

    assert parse_method("criticalkv").label() == "criticalkv"
    assert parse_method("criticalkv:first_stage_ratio=0").label() == "criticalkv:first_stage_ratio=0.0"
    assert '"first_stage_ratio": 0.5' in parse_method("criticalkv").params_json()
    assert parse_method("criticalkv:first_stage_ratio=0").first_stage(None) is None
    with pytest.raises(KvorchError, match="criticalkv:first_stage_ratio=0 or drop adakv"):
        build_configs(("criticalkv",), (), "ratio", (0.5,), (), 0, ("uniform", "adakv"))
    grid = build_configs(("criticalkv:first_stage_ratio=0",), (), "ratio", (0.5,), (), 0, ("uniform", "adakv"))
    assert len(grid) == 2
    with pytest.raises(ValueError, match="first_stage_ratio must lie in"):
        parse_method("criticalkv:first_stage_ratio=1.5")


def test_a_wrapper_refuses_what_it_cannot_wrap_in_one_line():
    for text, message in (
        ("chunkkv:press=window", "chunkkv: press=window is not a scorer it can wrap; use e.g. press=snapkv"),
        ("criticalkv:press=chunkkv", "criticalkv: press=chunkkv is a wrapper itself"),
        ("chunkkv:press=snapkv:window_size=8", "chunkkv: press=snapkv:window_size=8 takes a method name only"),
    ):
        with pytest.raises(ValueError, match=message.replace("(", r"\(")) as excinfo:
            parse_method(text)
        assert "\n" not in str(excinfo.value)


def test_methods_leaderboard_is_its_preset_and_all_is_unchanged():
    from orchestrator.sweep.spec import build_configs
    from workers.contract.defaults import ALL_METHODS, LEADERBOARD_METHODS

    assert [c.method for c in build_configs(("leaderboard",), ())] == list(LEADERBOARD_METHODS)
    assert [c.method for c in build_configs(("all",), ())] == list(ALL_METHODS)
    assert set(LEADERBOARD_METHODS) - set(ALL_METHODS) == {
        "keydiff", "lagkv", "leverage", "compactor", "chunkkv", "criticalkv"
    }  # fmt: skip
    with pytest.raises(Exception, match=r"unknown method 'leaderbord'.*\(or all, leaderboard\)"):
        build_configs(("leaderbord",), ())


def naive_qfilters(model, documents) -> np.ndarray:
    """[layers, kv-heads, D]: per query head, the first right singular vector (numpy SVD) of its
    post-RoPE queries over every document, signed so the mean query projects positively,
    averaged over the kv-head's group and negated. Queries from a plain forward's hidden states
    through q_proj and the model's own RoPE."""
    from transformers.models.llama.modeling_llama import apply_rotary_pos_emb

    per_layer = [[] for _ in model.model.layers]
    with torch.no_grad():
        for tokens in documents:
            out = model(tokens[None], output_hidden_states=True)
            positions = torch.arange(len(tokens))[None]
            cos, sin = model.model.rotary_emb(out.hidden_states[0], positions)
            for layer, block in enumerate(model.model.layers):
                x = block.input_layernorm(out.hidden_states[layer])
                q = block.self_attn.q_proj(x).view(1, len(tokens), H, D).transpose(1, 2)
                q, _ = apply_rotary_pos_emb(q, q, cos, sin)
                per_layer[layer].append(q[0].double().numpy())  # [H, n, D]
    filters = np.zeros((len(per_layer), HKV, D))
    for layer, chunks in enumerate(per_layer):
        queries = np.concatenate(chunks, axis=1)
        for h in range(H):
            u = np.linalg.svd(queries[h], full_matrices=False)[2][0]
            u = u * np.sign(queries[h].mean(axis=0) @ u)
            filters[layer, h // (H // HKV)] -= u / (H // HKV)
    return filters


def test_qfilters_measured_from_the_models_queries_are_the_svd_of_a_plain_forwards(tmp_path):
    from workers.presses.qfilter import load_qfilters
    from workers.studies.qfilters import measure_qfilters, save_qfilters

    model = tiny_llama()
    documents = [torch.randint(0, 97, (n,), generator=torch.Generator().manual_seed(n)) for n in (90, 130)]
    filters = measure_qfilters(Engine(model, EngineSettings(32, 0)).observe, documents, HKV)
    expected = naive_qfilters(tiny_llama(), documents)  # a fresh copy: the engine hooks its model
    np.testing.assert_allclose(filters.double().numpy(), expected, rtol=1e-4, atol=1e-5)
    save_qfilters(filters, tmp_path / "qf")
    assert torch.equal(load_qfilters(str(tmp_path / "qf")), filters)

    keys, values, queries = random_tensors(20, seed=6)
    press = parse_method(f"qfilter:path={tmp_path / 'qf'}")
    state = press.init_state(StateShape(B, 2, H, HKV, D, 20, torch.device("cpu")))[1]
    scores = press.score(layer_context(0, 20, 0, keys, values, queries), state)
    expected = -np.einsum("bhnd,hd->bhn", keys.double().numpy(), filters[1].double().numpy())
    np.testing.assert_allclose(scores.double().numpy(), expected, rtol=1e-5, atol=1e-6)


def test_qfilter_refuses_filters_of_another_shape_in_one_line(tmp_path):
    from workers.studies.qfilters import save_qfilters

    save_qfilters(torch.zeros(2, 3, D), tmp_path)
    press = parse_method(f"qfilter:path={tmp_path}")
    with pytest.raises(ValueError, match=r"holds filters \[2, 3, 8\], the model needs \[2, 2, 8\]"):
        press.init_state(StateShape(1, 2, H, HKV, D, 20, torch.device("cpu")))
    with pytest.raises(ValueError, match="qfilter needs path="):
        parse_method("qfilter")
