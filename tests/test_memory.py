"""``--batch-configs auto`` sizes any decoder's config layout, and says so in one line when it cannot."""

from __future__ import annotations

import dataclasses
import json
from types import SimpleNamespace

import pytest
import torch
import transformers as T

from orchestrator.errors import KvorchError
from orchestrator.pool.actors import PoolPlan
from orchestrator.sweep import batching
from orchestrator.sweep.spec import JobSpec
from workers.contract import memory

VOCAB = 101
# Tiny configs of six families; the sizes are chosen unequal (head_dim != hidden / heads for
# gemma2, GQA for llama, phi3 and gemma2) so a field read from the wrong place shows.
CONFIGS = {
    "llama": lambda: T.LlamaConfig(
        hidden_size=32, intermediate_size=48, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2
    ),
    "gpt2": lambda: T.GPT2Config(n_embd=32, n_layer=2, n_head=4, n_inner=None, n_positions=64),
    "opt": lambda: T.OPTConfig(
        hidden_size=32, ffn_dim=56, num_hidden_layers=2, num_attention_heads=4, word_embed_proj_dim=32
    ),
    "gpt_neox": lambda: T.GPTNeoXConfig(
        hidden_size=32, intermediate_size=72, num_hidden_layers=2, num_attention_heads=4
    ),
    "gemma2": lambda: T.Gemma2Config(
        hidden_size=32,
        intermediate_size=40,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=1,
        head_dim=16,
    ),
    "phi3": lambda: T.Phi3Config(
        hidden_size=32,
        intermediate_size=24,
        num_hidden_layers=3,
        num_attention_heads=4,
        num_key_value_heads=2,
        pad_token_id=0,
    ),
}
# The MLP width as the built model has it: the input width of each family's down projection.
MLP_WIDTH = {
    "llama": lambda m: m.model.layers[0].mlp.down_proj.in_features,
    "gpt2": lambda m: m.transformer.h[0].mlp.c_proj.weight.shape[0],  # Conv1D stores (in, out)
    "opt": lambda m: m.model.decoder.layers[0].fc2.in_features,
    "gpt_neox": lambda m: m.gpt_neox.layers[0].mlp.dense_4h_to_h.in_features,
    "gemma2": lambda m: m.model.layers[0].mlp.down_proj.in_features,
    "phi3": lambda m: m.model.layers[0].mlp.down_proj.in_features,
}


def tiny_config(family: str):
    config = CONFIGS[family]()
    config.vocab_size = VOCAB
    config.bos_token_id = config.eos_token_id = 0
    return config


@pytest.mark.parametrize("family", list(CONFIGS))
def test_sizes_match_what_the_built_model_allocates(family):
    """Each size read from the config equals the model's: its KV cache after a forward, its
    attention maps, its MLP and its logits."""
    config = tiny_config(family)
    model = T.AutoModelForCausalLM.from_config(config, attn_implementation="eager").eval()
    n = 10
    with torch.no_grad():
        out = model(torch.arange(n)[None], use_cache=True, output_attentions=True)
    cache = out.past_key_values
    keys = cache.layers[0].keys  # [batch, kv-heads, positions, head_dim]
    dims = memory.model_dims(config)
    assert dims.layers == len(cache.layers) == len(out.attentions)
    assert (dims.kv_heads, dims.head_dim) == (keys.shape[1], keys.shape[3])
    assert dims.heads == out.attentions[0].shape[1]
    assert dims.hidden == model.get_input_embeddings().embedding_dim
    assert dims.intermediate == MLP_WIDTH[family](model)
    assert dims.vocab == out.logits.shape[-1]
    kv_bytes = sum(layer.keys.numel() + layer.values.numel() for layer in cache.layers) * keys.element_size()
    assert kv_bytes == dims.layers * dims.kv_heads * n * dims.head_dim * 2 * 4


def test_gpt2_and_opt_estimates_by_hand():
    """GPT-2 names its MLP n_inner (None: 4 x n_embd), OPT ffn_dim; neither has intermediate_size."""
    t, c, b = 256, 32, 2  # max_tokens, chunk_size, dtype bytes
    gpt2 = 2 * 4 * t * 8 * 2 * b + 2 * 4 * t * 5 + c * (4 * 32 + 2 * 128) * b + c * VOCAB * (b + 4) + 4 * c * t * 4
    opt = 2 * 4 * t * 8 * 2 * b + 2 * 4 * t * 5 + c * (4 * 32 + 2 * 56) * b + c * VOCAB * (b + 4) + 4 * c * t * 4
    assert memory.config_bytes(tiny_config("gpt2"), t, c, b, static=False) == gpt2
    assert memory.config_bytes(tiny_config("opt"), t, c, b, static=False) == opt


def test_multi_query_configs_have_one_kv_head():
    falcon = T.FalconConfig(hidden_size=32, num_hidden_layers=2, num_attention_heads=4, multi_query=True)
    assert memory.model_dims(falcon).kv_heads == 1
    falcon_new = T.FalconConfig(
        hidden_size=32, num_hidden_layers=2, num_attention_heads=4, new_decoder_architecture=True, num_kv_heads=2
    )
    assert memory.model_dims(falcon_new).kv_heads == 2


@pytest.mark.parametrize(
    ("fields", "fragment"),
    [
        ({"num_attention_heads": 4, "hidden_size": 32, "vocab_size": 9}, "sets none of num_hidden_layers, n_layer"),
        ({"num_hidden_layers": 2, "num_attention_heads": 4, "hidden_size": 32}, "sets none of vocab_size"),
        ({"num_hidden_layers": 2, "num_attention_heads": 0, "hidden_size": 32, "vocab_size": 9}, "heads=0"),
    ],
)
def test_a_config_missing_a_size_names_it(fields, fragment):
    with pytest.raises(ValueError, match=fragment):
        memory.config_bytes(SimpleNamespace(**fields), 64, 16, 4, static=False)


