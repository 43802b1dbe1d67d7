"""kvpress presses through the adapter, run for real in the kvpress environment (.ci/run).

kvpress pins an older transformers than kvorch's main environment, so these tests live apart
and run in their own virtual environment; nothing here is skipped.
"""

from __future__ import annotations

import kvpress
import pytest
import torch

from tests.helpers import tiny_llama
from workers.contract.configs import EvalConfig
from workers.contract.settings import EngineSettings
from workers.engine.core import Engine
from workers.presses import parse_method
from workers.presses.kvpress_adapter import kvpress_instance


@pytest.fixture(scope="module")
def engine():
    return Engine(tiny_llama(), EngineSettings(32, 16))


@pytest.fixture(scope="module")
def tokens():
    return torch.randint(0, 97, (160,), generator=torch.Generator().manual_seed(3))


def rows_of(table, label):
    return [r for r in table.to_pylist() if r["config"] == label]


def test_kvpress_knorm_equals_native_knorm(engine, tokens):
    assert isinstance(kvpress_instance("KnormPress", ""), kvpress.KnormPress)
    tau = -0.25
    configs = [EvalConfig(parse_method("kvpress:KnormPress"), tau), EvalConfig(parse_method("knorm"), tau)]
    table = engine.evaluate("d", tokens, configs)
    ours, theirs = rows_of(table, f"knorm@{tau:g}"), rows_of(table, f"kvpress:KnormPress@{tau:g}")
    assert [r["keys_kept"] for r in ours] == [r["keys_kept"] for r in theirs]
    assert [r["nll_sum"] for r in ours] == pytest.approx([r["nll_sum"] for r in theirs], rel=1e-6)
    assert sum(r["keys_discarded_outside_window"] for r in ours) > 0


def test_kvpress_attention_press_evicts_and_minus_infinity_is_baseline(engine, tokens):
    press = parse_method("kvpress:ObservedAttentionPress:compression_ratio=0.0")
    configs = [EvalConfig(parse_method("baseline")), EvalConfig(press, float("-inf")), EvalConfig(press, 0.02)]
    table = engine.evaluate("d", tokens, configs)
    baseline = [r["nll_sum"] for r in rows_of(table, "baseline")]
    assert [r["nll_sum"] for r in rows_of(table, f"{press.label()}@-inf")] == pytest.approx(baseline, rel=1e-5)
    evicting = rows_of(table, f"{press.label()}@0.02")
    assert (
        0 < sum(r["keys_discarded_outside_window"] for r in evicting) < sum(r["keys_outside_window"] for r in evicting)
    )


def test_unknown_kvpress_class_is_a_clear_error(engine, tokens):
    with pytest.raises(ValueError, match="kvpress has no ScorerPress 'NoSuchPress'"):
        engine.evaluate("d", tokens, [EvalConfig(parse_method("kvpress:NoSuchPress"), 0.0)])


@pytest.mark.parametrize(
    "method", ["kvpress:ExpectedAttentionPress", "kvpress:SnapKVPress:window_size=8", "kvpress:TOVAPress"]
)
def test_kvpress_presses_run_and_minus_infinity_is_baseline(engine, tokens, method):
    press = parse_method(method)
    table = engine.evaluate("d", tokens, [EvalConfig(parse_method("baseline")), EvalConfig(press, float("-inf"))])
    baseline = [r["nll_sum"] for r in rows_of(table, "baseline")]
    assert [r["nll_sum"] for r in rows_of(table, f"{press.label()}@-inf")] == pytest.approx(baseline, rel=1e-5)
