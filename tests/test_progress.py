"""Progress that moves per chunk (issue 29 "The first hour", point 4): the actor's batched reports
(workers/progress.py), the driver's bar (orchestrator/sweep/progress.py), the progress counter and
its Ray metrics (orchestrator/pool/progress.py), and a real job whose bar moves before its first
task ends. Every check is on counts, none on timing."""

from __future__ import annotations

import re

import ray
import torch
from click.testing import CliRunner

from orchestrator.cli import main
from orchestrator.pool.actors import PoolResult
from orchestrator.pool.progress import ProgressCounter
from orchestrator.sweep.progress import Progress, compiling_note
from tests.helpers import tiny_llama
from workers.actor import EvalWorker
from workers.contract.configs import EvalConfig
from workers.contract.plan import Task, TaskDocument, WorkerSettings
from workers.contract.settings import EngineSettings, chunk_bounds
from workers.engine.core import Engine
from workers.presses import parse_method
from workers.progress import ChunkReporter


class Remote:
    """``handle.method.remote(*args)`` of a Ray actor handle, recorded instead of sent."""

    def __init__(self, calls: list, name: str) -> None:
        self.calls, self.name = calls, name

    def remote(self, *args):
        self.calls.append((self.name, *args))


class FakeCounter:
    def __init__(self) -> None:
        self.calls: list[tuple] = []
        for name in ("report", "finish", "forget", "snapshot", "compiling"):
            setattr(self, name, Remote(self.calls, name))


def test_the_reporter_sends_the_first_chunk_at_once_then_batches():
    counter, deltas = FakeCounter(), []
    reporter = ChunkReporter(counter, "t0", period=3600, on_flush=deltas.append)
    for _ in range(5):
        reporter.add(32)
    assert counter.calls == [("report", "t0", 32)]  # the first chunk; the rest wait for the period
    reporter.flush()
    reporter.flush()  # nothing new: nothing sent
    assert counter.calls == [("report", "t0", 32), ("report", "t0", 160)] and deltas == [32, 128]
    every = ChunkReporter(counter, "t1", period=0)
    for _ in range(3):
        every.add(10)
    assert [c[2] for c in counter.calls if c[1] == "t1"] == [10, 20, 30]


def test_a_task_reports_token_configs_per_chunk_summing_to_its_cost():
    """EvalWorker.run outside Ray: the counter hears running totals that grow chunk by chunk and
    end at the task's cost (tokens x configs), with no report waiting on an answer."""
    settings = EngineSettings(chunk_size=16, window=8)
    worker = EvalWorker("w", WorkerSettings("tiny", "float32", "cpu", 1, settings), load=False)
    worker.model = tiny_llama()
    worker.engine, worker._loaded = Engine(worker.model, settings), True
    generator = torch.Generator().manual_seed(0)
    ids = [torch.randint(0, 97, (n,), generator=generator).tolist() for n in (40, 64)]
    docs = tuple(TaskDocument(f"d{i}", doc) for i, doc in enumerate(ids))
    configs = tuple(EvalConfig(parse_method(m), t) for m, t in (("baseline", None), ("knorm", -16.0), ("window", None)))
    task = Task("s0000-g000", docs, configs)
    counter = FakeCounter()
    worker.run(task, counter)
    totals = [c[2] for c in counter.calls]
    assert all(c[:2] == ("report", task.task_id) for c in counter.calls)
    first_chunk = chunk_bounds(40, 16)[0][1] * len(configs)
    assert totals[0] == first_chunk and totals[-1] == task.cost == (40 + 64) * 3
    assert totals == sorted(set(totals))  # running totals: they only grow


def test_a_compiling_worker_tells_the_counter_what_it_compiles_and_for_how_long():
    """issue 26: while a step compiles, the driver's line says so (the worker's start and end
    reach the counter without waiting), and the bar's rate never counts it."""
    settings = EngineSettings(chunk_size=16, window=8, compile=True)
    worker = EvalWorker("w5", WorkerSettings("tiny", "float32", "cpu", 1, settings), load=False)
    worker.model = tiny_llama()
    worker.engine, worker._loaded = Engine(worker.model, settings, "w5", compile_backend="eager"), True
    task = Task("t", (TaskDocument("d", list(range(40))),), (EvalConfig(parse_method("baseline")),))
    counter = FakeCounter()
    torch._dynamo.reset()
    worker.run(task, counter)
    torch._dynamo.reset()
    compiles = [c for c in counter.calls if c[0] == "compiling"]
    what = "the chunk step (1 configs x 64 positions, 2 layers)"
    assert [c[:3] for c in compiles] == [("compiling", "w5", what)] * 2
    assert compiles[0][3] is None and compiles[1][3] >= 0
    assert counter.calls.index(compiles[1]) < next(i for i, c in enumerate(counter.calls) if c[0] == "report")

    note = compiling_note({"w1": ("step B", 100.0), "w0": ("step A", 58.0)}, now=100.4)
    assert note == ", compiling on w0: step A for 42 s (+1 more)"
    assert compiling_note({}, now=1.0) == ""
    progress = Progress(tasks(10), done=set(), enabled=True, counter=FakeCounter())
    progress.compiling = {"w0": ("step A", 0.0)}
    progress._postfix()
    assert "tasks 0/1, failed 0, retries 0, compiling on w0: step A for" in str(progress.bar)
    progress.close()


