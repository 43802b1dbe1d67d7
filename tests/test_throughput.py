"""The throughput paths (issue 8) must not change a number: ``--compact`` (physical eviction)
against the masked cache, ``--compile`` against the eager forward, and compiling must not
recompile per chunk; ``--batch-configs auto`` sizes batches from memory."""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch
import torch._dynamo

from orchestrator.errors import KvorchError
from orchestrator.sweep.spec import JobSpec
from tests.helpers import write_head_table
from tests.test_engine import by_config, default_configs
from workers import memory
from workers.chunk_step import padded_length
from workers.configs import EvalConfig
from workers.engine import Engine, EngineSettings
from workers.presses import ALL_METHODS, REGISTRY, parse_method

DENSITY_COLUMNS = (
    "keys_total",
    "keys_in_window",
    "keys_outside_window",
    "keys_kept",
    "keys_discarded_outside_window",
    "keys_protected",
    "keys_kept_unprotected",
)


def assert_same_rows(expected: list[dict], got: list[dict], rel: float) -> None:
    assert [(r["config"], r["chunk_index"]) for r in got] == [(r["config"], r["chunk_index"]) for r in expected]
    for x, y in zip(expected, got, strict=True):
        assert y["nll_sum"] == pytest.approx(x["nll_sum"], rel=rel), (x["config"], x["chunk_index"])
        assert y["n_correct"] == x["n_correct"]
        assert {c: y[c] for c in DENSITY_COLUMNS} == {c: x[c] for c in DENSITY_COLUMNS}


def evicting_configs() -> list[EvalConfig]:
    """Every method of ``--methods all`` at its defaults, plus thresholds that evict much more."""
    stricter = {"random": 0.7, "knorm": -3.0, "expected_attention": 0.05, "observed_attention": 0.01, "h2o": 2.0}
    return default_configs() + [EvalConfig(REGISTRY[m](), tau) for m, tau in stricter.items()]


