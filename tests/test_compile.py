"""Compiling the chunk step: timed apart from the chunks, cached on disk per machine, and never
worse than not compiling (issue 26 "Compile in seconds")."""

from __future__ import annotations

import functools
import os
import time

import pytest
import torch

from tests.helpers import tiny_llama
from workers import actor
from workers.contract.configs import EvalConfig
from workers.contract.plan import Task, TaskDocument, WorkerSettings
from workers.contract.settings import EngineSettings
from workers.engine.compile_cache import use_compile_cache
from workers.engine.core import Engine
from workers.presses import parse_method

CHUNK, WINDOW = 32, 32
CONFIGS = [EvalConfig(parse_method("baseline")), EvalConfig(parse_method("knorm"), -1.0)]


@pytest.fixture(scope="module")
def model() -> torch.nn.Module:
    return tiny_llama()


@pytest.fixture(scope="module")
def document() -> torch.Tensor:
    return torch.randint(0, 97, (150,), generator=torch.Generator().manual_seed(3))  # 5 chunks, last short


def numbers(rows) -> list[tuple]:
    return [(r["config"], r["chunk_index"], r["keys_kept"], round(r["nll_sum"], 4)) for r in rows.to_pylist()]


class SlowBackend:
    """Compiles by sleeping, then runs the graph as traced: a compile of known length."""

    def __init__(self, seconds: float) -> None:
        self.seconds, self.graphs = seconds, 0

    def __call__(self, graph: torch.fx.GraphModule, example_inputs: list) -> object:
        self.graphs += 1
        time.sleep(self.seconds)
        return graph.forward


def failing_backend(graph: torch.fx.GraphModule, example_inputs: list) -> object:
    raise RuntimeError("no C++ compiler on this node")


def test_the_compile_is_timed_apart_from_every_chunk(model, document):
    """The compile runs on a warm-up chunk before the document: the first chunk's forward seconds
    never hold it, the engine records it once, and the numbers are the uncompiled path's."""
    expected = numbers(Engine(model, EngineSettings(CHUNK, WINDOW)).evaluate("d", document, CONFIGS))
    torch._dynamo.reset()
    backend = SlowBackend(3.0)
    engine = Engine(model, EngineSettings(CHUNK, WINDOW, compile=True), compile_backend=backend)
    rows = engine.evaluate("d", document, CONFIGS)
    assert numbers(rows) == expected
    assert backend.graphs == 1 and engine.compile_seconds >= 3.0
    # A tiny model's chunk takes milliseconds: 3 s in any chunk would be the compile leaking in.
    assert max(rows.column("forward_seconds").to_pylist()) < 3.0
    compiled = engine.compile_seconds
    assert numbers(engine.evaluate("d", document, CONFIGS)) == expected
    assert engine.compile_seconds == compiled and backend.graphs == 1  # the same bucket: no new compile
    torch._dynamo.reset()


def test_a_compile_that_fails_runs_the_batch_uncompiled_with_one_notice(model, document, capsys):
    expected = numbers(Engine(model, EngineSettings(CHUNK, WINDOW)).evaluate("d", document, CONFIGS))
    torch._dynamo.reset()
    engine = Engine(model, EngineSettings(CHUNK, WINDOW, compile=True), "w3", compile_backend=failing_backend)
    assert numbers(engine.evaluate("d", document, CONFIGS)) == expected
    assert numbers(engine.evaluate("e", document, CONFIGS)) == expected
    notices = [line for line in capsys.readouterr().err.splitlines() if "failed" in line]
    assert len(notices) == 1
    assert notices[0] == (
        "kvorch: w3: compiling the chunk step (2 configs x 256 positions, 2 layers) failed "
        "(RuntimeError: no C++ compiler on this node); this batch runs the same step uncompiled"
    )
    torch._dynamo.reset()


def test_a_task_reports_its_compile_seconds_and_worker(monkeypatch, tiny_model_dir):
    """What the pool adds up per worker into status.json (orchestrator/pool/actors.py)."""
    monkeypatch.setattr(actor, "Engine", functools.partial(Engine, compile_backend=SlowBackend(1.0)))
    settings = WorkerSettings(tiny_model_dir, "float32", "cpu", 1, EngineSettings(CHUNK, WINDOW, compile=True), None)
    worker = actor.EvalWorker("w7", settings)
    vocab = worker.model.config.vocab_size
    ids = torch.randint(0, vocab, (100,), generator=torch.Generator().manual_seed(1)).tolist()
    torch._dynamo.reset()
    first = worker.run(Task("t0", (TaskDocument("a", ids),), tuple(CONFIGS)))
    second = worker.run(Task("t1", (TaskDocument("b", ids),), tuple(CONFIGS)))
    assert first.worker == second.worker == "w7"
    assert first.compile_seconds >= 1.0 and second.compile_seconds == 0.0
    torch._dynamo.reset()


def test_the_compile_cache_is_the_directory_given_with_home_expanded(monkeypatch, tmp_path):
    monkeypatch.setenv("HOME", str(tmp_path))
    monkeypatch.delenv("TORCHINDUCTOR_CACHE_DIR", raising=False)
    monkeypatch.delenv("TRITON_CACHE_DIR", raising=False)
    path = use_compile_cache("~/kvorch-cache/compile")
    assert path == tmp_path / "kvorch-cache" / "compile" and path.is_dir()
    assert os.environ["TORCHINDUCTOR_CACHE_DIR"] == str(path)
    assert os.environ["TRITON_CACHE_DIR"] == str(path / "triton")
    from torch._inductor.runtime.cache_dir_utils import cache_dir

    assert cache_dir() == str(path)  # what inductor itself reads, at every compile


@pytest.mark.slow
def test_a_real_compile_fills_the_cache_and_a_fresh_process_loads_it(tmp_path):
    """Inductor's caches in the directory given: a second process compiling the same function
    finds what the first one wrote (a cache hit), as a second actor on the machine does."""
    import subprocess
    import sys

    script = (
        "import sys, torch; from workers.engine.compile_cache import use_compile_cache; "
        "from torch._dynamo.utils import counters; use_compile_cache(sys.argv[1]); "
        "f = torch.compile(lambda x: torch.relu(x) * 2 + 1, fullgraph=True); f(torch.ones(8)); "
        "print(counters['inductor']['fxgraph_cache_hit'], counters['inductor']['fxgraph_cache_miss'])"
    )
    runs = [
        subprocess.run([sys.executable, "-c", script, str(tmp_path)], capture_output=True, text=True, timeout=600)
        for _ in range(2)
    ]
    assert all(r.returncode == 0 for r in runs), runs[0].stderr[-2000:]
    assert runs[0].stdout.split() == ["0", "1"] and runs[1].stdout.split() == ["1", "0"]
    assert any(tmp_path.rglob("*.py"))  # inductor's generated code lives in the directory given
