"""The chunk step's two shapes (workers/engine/step.py): exact (uncompiled) against static
(what torch.compile traces), compiled whole or not.

The exact path is the reference: its presses are checked against naive formulas and kvpress
elsewhere (test_press_references.py, tests_kvpress/). Here every built-in press, under every
policy, must keep exactly the same keys at static shapes, with the same scores (relative 1e-6)
and NLL within 1e-6 relative, under every attention kernel, and the compiled step must never
recompile per chunk or per document of one length bucket.
"""

from __future__ import annotations

import dataclasses

import pytest
import torch
from torch import nn
from transformers import AutoModelForCausalLM

from orchestrator.errors import KvorchError
from orchestrator.sweep import compile_check
from orchestrator.sweep.spec import JobSpec, build_configs
from tests.families import FAMILIES, VOCAB
from tests.helpers import tiny_llama
from workers.contract import defaults
from workers.contract import settings as settings_module
from workers.contract.allocation import Allocation
from workers.contract.configs import EvalConfig
from workers.contract.settings import EngineSettings, chunk_bounds, padded_length
from workers.engine.core import Engine, ExecutionPath
from workers.presses import REGISTRY, parse_method
from workers.presses.kvzap import build_surrogate, save_surrogate
from workers.studies.head_stats import HeadStatsProbe
from workers.studies.qfilters import save_qfilters

CHUNK, WINDOW = 32, 32


def every_builtin_config(surrogate_dir: str) -> list[EvalConfig]:
    """Every built-in press with a tensor form, under the threshold policy and, for the scorers,
    the ratio and token-budget policies; the two expected-attention statistics; per-head windows; a KVzap surrogate;
    every allocation."""
    configs = build_configs(("all",), ())
    configs += [  # thresholds at which the tiny model's keys are evicted
        EvalConfig(parse_method("observed_attention"), 0.02),
        EvalConfig(parse_method("snapkv"), 0.02),
        EvalConfig(parse_method("tova"), 0.02),
        EvalConfig(parse_method("expected_attention:stats=running"), 0.01),
        EvalConfig(parse_method("h2o:protected_window=16"), 0.5),
        EvalConfig(parse_method("head_aware:base=40"), None),
        EvalConfig(parse_method(f"kvzap:path={surrogate_dir}"), 0.0),
        EvalConfig(parse_method("kvzap:path=" + surrogate_dir), 0.3),
    ]
    for method in ("knorm", "observed_attention", "h2o:protected_window=16", "snapkv", "tova", "random"):
        configs.append(EvalConfig(parse_method(method), ratio=0.5))
    configs.append(EvalConfig(parse_method("expected_attention"), ratio=0.3))
    for method in ("knorm", "h2o:protected_window=16", "expected_attention"):
        configs.append(EvalConfig(parse_method(method), budget=60))
    configs += [  # every allocation of a ranked policy (workers/contract/allocation.py)
        EvalConfig(parse_method("knorm"), ratio=0.5, allocation=Allocation("adakv")),
        EvalConfig(parse_method("snapkv"), budget=60, allocation=Allocation("adakv", alpha_safeguard=0.5)),
        EvalConfig(parse_method("expected_attention"), ratio=0.3, allocation=Allocation("pyramidkv", beta=2)),
        EvalConfig(parse_method("knorm"), budget=60, allocation=Allocation("file", shares=((1, 3), (2, 2)), name="f")),
    ]
    return configs + leaderboard_configs(surrogate_dir)


