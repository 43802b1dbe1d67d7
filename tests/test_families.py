"""Right on any decoder model: every family's baseline equals its own full-sequence forward, each
attention variant is honoured (and matters), and every built-in press runs or is refused."""

from __future__ import annotations

import copy
import dataclasses
import sys
from pathlib import Path

import pytest
import torch
import transformers as T

from tests.families import (
    FAMILIES,
    N_TOKENS,
    NEEDS_ROPE,
    PRESSES,
    SETTINGS,
    baseline_error,
    document,
    markdown,
    support_matrix,
    tiny_decoder,
)
from tests.helpers import full_forward_nll
from workers.actor import EvalWorker
from workers.contract.allocation import parse_allocation
from workers.contract.configs import EvalConfig
from workers.contract.plan import MODEL_LEVEL, WorkerSettings
from workers.contract.settings import EngineSettings
from workers.engine.core import Engine
from workers.engine.exactness import inexact_reason
from workers.engine.nll import token_nll
from workers.modeling import attention
from workers.modeling.attention import UnsupportedAttention, kvorch_attention
from workers.presses import REGISTRY, parse_method

SLIDING = {"mistral": [16, 16], "gemma2": [16, None], "gemma3": [16, None]}


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize(
    "settings",
    [
        SETTINGS,
        EngineSettings(chunk_size=16, window=8, attn="eager"),
        EngineSettings(chunk_size=16, window=8, static=True),
        EngineSettings(chunk_size=16, window=8, attn="flex", static=True),
    ],
    ids=["sdpa", "eager", "static-sdpa", "static-flex"],
)
def test_baseline_equals_the_families_full_forward(family, settings):
    assert baseline_error(tiny_decoder(family), document(), settings) < 1e-5


@pytest.mark.parametrize("family", FAMILIES)
def test_static_shapes_keep_the_exact_paths_keys_on_every_family(family):
    """Every press the family supports, and knorm under adakv and pyramidkv, at the compiled step's
    static shapes and at exact ones: the same keys kept and the same NLL, with each family's
    windows, soft-caps and RoPE."""
    model, tokens = tiny_decoder(family), document()
    has_rope = getattr(model.base_model, "rotary_emb", None) is not None
    presses = [p for p in PRESSES if has_rope or p not in NEEDS_ROPE]  # refused without RoPE
    configs = [EvalConfig(press, press.default_thresholds[0]) for press in map(parse_method, presses)]
    configs += [  # budgets moved between heads (adakv) and layers (pyramidkv), per layer inside one region
        EvalConfig(REGISTRY["knorm"](), ratio=0.5, allocation=parse_allocation(text))
        for text in ("adakv", "pyramidkv:beta=2")
    ]
    eager = Engine(model, EngineSettings(16, 8, static=False)).evaluate("d", tokens, configs).to_pylist()
    step = Engine(model, EngineSettings(16, 8, static=True)).evaluate("d", tokens, configs).to_pylist()
    for a, b in zip(eager, step, strict=True):
        assert (b["config"], b["keys_kept"], b["n_correct"]) == (a["config"], a["keys_kept"], a["n_correct"])
        assert b["nll_sum"] == pytest.approx(a["nll_sum"], rel=1e-6, abs=1e-9)


@pytest.mark.parametrize("family", ["mistral", "gemma2", "gemma3"])
def test_the_sliding_window_matters_on_this_document(family):
    """Guards the test above: a plain causal mask (what kvorch used to apply) gives other numbers."""
    model, tokens = tiny_decoder(family), document()
    causal = torch.ones(N_TOKENS, N_TOKENS, dtype=torch.bool).tril()
    own, plain = full_forward_nll(model, tokens).sum(), full_forward_nll(model, tokens, causal).sum()
    assert abs(float(own - plain)) / float(own) > 1e-4


def test_gemma2_soft_cap_matters_on_this_document():
    model, tokens = tiny_decoder("gemma2"), document()
    uncapped = copy.deepcopy(model)
    for layer in uncapped.model.layers:
        layer.self_attn.attn_logit_softcapping = None
    own, plain = full_forward_nll(model, tokens).sum(), full_forward_nll(uncapped, tokens).sum()
    assert abs(float(own - plain)) / float(own) > 1e-4


@pytest.mark.parametrize("family", ["mistral", "gemma3"])
def test_density_counts_what_a_sliding_layer_holds(family):
    """Baseline density 1; keys_total and the window press's keys_kept by hand: a sliding layer of
    window W holds min(s, W - 1) keys before chunk s, a global layer s."""
    model, tokens = tiny_decoder(family), document()
    configs = [EvalConfig(REGISTRY["baseline"]()), EvalConfig(REGISTRY["window"]())]
    rows = Engine(model, SETTINGS).evaluate("d", tokens, configs).to_pylist()
    kv_heads, window = 2, SETTINGS.window
    for row in rows:
        s = row["chunk_start"]
        held = [s if w is None else min(s, w - 1) for w in SLIDING[family]]
        assert row["keys_total"] == sum(held) * kv_heads
        expected_kept = (
            row["keys_total"] if row["config"] == "baseline" else sum(min(h, window) for h in held) * kv_heads
        )
        assert row["keys_kept"] == expected_kept, (row["config"], s)
        assert row["keys_in_window"] == sum(min(h, window) for h in held) * kv_heads


