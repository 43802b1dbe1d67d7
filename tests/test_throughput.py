"""What the cache holds on each path, and ``--batch-configs auto``'s sizing from memory. (That
compiling changes no number and never recompiles per chunk: tests/test_chunk_step.py.)"""

from __future__ import annotations

from types import SimpleNamespace

import pytest

from orchestrator.errors import KvorchError
from orchestrator.sweep.spec import JobSpec
from tests.test_engine import default_configs
from workers.contract import memory
from workers.contract.configs import EvalConfig
from workers.contract.settings import EngineSettings, padded_length
from workers.engine.core import Engine
from workers.presses import REGISTRY, parse_method

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


@pytest.mark.parametrize("chunk", [16, 64])
def test_the_cache_holds_the_document_uncompiled_and_its_bucket_with_static_shapes(tiny_model, tokens, chunk):
    """The masked cache (``--cache masked``) holds every position whatever the density: the
    document's own length on the uncompiled path, its power-of-two length bucket with a compiled
    step's static shapes; ``kv_cache_bytes`` says so on every row. (The held cache's bytes:
    tests/test_held_cache.py.)"""
    window, layers, kv_heads, head_dim, fp32 = 40, 2, 2, 8, 4
    config = [EvalConfig(parse_method("streaming_llm"))]
    per_entry = layers * kv_heads * head_dim * 2 * fp32  # keys + values of one position, all layers
    # One config alone (no reference row for the agreement columns): memory of that config only.
    masked = EngineSettings(chunk, window, agreement=False, cache="masked")
    exact = Engine(tiny_model, masked).evaluate("d", tokens, config)
    assert set(exact.column("kv_cache_bytes").to_pylist()) == {len(tokens) * per_entry}
    step = Engine(tiny_model, EngineSettings(chunk, window, static=True, agreement=False, cache="masked")).evaluate(
        "d", tokens, config
    )
    assert set(step.column("kv_cache_bytes").to_pylist()) == {padded_length(len(tokens), chunk) * per_entry}
    assert padded_length(len(tokens), chunk) > len(tokens)


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
    per_config = memory.config_bytes(config, max_tokens=4096, chunk_size=128, dtype_bytes=2, static=False)
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
    with pytest.raises(KvorchError, match="--compile 'yes' is unknown"):
        JobSpec(methods=("baseline",), compile="yes")