def leaderboard_configs(surrogate_dir: str) -> list[EvalConfig]:
    """The presses of issue 37 under the threshold, ratio and budget policies (LagKV with a lag
    the 250-token document holds several of; Q-Filters saved next to the KVzap surrogate; KVzip
    bound to scores)."""
    lagkv = "lagkv:lag_size=16,protected_window=32"
    scorers = (("keydiff", -0.3), (lagkv, 0.5), ("leverage", 0.0), ("compactor", 0.0))
    configs = [EvalConfig(parse_method(method), threshold) for method, threshold in scorers]
    configs += [EvalConfig(parse_method(method), ratio=0.5) for method, _ in scorers]
    configs += [EvalConfig(parse_method(m), budget=60) for m in ("keydiff", lagkv, "compactor")]
    wrappers = ("chunkkv:chunk_length=8", "criticalkv", "chunkkv:press=knorm", "criticalkv:press=expected_attention")
    configs += [EvalConfig(parse_method(wrappers[0]), 0.02), EvalConfig(parse_method(wrappers[1]), 0.02)]
    configs += [EvalConfig(parse_method(wrappers[2]), ratio=0.5), EvalConfig(parse_method(wrappers[3]), budget=60)]
    qfilter = parse_method(f"qfilter:path={surrogate_dir}/qfilters")
    configs += [EvalConfig(qfilter, 0.0), EvalConfig(qfilter, ratio=0.5)]
    # KVzip bound to made-up replay scores of 250 positions (the chunk step only looks them up;
    # the replay itself: tests/test_kvzip.py).
    kvzip = parse_method("kvzip").with_context_scores(torch.rand(2, 2, 250, generator=torch.Generator().manual_seed(5)))
    return configs + [EvalConfig(kvzip, 0.5), EvalConfig(kvzip, ratio=0.5)]


@pytest.fixture(scope="module")
def surrogate_dir(tmp_path_factory) -> str:
    torch.manual_seed(3)
    modules = build_surrogate(32, 2, None, 2)  # tiny_llama: hidden 32, 2 kv-heads, 2 layers
    for module in modules:
        nn.init.normal_(module.weight, std=0.5)
    path = tmp_path_factory.mktemp("kvzap")
    save_surrogate(modules, path, None)
    save_qfilters(torch.randn(2, 2, 8), path / "qfilters")  # tiny_llama: 2 layers, 2 kv-heads, head_dim 8
    return str(path)


@pytest.fixture(scope="module")
def model() -> nn.Module:
    return tiny_llama()


@pytest.fixture(scope="module")
def document() -> torch.Tensor:
    return torch.randint(0, 97, (250,), generator=torch.Generator().manual_seed(2))  # 8 chunks, last short


def assert_same_numbers(expected: list[dict], got: list[dict]) -> None:
    assert [r["config"] for r in expected] == [r["config"] for r in got]
    for a, b in zip(expected, got, strict=True):
        where = (a["config"], a["chunk_index"])
        assert b["keys_kept"] == a["keys_kept"], where
        assert b["n_correct"] == a["n_correct"], where
        assert b["nll_sum"] == pytest.approx(a["nll_sum"], rel=1e-6, abs=1e-9), where
        for column in ("keys_total", "keys_in_window", "keys_protected", "n_tokens", "window", "top1_agree"):
            assert b[column] == a[column], (where, column)
        # The logits of the two engines differ in float32 rounding (as the NLL above does).
        for column in ("kl_sum", "top5_overlap_sum"):
            assert b[column] == pytest.approx(a[column], rel=1e-4, abs=1e-4), (where, column)


def test_every_registered_press_but_the_kvpress_adapter_is_traceable(surrogate_dir):
    covered = {c.method for c in every_builtin_config(surrogate_dir)}
    assert covered == set(REGISTRY) - {"kvpress"}
    assert all(c.press.traceable for c in every_builtin_config(surrogate_dir))
    assert not parse_method("kvpress:KnormPress").traceable
    assert not HeadStatsProbe().traceable


def assert_every_press_evicts(rows: list[dict], configs: list[EvalConfig]) -> None:
    """The comparison must cover eviction: every method but baseline evicts in some config."""
    evicting = {r["config"] for r in rows if r["keys_kept"] < r["keys_total"]}
    methods = {c.method for c in configs} - {"baseline"}
    assert methods == {c.method for c in configs if c.label in evicting}