CPU_POOL = PoolPlan(n_actors=1, num_gpus=0, num_cpus=1, device="cpu")


def test_auto_sizes_a_saved_gpt2_dir(local_ray, tmp_path):
    tiny_config("gpt2").save_pretrained(tmp_path)
    spec = JobSpec(model=str(tmp_path), methods=("baseline",), max_tokens=128, chunk_size=32)
    engine = spec.engine_for("cpu")
    assert 1 <= batching.resolve(spec, CPU_POOL, "float32", engine, 128, 600) <= memory.MAX_CONFIGS_PER_FORWARD


def test_auto_on_a_pool_no_node_can_host_stops_in_one_line(local_ray, tmp_path):
    """Issue 38, 6: --device cuda without a free GPU waited forever on the memory probe."""
    tiny_config("gpt2").save_pretrained(tmp_path)
    spec = JobSpec(model=str(tmp_path), methods=("baseline",), max_tokens=128, chunk_size=32)
    gpu_pool = PoolPlan(n_actors=1, num_gpus=1.0, num_cpus=1, device="cuda")  # the test Ray has no GPU
    with pytest.raises(KvorchError, match=r"no node with a free GPU took the memory probe within --actor-timeout 1 s"):
        batching.resolve(spec, gpu_pool, "float32", spec.engine_for("cpu"), 128, 1)


@pytest.mark.parametrize(
    ("config", "fragment"),
    [
        ({"model_type": "gpt2", "n_layer": None, "n_embd": 32, "n_head": 4}, "n_layer"),
        ({"model_type": "gpt2", "n_embd": 32, "n_head": 0}, "num_attention_heads=0"),
        ({"model_type": "no_such_architecture"}, "no_such_architecture"),
    ],
)
def test_auto_that_cannot_size_is_one_line(tmp_path, config, fragment):
    (tmp_path / "config.json").write_text(json.dumps(config))
    spec = JobSpec(model=str(tmp_path), methods=("baseline",))
    with pytest.raises(KvorchError) as error:
        batching.resolve(spec, CPU_POOL, "float32", spec.engine_for("cpu"), 1024, 600)
    message = str(error.value)
    assert "\n" not in message and fragment in message
    assert message.startswith("--batch-configs auto cannot size") and "pass --batch-configs N" in message


@pytest.mark.parametrize("static", [False, True], ids=["exact", "static"])
@pytest.mark.parametrize("n", [200, 256], ids=["corpus-document", "probe"])
def test_the_estimate_sizes_the_cache_the_step_really_holds(static, n):
    """The batch-size estimate's cache is the bytes of the key and value tensors the step
    allocates, on each path: a 200-token document (exact: 200 positions; static: its 256-position
    bucket) and a 256-token retrieval probe, whose answer span changes nothing of the cache.
    The ``kv_cache_bytes`` column reports the same tensors."""
    from tests.helpers import tiny_llama
    from workers.contract.configs import EvalConfig
    from workers.contract.plan import AnswerSpan
    from workers.contract.settings import EngineSettings
    from workers.engine import capacity
    from workers.engine.core import Engine
    from workers.presses import parse_method

    model = tiny_llama()
    # baseline holds every position, and so does knorm (not run yet) at static shapes (at exact
    # shapes its pool grows from empty); window holds its window and a chunk.
    names = [("baseline", None), ("knorm", -16.0), ("window", None)]
    configs = [EvalConfig(parse_method(name), tau) for name, tau in names]
    engine = Engine(model, EngineSettings(32, 32, static=static, agreement=False))
    tokens = torch.randint(0, 97, (n,), generator=torch.Generator().manual_seed(0))
    answer = AnswerSpan(n - 4, 4) if n == 256 else None
    step, _ = engine.step_for(configs, tokens, agreement=False)
    step.run(0, tokens, None, answer)
    state = step.state
    positions = 256 if static else n
    # window holds its 32-key window per kv-head plus a chunk: one row of a pool per layer
    page = capacity.page_size(2 * 32, 2, 32, 8 if static else 4)  # 2 kv-heads, no sinks, window 32, chunk 32
    window_pages = capacity.pages_for(2 * 32, 2, 32, page)
    window_pages = capacity.rounded(window_pages) if static else window_pages
    assert window_pages * page < 2 * positions
    full, held = state.cache[0][0], state.cache[0][-1]
    full_rows = 2 if static else 1
    assert (full.keys.shape[:3], held.keys.shape[:2]) == ((full_rows, 2, positions), (window_pages, page))
    dims = memory.model_dims(model.config)
    per_position = sum(t.nbytes for name in ("keep", "scores") for t in getattr(state, name)) // len(configs)
    layers = state.cache
    full_bytes = sum(b.keys.nbytes + b.values.nbytes for b in (layer[0] for layer in layers)) // full_rows
    full_bytes += per_position
    held_bytes = sum(getattr(b, f.name).nbytes for b in (layer[-1] for layer in layers) for f in dataclasses.fields(b))
    assert full_bytes == memory.cache_bytes(dims, positions, 4)
    assert held_bytes + per_position == memory.cache_bytes(dims, positions, 4, window_pages, page)
    per_config = memory.config_bytes(model.config, n, 32, 4, static=static)
    assert memory.cache_bytes(dims, positions, 4) < per_config < 4 * memory.cache_bytes(dims, positions, 4)
    rows = engine.evaluate("d", tokens, configs, answer=answer).to_pylist()
    keys_and_values = sum(b.keys.nbytes + b.values.nbytes for layer in step.state.cache for b in layer)
    assert {r["kv_cache_bytes"] for r in rows} == {keys_and_values}