@pytest.mark.parametrize("attn", ["sdpa", "eager"])
def test_compact_cache_gives_the_masked_rows_for_every_method(tiny_model, tokens, attn):
    configs = evicting_configs()
    assert {c.method for c in configs} == set(ALL_METHODS)
    masked = Engine(tiny_model, EngineSettings(32, 32, attn)).evaluate("d", tokens, configs).to_pylist()
    compact = Engine(tiny_model, EngineSettings(32, 32, attn, compact=True)).evaluate("d", tokens, configs).to_pylist()
    assert any(r["keys_kept"] < r["keys_total"] // 2 for r in masked)  # the comparison covers real evictions
    assert_same_rows(masked, compact, rel=1e-5)


def test_compact_cache_gives_the_masked_rows_under_the_ratio_policy(tiny_model, tokens):
    """Evictions among old keys at any chunk; every press but those that would read evicted keys
    (expected attention), which the next test shows refusing."""
    scoring = [REGISTRY[m]() for m in ALL_METHODS if REGISTRY[m].default_thresholds != (None,)]
    configs = [EvalConfig(press, ratio=0.6) for press in scoring]
    assert [c.method for c in configs if c.needs_evicted_keys] == ["expected_attention"]
    configs = [c for c in configs if not c.needs_evicted_keys]
    masked = Engine(tiny_model, EngineSettings(32, 16)).evaluate("d", tokens, configs).to_pylist()
    compact = Engine(tiny_model, EngineSettings(32, 16, compact=True)).evaluate("d", tokens, configs).to_pylist()
    assert_same_rows(masked, compact, rel=1e-5)


def test_compact_cache_gives_the_masked_rows_with_per_head_windows(tiny_model, tokens, tmp_path):
    """Head-aware windows differ per (layer, kv-head), so each head's cache holds another count;
    batched with presses that read keys (knorm) and rescore them (expected attention)."""
    classes = [["positional", "positional", "gathering", "mixed"], ["mixed", "gathering", "positional", "positional"]]
    table = write_head_table(tmp_path / "heads.parquet", classes, [[1.0] * 4] * 2, [[8] * 4] * 2)
    configs = [
        EvalConfig(parse_method(f"head_aware:policy=class,heads={table},positional=8,mixed=24,gathering=48")),
        EvalConfig(parse_method("knorm"), -3.0),
        EvalConfig(parse_method("expected_attention"), 0.05),
    ]
    masked = Engine(tiny_model, EngineSettings(32, 16)).evaluate("d", tokens, configs).to_pylist()
    compact = Engine(tiny_model, EngineSettings(32, 16, compact=True)).evaluate("d", tokens, configs).to_pylist()
    assert any(r["keys_kept"] < r["keys_total"] // 2 for r in masked if r["method"] == "head_aware")
    assert_same_rows(masked, compact, rel=1e-5)


def test_compact_cache_refuses_a_press_that_reads_evicted_keys(tiny_model, tokens):
    """Expected attention rescores every kept key under the ratio policy, reading keys that the
    budget may already have evicted: with --compact they are gone, so it says so."""
    config = EvalConfig(parse_method("expected_attention"), ratio=0.5)
    with pytest.raises(ValueError, match="run it without --compact"):
        Engine(tiny_model, EngineSettings(32, 16, compact=True)).evaluate("d", tokens, [config])
    with pytest.raises(KvorchError, match="--compact drops evicted keys, but expected_attention@ratio=0.5 rescores"):
        JobSpec(methods=("knorm,expected_attention",), policy="ratio", ratios=(0.5,), compact=True)
    JobSpec(methods=("knorm,expected_attention",), compact=True)  # the threshold policy reads only undecided keys


@pytest.mark.parametrize("chunk", [16, 64])
def test_compact_memory_tracks_the_kept_keys(tiny_model, tokens, chunk):
    """StreamingLLM keeps exactly sinks + window: the compact cache holds those plus the chunk,
    the masked one the whole document (the chunk step: padded to its length bucket), whatever
    the density."""
    window, layers, kv_heads, head_dim, fp32 = 40, 2, 2, 8, 4
    config = [EvalConfig(parse_method("streaming_llm"))]
    per_entry = layers * kv_heads * head_dim * 2 * fp32  # keys + values of one position, all layers
    # One config alone (no reference row for the agreement columns): memory of that config only.
    compact = Engine(tiny_model, EngineSettings(chunk, window, compact=True, agreement=False)).evaluate(
        "d", tokens, config
    )
    masked = Engine(tiny_model, EngineSettings(chunk, window, agreement=False)).evaluate("d", tokens, config)
    for r in compact.to_pylist():
        s, e = r["chunk_start"], r["chunk_end"]
        held = len(set(range(min(4, s))) | set(range(max(0, s - window), s)))
        assert r["kv_cache_bytes"] == (held + e - s) * per_entry
    assert set(masked.column("kv_cache_bytes").to_pylist()) == {len(tokens) * per_entry}
    step = Engine(tiny_model, EngineSettings(chunk, window, graph=True, agreement=False)).evaluate("d", tokens, config)
    assert set(step.column("kv_cache_bytes").to_pylist()) == {padded_length(len(tokens), chunk) * per_entry}


class CountingBackend:
    """A torch.compile backend that counts the graphs compiled and runs them as traced."""

    def __init__(self) -> None:
        self.graphs = 0

    def __call__(self, graph: torch.fx.GraphModule, example_inputs: list) -> object:
        self.graphs += 1
        return graph.forward


def test_eager_engines_compiled_forward_compiles_once_per_batch_shape_and_gives_the_same_rows(tiny_model):
    """The eager per-layer engine (kept for --compact and presses without a tensor form) compiles
    the model's forward around its attention. 8 chunks, the last one short: compiled graphs are
    made in the first chunk and once more when the batch grows from the shared prefix's 1 row to
    every config's; never per chunk, and not again for the next document. Rows equal the uncompiled engine's."""
    tokens = torch.randint(0, 97, (250,), generator=torch.Generator().manual_seed(2))
    configs = [
        EvalConfig(parse_method("baseline")),
        EvalConfig(parse_method("streaming_llm")),
        EvalConfig(parse_method("h2o:protected_window=16"), 0.5),
        EvalConfig(parse_method("expected_attention"), 0.05),
    ]
    settings = EngineSettings(32, 32, graph=False)
    expected = Engine(tiny_model, settings).evaluate("d", tokens, configs).to_pylist()
    torch._dynamo.reset()
    backend = CountingBackend()
    engine = Engine(tiny_model, EngineSettings(32, 32, compile=True, graph=False), compile_backend=backend)
    compiled_by_chunk: list[int] = []
    rows = engine.evaluate("d", tokens, configs, lambda: compiled_by_chunk.append(backend.graphs)).to_pylist()
    assert len(compiled_by_chunk) == 8
    chunks_that_compiled = sum(b > a for a, b in zip([0, *compiled_by_chunk], compiled_by_chunk))
    assert chunks_that_compiled <= 2, compiled_by_chunk
    assert_same_rows(expected, rows, rel=1e-5)
    assert any(r["keys_kept"] < r["keys_total"] for r in rows)

    before = backend.graphs
    second = engine.evaluate("e", tokens[:200], configs[:3]).to_pylist()
    assert backend.graphs == before
    assert_same_rows(Engine(tiny_model, settings).evaluate("e", tokens[:200], configs[:3]).to_pylist(), second, 1e-5)
    torch._dynamo.reset()


def test_compiled_compact_engine_gives_the_masked_rows(tiny_model, tokens):
    configs = default_configs()
    expected = by_config(Engine(tiny_model, EngineSettings(64, 32)).evaluate("d", tokens, configs))
    torch._dynamo.reset()
    engine = Engine(tiny_model, EngineSettings(64, 32, compile=True, compact=True), compile_backend="eager")
    got = by_config(engine.evaluate("d", tokens, configs))
    torch._dynamo.reset()
    for label, rows in expected.items():
        assert_same_rows(rows, got[label], rel=1e-5)


def test_batch_size_estimate_on_made_up_numbers():
    """A 30-layer model with 3 kv-heads of 64 dims in bf16 over 4096 tokens: the KV cache of one
    config is 30 * 3 * 4096 * 64 * 2 * 2 bytes = 90 MiB; the rest is bookkeeping and activations."""
    config = SimpleNamespace(
        num_hidden_layers=30,
        num_attention_heads=9,
        num_key_value_heads=3,
        hidden_size=576,
        intermediate_size=1536,
        vocab_size=49152,
    )
    per_config = memory.config_bytes(config, max_tokens=4096, chunk_size=128, dtype_bytes=2)
    kv_cache = 30 * 3 * 4096 * 64 * 2 * 2
    bookkeeping = 30 * 3 * 4096 * 5
    activations = 128 * (4 * 576 + 2 * 1536) * 2 + 128 * 49152 * (2 + 4) + 9 * 128 * 4096 * 4
    assert per_config == kv_cache + bookkeeping + activations
    assert memory.configs_per_forward(per_config, available=10 * per_config) == 5  # half of it planned for
    assert memory.configs_per_forward(per_config, available=per_config) == 1  # never below one
    assert memory.configs_per_forward(per_config, available=1000 * per_config) == memory.MAX_CONFIGS_PER_FORWARD
    assert memory.configs_per_forward(100, available=10_000, cap=8) == 8


@pytest.mark.parametrize(("given", "parsed"), [("auto", "auto"), ("12", 12), (3, 3)])
def test_batch_configs_is_auto_or_a_count(given, parsed):
    assert JobSpec(methods=("baseline",), batch_configs=given).batch_configs == parsed
    assert JobSpec(methods=("baseline",)).batch_configs == "auto"


@pytest.mark.parametrize("bad", ["0", "-2", "many", "1.5", 0])
def test_bad_batch_configs_say_what_to_fix(bad):
    with pytest.raises(KvorchError, match="--batch-configs must be auto or a whole number >= 1"):
        JobSpec(methods=("baseline",), batch_configs=bad)


def test_compile_auto_is_on_for_cuda_only():
    spec = JobSpec(methods=("baseline",))
    assert (spec.engine_for("cuda").compile, spec.engine_for("cpu").compile) == (True, False)
    assert JobSpec(methods=("baseline",), compile="on").engine_for("cpu").compile
    assert not JobSpec(methods=("baseline",), compile="off").engine_for("cuda").compile
    assert JobSpec(methods=("baseline",), compact=True).engine_for("cpu").compact
    with pytest.raises(KvorchError, match="--compile 'yes' is unknown"):
        JobSpec(methods=("baseline",), compile="yes")