@pytest.mark.parametrize("attn", defaults.BACKENDS)
def test_static_shapes_give_the_exact_paths_rows_scores_and_keep_masks(model, document, surrogate_dir, attn):
    """Every built-in press, under every policy: the static-shape step (padded cache, padded last
    chunk, the layout torch.compile traces) against the exact one. Rows as numbers, and every
    key's final score and keep decision by value (float32: relative 1e-6)."""
    configs = every_builtin_config(surrogate_dir)
    exact = Engine(model, EngineSettings(CHUNK, WINDOW, attn, static=False))
    static = Engine(model, EngineSettings(CHUNK, WINDOW, attn, static=True))
    assert exact.path(configs) == ExecutionPath(compiled=False, static=False)
    assert static.path(configs) == ExecutionPath(compiled=False, static=True)
    expected = exact.evaluate("d", document, configs).to_pylist()
    rows = static.evaluate("d", document, configs).to_pylist()
    assert_same_numbers(expected, rows)
    assert_every_press_evicts(rows, configs)
    _, exact_scores = exact.inspect("d", document, configs)
    _, static_scores = static.inspect("d", document, configs)
    assert static_scores.configs == exact_scores.configs
    assert torch.equal(static_scores.kept, exact_scores.kept)
    assert exact_scores.scores.shape == (len(configs), 2, 2, 250)
    # atol 2e-6: leverage's inverse Gram matrix amplifies the float32 rounding in which the two
    # paths' keys of layer 1 differ (flex: 1.3e-6 on z-scores of order 1); keep masks are equal.
    torch.testing.assert_close(static_scores.scores, exact_scores.scores, rtol=1e-6, atol=2e-6, equal_nan=True)


class CountingBackend:
    """A torch.compile backend that counts the graphs it is given and runs them as traced."""

    def __init__(self) -> None:
        self.graphs = 0
        self.regions: list[str] = []  # per graph: its compiled layer regions, and how often each is called
        self.region_calls = 0

    def __call__(self, graph: torch.fx.GraphModule, example_inputs: list) -> object:
        self.graphs += 1
        self.regions += [name for name, _ in graph.named_children()]
        calls = [n for n in graph.graph.nodes if n.target is torch.ops.higher_order.invoke_subgraph]
        self.region_calls += len(calls)
        from torch._dynamo.backends.common import aot_autograd

        return aot_autograd(fw_compiler=lambda g, _: g.forward)(graph, example_inputs)


@pytest.mark.slow  # a 24 s compile of every config: the full suite runs it, the fast loop (under 3 minutes) does not
def test_the_step_compiles_whole_once_and_never_again_in_its_length_bucket(model, document, surrogate_dir):
    """fullgraph=True: one graph for every press and every policy, traced in the first chunk;
    no recompile in later chunks (bounds are tensors) or for a second document whose length pads
    to the same bucket, but the one rebuild once the threshold configs' pools are known (their
    first document held every position); one compiled layer region, called by both layers (a
    static step gives every layer's pool one size); the numbers are the exact path's."""
    configs = every_builtin_config(surrogate_dir)
    exact = Engine(model, EngineSettings(CHUNK, WINDOW, static=False))
    other = document[:200]  # 7 chunks: the same 256-position bucket
    expected = exact.evaluate("d", document, configs).to_pylist()
    # before the compiled engine hooks the same model (a forward fills every engine's hooks)
    expected_other = exact.evaluate("e", other, configs).to_pylist()
    torch._dynamo.reset()
    backend = CountingBackend()
    engine = Engine(model, EngineSettings(CHUNK, WINDOW, compile=True), compile_backend=backend)
    assert engine.path(configs) == ExecutionPath(compiled=True, static=True)
    graphs_after_chunk: list[int] = []
    rows = engine.evaluate("d", document, configs, lambda tokens: graphs_after_chunk.append(backend.graphs)).to_pylist()
    assert graphs_after_chunk == [1] * 8
    assert len(backend.regions) == 1 and backend.region_calls == 2  # one layer compiled, called by both
    assert_same_numbers(expected, rows)

    assert padded_length(200, CHUNK) == padded_length(250, CHUNK)
    second = engine.evaluate("e", other, configs).to_pylist()  # threshold pools now known: rebuilt once
    assert backend.graphs == 2 and len(backend.regions) == 2 and backend.region_calls == 4
    assert_same_numbers(expected_other, second)
    third = engine.evaluate("d", document, configs).to_pylist()  # the first document again
    assert backend.graphs == 2  # never again
    assert_same_numbers(expected, third)
    torch._dynamo.reset()