@pytest.mark.parametrize("family", ["llama", "gemma3", "cohere", "gpt_neox"])
def test_presses_get_each_layers_own_rope(family):
    """The (cos, sin) a press reads equal what the model hands that decoder layer (Gemma 3: local
    and global bases), and unrotating undoes the model's own apply_rotary_pos_emb (Cohere: interleaved;
    GPT-NeoX: partial)."""
    model, tokens = tiny_decoder(family), document()[:20]
    received = {}
    for index, layer in enumerate(model.base_model.layers):
        layer.register_forward_pre_hook(
            lambda module, args, kwargs, i=index: received.__setitem__(i, kwargs["position_embeddings"]),
            with_kwargs=True,
        )
    with torch.no_grad():
        model(tokens[None])
    engine = Engine(model, SETTINGS)
    positions = torch.arange(20)
    apply = sys.modules[type(model).__module__].apply_rotary_pos_emb
    x = torch.randn(1, 4, 20, 8)
    for layer, (cos, sin) in received.items():
        rotary = engine.hooked.layer_rotaries[layer]
        ours = rotary(positions)
        torch.testing.assert_close(ours[0], cos[0].float())
        torch.testing.assert_close(ours[1], sin[0].float())
        rotated, _ = apply(x, x, cos, sin)
        torch.testing.assert_close(rotary.unrotate(rotated, *ours), x, rtol=1e-5, atol=1e-5)
    if family == "gemma3":
        assert not torch.allclose(received[0][0], received[1][0])  # the two bases differ


def test_the_docs_show_the_support_matrix():
    matrix = support_matrix()
    assert all(matrix[f]["baseline"] == "exact" for f in FAMILIES)
    assert {(f, p) for f, cells in matrix.items() for p, c in cells.items() if c.startswith("refused")} == {
        (family, press) for family in ("gpt2", "opt") for press in NEEDS_ROPE
    }
    page = (Path(__file__).parent.parent / "docs" / "model-families.md").read_text()
    assert markdown(matrix) in page, "stale support matrix: paste `python -m tests.families` into it"


def test_unknown_attention_arguments_are_refused():
    q = torch.randn(1, 4, 3, 8)
    module = torch.nn.Module()
    module.layer_idx = 0
    with pytest.raises(UnsupportedAttention, match="s_aux"):
        kvorch_attention(module, q, q, q, None, s_aux=torch.zeros(4))


def test_a_layer_that_bypasses_kvorchs_attention_is_refused():
    model = tiny_decoder("llama")
    engine = Engine(model, SETTINGS)
    bypass = copy.copy(model.config)
    bypass._attn_implementation = "sdpa"
    model.model.layers[1].self_attn.config = bypass
    with pytest.raises(UnsupportedAttention, match=r"llama: layer\(s\) \[1\]"):
        engine.evaluate("d", document(), [EvalConfig(REGISTRY["baseline"]())])


def test_token_nll_is_float64_accurate_without_a_float64_copy():
    logits = 12 * torch.randn(3, 40, 5000, generator=torch.Generator().manual_seed(0))
    targets = torch.randint(0, 5000, (3, 40), generator=torch.Generator().manual_seed(1))
    reference = -torch.log_softmax(logits.double(), dim=-1).gather(-1, targets[..., None])[..., 0]
    ours = token_nll(logits, targets)
    assert ours.dtype == torch.float64
    assert float(((ours.sum(1) - reference.sum(1)) / reference.sum(1)).abs().max()) < 1e-6


@pytest.mark.parametrize("family", FAMILIES)
def test_the_preflights_exactness_check_passes_every_family(family):
    assert inexact_reason(Engine(tiny_decoder(family), SETTINGS), document()) is None


@pytest.mark.parametrize("compile_", [False, True], ids=["exact", "static"])
def test_the_preflight_refuses_a_model_whose_attention_kvorch_gets_wrong(monkeypatch, tmp_path, compile_):
    """Dropping the sliding window (the bug kvorch had on Mistral) is caught on the actor before the
    sweep, on its tiny preflight document, with a model-level reason; at the shapes the sweep will
    run (static when compiling, checked uncompiled)."""
    path = tmp_path / "mistral"
    config = T.MistralConfig(**dict(FAMILIES["mistral"][1], sliding_window=4))
    torch.manual_seed(0)
    T.MistralForCausalLM(config).save_pretrained(path)
    settings = dataclasses.replace(SETTINGS, compile=compile_)
    worker = EvalWorker("w", WorkerSettings(str(path), "float32", "cpu", 1, settings))
    assert worker.preflight([EvalConfig(REGISTRY["baseline"]())]) == []

    def causal_only(query_positions, key_positions, variant):
        return query_positions[:, None] >= key_positions[None, :]

    monkeypatch.setattr(attention, "band", causal_only)
    worker = EvalWorker("w", WorkerSettings(str(path), "float32", "cpu", 1, settings))
    [(label, reason)] = worker.preflight([EvalConfig(REGISTRY["baseline"]())])
    assert label == MODEL_LEVEL and "differs from the model's own forward" in reason