def tasks(*costs: int) -> list[Task]:
    """Tasks of one config whose cost is ``costs``' token counts."""
    config = (EvalConfig(parse_method("baseline")),)
    return [Task(f"t{i}", (TaskDocument(f"d{i}", [0] * n),), config) for i, n in enumerate(costs)]


def test_the_bar_counts_reported_chunks_drops_a_failed_attempt_and_ends_at_the_total():
    plan = tasks(100, 60, 40)
    counter = FakeCounter()
    progress = Progress(plan, done={"t2"}, enabled=True, counter=counter)
    assert progress.bar.n == 40 and progress.bar.total == 200  # a resumed run starts at what is done
    progress.partial = {"t0": 30, "t1": 500}  # t1's batch raised and was re-run config by config
    progress._show()
    assert progress.bar.n == 40 + 30 + 60  # each running task at most its cost
    state = PoolResult()
    state.retries = 1
    progress.update(plan[1], succeeded=False, state=state)  # t1's attempt failed: its count goes
    assert progress.bar.n == 40 + 30 and ("forget", "t1") in counter.calls
    progress.update(plan[0], succeeded=True, state=state)
    assert progress.bar.n == 140 and ("finish", "t0", 100) in counter.calls
    progress.partial = {"t0": 100, "t1": 20}  # a snapshot taken before t0's finish arrived
    progress._show()
    assert progress.bar.n == 160  # t0 counted once
    progress.update(plan[1], succeeded=True, state=state)
    assert progress.bar.n == progress.bar.total == 200 and progress.tasks_done == 3
    assert "tasks 3/3, failed 0, retries 1" in str(progress.bar)
    progress.close()


def test_the_counter_drops_late_reports_and_exports_its_counts(local_ray):
    counter = ray.remote(ProgressCounter).options(num_cpus=0).remote("kvorch-tests", 300, 50)
    try:
        counter.report.remote("a", 10)
        counter.report.remote("b", 20)
        counter.finish.remote("a", 100)
        counter.report.remote("a", 90)  # a late report of a finished task
        counter.forget.remote("b")
        counter.report.remote("c", 5)
        assert ray.get(counter.snapshot.remote()) == {"c": 5}
        counter.compiling.remote("w0", "step A", None)
        counter.compiling.remote("w1", "step B", None)
        counter.compiling.remote("w1", "step B", 12.5)  # w1 is done compiling
        assert list(ray.get(counter.compiling_now.remote())) == ["w0"]
        assert ray.get(counter.exported.remote()) == {"done": 155, "total": 300}
    finally:
        ray.kill(counter)


# A bar line as tqdm prints it: "token-configs:  11%|█  | 96.0/864 [00:01<00:02, 90.1tok/s, tasks 0/3, ...]"
# (tqdm's unit scale gives 3 significant digits: exact below 1000).
BAR = re.compile(r"token-configs:\s+\d+%\|[^|]*\| ([\d.]+)/([\d.]+) \[[^\]]*tasks (\d+)/(\d+)")


def test_a_job_shows_progress_that_moves_before_its_first_task_ends(local_ray, tmp_path, tiny_model_dir, monkeypatch):
    """Every task pauses after its first chunk (a slow chunk, KVORCH_TEST_FAULT): the bar shows
    that chunk's token-configs while no task has ended, and its counts end at the job's total."""
    monkeypatch.setenv("KVORCH_TEST_FAULT", "pause:after=1,seconds=2")
    monkeypatch.setattr("orchestrator.sweep.progress.POLL_SECONDS", 0.1)
    args = ["--model", tiny_model_dir, "--max-docs", "3", "--max-tokens", "96", "--chunk-size", "32"]
    args += ["--window", "16", "--methods", "baseline,knorm,window", "--no-agreement", "--lake", str(tmp_path / "lake")]
    result = CliRunner().invoke(main, ["submit", *args], catch_exceptions=False)
    assert result.exit_code == 0, result.output
    lines = [BAR.search(piece) for piece in re.split(r"[\r\n]", result.stderr)]
    seen = [tuple(int(float(g)) for g in m.groups()) for m in lines if m]
    total = 3 * 96 * 3  # documents x tokens x configs
    assert seen and all(t == total for _, t, _, _ in seen)
    n_tasks = seen[0][3]
    first_chunk = 32 * 3
    # Before any task ended the bar stood at whole chunks' token-configs, not at 0: one chunk, or
    # one per actor when the actors' first reports reach the counter within one poll (a busy machine).
    assert any(tasks_done == 0 and n > 0 and n % first_chunk == 0 for n, _, tasks_done, _ in seen), seen
    # Counts only grow, and end at the job's total with every task done.
    assert [n for n, *_ in seen] == sorted(n for n, *_ in seen)
    assert seen[-1] == (total, total, n_tasks, n_tasks)
