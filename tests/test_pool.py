"""The worker pool under faults, on the shared local Ray (2 CPUs) with stand-in workers
(tests/fake_worker.py): actors Ray cannot place, lost actors whose restart never comes, a pool
left with none. The real job on a real multi-node cluster is in tests/test_faults.py."""

from __future__ import annotations

import re
import time

import pytest

from orchestrator.errors import KvorchError
from orchestrator.pool.actors import PoolPlan, PoolResult, WorkerPool, run_pool
from tests.fake_worker import Behaviour, FakeTask, FakeWorker

pytestmark = pytest.mark.usefixtures("local_ray")


def pool(n_actors: int, behaviour: Behaviour, timeout: float, cpus: int = 1) -> WorkerPool:
    plan = PoolPlan(n_actors, num_gpus=0, num_cpus=cpus, device="cpu")
    return WorkerPool(plan, FakeWorker, (behaviour,), timeout)


def run(workers: WorkerPool, n_tasks: int, result: PoolResult) -> None:
    tasks = [FakeTask(f"t{i}") for i in range(n_tasks)]
    run_pool(tasks, workers, result, lambda task, rows: 0, lambda *_: None, max_retries=3)  # type: ignore[arg-type]


def kinds(result: PoolResult) -> list[str]:
    return [e["kind"] for e in result.events]


def test_an_actor_that_cannot_be_placed_is_given_up_and_the_others_finish_the_run():
    result = PoolResult()
    with pool(3, Behaviour(task_seconds=1.5), timeout=6) as workers:  # 2 CPUs: one actor never fits
        run(workers, 10, result)
    assert sorted(result.tasks_done) == sorted(f"t{i}" for i in range(10)) and not result.failures
    assert kinds(result) == ["actor_given_up"]
    assert re.fullmatch(
        r"worker kvorch-worker-\d could not be placed within --actor-timeout 6 s; pool shrunk to 2",
        result.events[0]["detail"],
    )
    assert len(result.workers) == 2


def test_a_lost_actor_whose_restart_never_comes_does_not_keep_the_pool_waiting(tmp_path):
    result = PoolResult()
    tic = time.monotonic()
    with pool(2, Behaviour(task_seconds=0.5, die_once=str(tmp_path / "died")), timeout=60) as workers:
        run(workers, 4, result)
    assert time.monotonic() - tic < 30  # the restart check has 60 s left when the work is done
    assert sorted(result.tasks_done) == ["t0", "t1", "t2", "t3"] and not result.failures
    assert result.retries == 1 and kinds(result) == ["actor_lost", "task_requeued"]
    assert re.fullmatch(
        r"task t\d re-queued \(attempt 2 of 4\): its worker kvorch-worker-\d was lost", result.events[1]["detail"]
    )


def test_a_lost_actor_not_placed_again_in_time_leaves_the_pool(tmp_path):
    result = PoolResult()
    with pool(2, Behaviour(task_seconds=1, die_once=str(tmp_path / "died")), timeout=2) as workers:
        run(workers, 8, result)
    assert len(result.tasks_done) == 8 and not result.failures
    assert kinds(result) == ["actor_lost", "task_requeued", "pool_shrunk"]
    lost = re.search(r"kvorch-worker-\d", result.events[0]["detail"]).group()
    assert result.events[2]["detail"] == (
        f"worker {lost} could not be placed again within --actor-timeout 2 s; pool shrunk to 1"
    )


def test_a_pool_left_with_no_worker_fails_with_one_line_naming_what_was_not_run(tmp_path):
    result = PoolResult()
    with pool(1, Behaviour(die_once=str(tmp_path / "died")), timeout=2) as workers:
        with pytest.raises(KvorchError) as error:
            run(workers, 3, result)
    assert str(error.value) == (
        "every worker was lost and none could be placed again within --actor-timeout 2 s; "
        "3 task(s) not run, run the same command again to resume"
    )
    assert sorted(result.failures) == ["t0", "t1", "t2"]
    assert kinds(result) == ["actor_lost", "task_requeued", "pool_shrunk"]


def test_no_actor_placed_in_time_stops_the_job_before_anything_runs():
    tic = time.monotonic()
    with pool(1, Behaviour(), timeout=1, cpus=3) as workers:  # more CPUs than the local Ray has
        with pytest.raises(KvorchError, match=r"^no worker could be placed within --actor-timeout 1 s \(each asks"):
            workers.first_ready()
    assert time.monotonic() - tic < 20
    assert [e["kind"] for e in workers.events] == ["actor_given_up"]


def test_a_worker_that_cannot_load_the_model_stops_the_job_with_the_reason():
    with pool(1, Behaviour(load_error="no model at /nowhere"), timeout=60) as workers:
        with pytest.raises(KvorchError) as error:
            workers.first_ready()
    assert str(error.value) == "a worker failed to start: OSError: no model at /nowhere; check --model/--device"
