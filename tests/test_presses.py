"""Press building blocks against naive references: RoPE algebra, the method grammar, seeding."""

from __future__ import annotations

import pytest
import torch
from transformers.models.llama.modeling_llama import LlamaRotaryEmbedding, apply_rotary_pos_emb

from tests.helpers import tiny_llama
from workers.contract.configs import EvalConfig
from workers.contract.settings import EngineSettings
from workers.engine.core import Engine, doc_seed
from workers.modeling.rope import mean_rotation, unrotate
from workers.presses import REGISTRY, parse_method
from workers.presses.random import uniform_scores


def rotary(head_dim: int = 8):
    model = tiny_llama()
    return LlamaRotaryEmbedding(model.config), model.config


def test_unrotate_inverts_the_models_rope():
    emb, _ = rotary()
    positions = torch.arange(100, 110)[None]
    x = torch.randn(2, 4, 10, 8)
    cos, sin = emb(x, positions)
    rotated, _ = apply_rotary_pos_emb(x, x, cos, sin)
    torch.testing.assert_close(unrotate(rotated, cos[0], sin[0]), x, rtol=1e-5, atol=1e-5)


def test_mean_rotation_is_the_average_of_explicit_rotations():
    emb, _ = rotary()
    positions = torch.arange(37, 37 + 50)
    cos, sin = emb(torch.zeros(1), positions[None])
    basis = torch.eye(8)[None, None]  # rotate each basis vector at each position
    explicit = torch.stack(
        [
            apply_rotary_pos_emb(basis, basis, cos[:, p : p + 1].expand(1, 8, 8), sin[:, p : p + 1].expand(1, 8, 8))[0][
                0, 0
            ].T
            for p in range(len(positions))
        ]
    ).mean(dim=0)
    torch.testing.assert_close(mean_rotation(cos[0], sin[0], 8), explicit, rtol=1e-5, atol=1e-6)


def test_partial_rotary_leaves_the_tail_untouched():
    x = torch.randn(1, 1, 3, 8)
    cos, sin = torch.rand(3, 4), torch.rand(3, 4)
    assert torch.equal(unrotate(x, cos, sin)[..., 4:], x[..., 4:])
    rot = mean_rotation(cos, sin, 8)
    assert torch.equal(rot[4:, 4:], torch.eye(4)) and not rot[:4, 4:].any()


def test_every_press_module_registers_its_press_and_all_keeps_its_order():
    """A press registers itself next to its class; one forgotten in workers/presses/__init__.py
    (or without @register) would silently be no method at all."""
    import dataclasses as dc
    import importlib
    import pkgutil

    import workers.presses as presses
    from workers.presses.base import Press

    defined = set()
    for info in pkgutil.iter_modules(presses.__path__):
        module = importlib.import_module(f"workers.presses.{info.name}")
        defined |= {
            cls
            for cls in vars(module).values()
            if isinstance(cls, type)
            and issubclass(cls, Press)
            and cls is not Press
            and cls.__module__ == module.__name__
        }
    assert defined and defined == set(REGISTRY.values())
    assert all(dc.is_dataclass(cls) for cls in defined)
    # The order of `--methods all` (so of every run's configs and resume fingerprints) is the
    # literal ALL_METHODS in workers/contract/defaults.py, its one owner.


def test_register_refuses_a_name_taken_by_another_press():
    from workers.presses.registry import register

    class Impostor(REGISTRY["knorm"]):
        pass

    with pytest.raises(ValueError, match="'knorm' is taken by KnormPress"):
        register(Impostor)
    assert REGISTRY["knorm"].__name__ == "KnormPress"


def test_parse_method_builds_parameterised_presses():
    press = parse_method("expected_attention:n_future_positions=256,use_vnorm=false,epsilon=0.5")
    assert (press.n_future_positions, press.use_vnorm, press.epsilon) == (256, False, 0.5)
    assert press.label() == "expected_attention:epsilon=0.5,n_future_positions=256,use_vnorm=false"
    assert parse_method(press.label()) == press
    assert parse_method("h2o") == REGISTRY["h2o"]()