def test_padded_length_rounds_to_power_of_two_chunk_counts():
    assert [padded_length(n, 32) for n in (1, 32, 33, 64, 65, 250, 256, 257)] == [32, 32, 64, 64, 128, 256, 256, 512]


def test_chunk_bounds_cover_the_document_once():
    assert chunk_bounds(70, 32) == [(0, 32), (32, 64), (64, 70)]
    assert chunk_bounds(64, 32) == [(0, 32), (32, 64)]


def test_the_kvpress_adapter_runs_uncompiled_and_is_named_once():
    settings = EngineSettings(CHUNK, WINDOW, compile=True)
    configs = [EvalConfig(parse_method("baseline")), EvalConfig(parse_method("kvpress:KnormPress"), 0.0)]
    note = compile_check.eager_note(settings, configs)
    assert note.startswith("kvpress:KnormPress cannot be traced") and "\n" not in note
    assert compile_check.eager_note(settings, configs[:1]) is None
    engine = Engine(tiny_llama(), settings)
    assert engine.path(configs[:1]) == ExecutionPath(compiled=True, static=True)
    assert engine.path(configs) == ExecutionPath(compiled=False, static=False)
    assert Engine(tiny_llama(), EngineSettings(CHUNK, WINDOW)).path(configs[:1]) == ExecutionPath(False, False)


def test_flex_without_flexattention_is_a_one_line_error_naming_the_torch_needed(monkeypatch):
    monkeypatch.setattr(settings_module, "flex_available", lambda: False)
    with pytest.raises(KvorchError, match=r"--attn flex needs torch >= 2\.5") as excinfo:
        JobSpec(attn="flex")
    assert "\n" not in str(excinfo.value)


def test_compile_on_that_cannot_compile_fails_in_the_driver_and_auto_falls_back(monkeypatch, capsys):
    monkeypatch.setattr(compile_check, "compiler_problem", lambda device: "CppCompileError: no C++ compiler")
    settings = EngineSettings(CHUNK, WINDOW, compile=True)
    with pytest.raises(KvorchError, match="--compile on: torch.compile cannot compile on this machine"):
        compile_check.resolve_compile(settings, "on", "cpu")
    assert compile_check.resolve_compile(settings, "auto", "cpu").compile is False
    assert "running eager" in capsys.readouterr().err


def test_this_machine_can_compile():
    """The check itself, on a machine that has a C++ compiler: a real tiny inductor compile."""
    assert compile_check.compiler_problem("cpu") is None


@pytest.mark.parametrize(("family", "regions"), [("llama", 1), ("gemma3", 2)])
def test_one_compiled_layer_serves_every_layer_alike_whatever_the_depth(family, regions):
    """Compile cost independent of depth: a layer's work is traced once and reused by every layer
    with the same facts. Llama's 6 layers share one region; Gemma 3's sliding and global layers
    (another window, another RoPE) get one each, never one another's. The numbers are the exact
    path's, for presses that keep per-layer state, read RoPE, and hash the layer index."""
    config_class, kwargs = FAMILIES[family]
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(config_class(**{**kwargs, "num_hidden_layers": 6})).eval()
    document = torch.randint(2, VOCAB, (100,), generator=torch.Generator().manual_seed(1))
    configs = [
        EvalConfig(parse_method("baseline")),
        EvalConfig(parse_method("random"), 0.5),
        EvalConfig(parse_method("expected_attention"), 0.01),
        EvalConfig(parse_method("expected_attention:stats=running"), ratio=0.5),
        EvalConfig(parse_method("observed_attention"), budget=40),
    ]
    settings = EngineSettings(16, 16)
    expected = Engine(model, settings).evaluate("d", document, configs).to_pylist()
    torch._dynamo.reset()
    backend = CountingBackend()
    engine = Engine(model, dataclasses.replace(settings, compile=True), compile_backend=backend)
    rows = engine.evaluate("d", document, configs).to_pylist()
    assert backend.graphs == 1
    assert len(backend.regions) == regions
    assert backend.region_calls == 6
    assert_same_numbers(expected, rows)
    assert {r["config"] for r in rows if r["keys_kept"] < r["keys_total"]} >= {c.label for c in configs[1:]}
    torch._dynamo.reset()