@pytest.mark.parametrize(
    "text,fragment",
    [
        ("nope", "valid methods: baseline"),
        ("h2o:local=3", "key one of"),
        ("expected_attention:n_future_positions=many", "must be a int"),
        ("expected_attention:use_vnorm=maybe", "true or false"),
        ("expected_attention:stats=median", "stats must be"),
    ],
)
def test_parse_method_rejects_bad_input(text, fragment):
    with pytest.raises(ValueError, match=fragment):
        parse_method(text)


def test_random_scores_are_seeded_and_nest_across_thresholds(tiny_model, tokens):
    engine = Engine(tiny_model, EngineSettings(32, 32))
    configs = [EvalConfig(parse_method("random"), tau) for tau in (0.3, 0.7)]
    first = engine.evaluate("doc-a", tokens, configs).to_pylist()
    again = engine.evaluate("doc-a", tokens, configs).to_pylist()
    other_doc = engine.evaluate("doc-b", tokens, configs).to_pylist()
    assert [r["keys_kept"] for r in first] == [r["keys_kept"] for r in again]
    assert [r["keys_kept"] for r in first] != [r["keys_kept"] for r in other_doc]
    low = [r["keys_kept"] for r in first if r["threshold"] == 0.3]
    high = [r["keys_kept"] for r in first if r["threshold"] == 0.7]
    assert all(h <= lo for h, lo in zip(high, low)) and sum(high) < sum(low)


def test_knorm_evicts_exactly_the_long_keys(tokens):
    """With window 0 and chunk 1, knorm keeps key j iff ||k_j|| <= -threshold, key by key.

    One layer, so every key comes from the embeddings and a plain forward is a reference.
    """
    tiny_model = tiny_llama(n_layers=1)
    ids = tokens[:40]
    # Reference from a plain forward: every key recomputed from the layer's input (RoPE keeps norms).
    with torch.no_grad():
        out = tiny_model(ids[None], output_hidden_states=True)
        norms = [
            block.self_attn.k_proj(block.input_layernorm(out.hidden_states[layer])).view(len(ids), 2, -1).norm(dim=-1).T
            for layer, block in enumerate(tiny_model.model.layers)
        ]  # per layer [Hkv, n]
    ordered = torch.cat(norms, dim=1).flatten().sort().values
    middle = len(ordered) // 2
    tau = -float(ordered[middle : middle + 2].mean())  # halfway between two keys: no rounding ties
    rows = Engine(tiny_model, EngineSettings(chunk_size=1, window=0)).evaluate(
        "d", ids, [EvalConfig(parse_method("knorm"), tau)]
    )
    kept_naive = [int(sum((n[:, :s] <= -tau).sum() for n in norms)) for s in range(len(ids))]
    assert [r["keys_kept"] for r in rows.to_pylist()] == kept_naive
    assert 0 < kept_naive[-1] < 2 * (len(ids) - 1)


def test_random_scores_are_uniform_and_independent_per_layer_head_and_document():
    """The counter-based hash behind ``random``: U(0, 1) by its moments and deciles, and no
    correlation between neighbouring layers, heads, documents or positions."""
    positions = torch.arange(200_000)
    scores = uniform_scores(0, doc_seed("doc-a"), 3, 2, positions)
    assert scores.shape == (2, 200_000) and scores.min() >= 0 and scores.max() < 1
    assert abs(float(scores.mean()) - 0.5) < 0.005
    assert abs(float(scores.var()) - 1 / 12) < 0.002
    deciles = torch.histc(scores[0], bins=10, min=0, max=1) / 200_000
    assert torch.allclose(deciles, torch.full((10,), 0.1), atol=0.005)
    others = [
        scores[1],  # the next head
        uniform_scores(0, doc_seed("doc-a"), 4, 2, positions)[0],  # the next layer
        uniform_scores(0, doc_seed("doc-b"), 3, 2, positions)[0],  # another document
        uniform_scores(1, doc_seed("doc-a"), 3, 2, positions)[0],  # another seed
        scores[0].roll(1),  # the next position
    ]
    for other in others:
        assert abs(float(torch.corrcoef(torch.stack((scores[0], other)))[0, 1])) < 0.01
