"""Faults on a real local Ray: dying actors, a killed driver, failing tasks, damaged parts, two
runs into one lake on a two-node cluster, a lost node and a pool larger than the cluster. Every
surviving lake must equal an undisturbed run."""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest
import ray
from click.testing import CliRunner
from ray._private import ray_constants
from ray.cluster_utils import Cluster

from orchestrator.cli import main
from orchestrator.lake.queries import connect
from orchestrator.lake.store import Lake
from tests.full_disk import full_disk
from workers.faults import FAULT_ENV

KVORCH = str(Path(sys.executable).parent / "kvorch")
# Timing, placement and the run's own id differ between runs; everything else in a row must not.
VOLATILE = ("forward_seconds", "worker", "run_id")
# Simulated clusters live on loopback: Ray's nodes, and every driver that joins them.
LOOPBACK = "127.0.0.1"
LOOPBACK_ENV = {ray_constants.ENABLE_RAY_CLUSTERS_ENV_VAR: "0"}
# The --actor-timeout of the tests where an actor is never placed (again), and how long a driver
# may take from its last part to exiting (status, table, disconnect): half of it, so a driver that
# waited for that actor's deadline fails, however busy the machine (the two used to be 60 and 10 s).
ACTOR_TIMEOUT = "600"
EXIT_SECONDS = 300
# Bounds that only turn a hang into a failure: far beyond what the step takes on a loaded machine.
HANG_SECONDS = 900


def job_args(model: str, lake: Path, *extra: str) -> list[str]:
    return [
        "submit",
        "--model",
        model,
        "--max-docs",
        "3",
        "--max-tokens",
        "128",
        "--chunk-size",
        "64",
        "--window",
        "32",
        "--methods",
        "baseline,window,h2o",
        "--lake",
        str(lake),
        "--no-progress",
        "--format",
        "json",
        *extra,
    ]


def kvorch(*args: str):
    return CliRunner().invoke(main, list(args), catch_exceptions=False)


def rows(lake: Path, run_id: str) -> list[tuple]:
    """Every row of a run, volatile columns dropped, in a canonical order."""
    con = connect(Lake(str(lake)))
    names = [c for (c,) in con.execute("SELECT column_name FROM (DESCRIBE chunks)").fetchall() if c not in VOLATILE]
    columns = ", ".join(f'"{c}"' for c in names)
    query = f"SELECT {columns} FROM chunks WHERE run_id = ? ORDER BY doc_id, chunk_index, config"
    return con.execute(query, [run_id]).fetchall()


def status(lake: Path, run_id: str) -> dict:
    return json.loads((lake / "runs" / f"run_id={run_id}" / "status.json").read_text())


def start_address() -> str:
    """The session's local Ray, for a driver in a subprocess to join."""
    return ray.get_runtime_context().gcs_address


def wait_for_first_task(proc: subprocess.Popen, lake: Path) -> None:
    """Until all three parts (one per method) of the first task are in the lake."""
    tic = time.perf_counter()
    while len(list(lake.glob("chunks/*/*/part-s0000-g000.parquet"))) < 3:
        assert proc.poll() is None, proc.stderr.read()
        assert time.perf_counter() - tic < HANG_SECONDS, "the first task never finished"
        time.sleep(0.2)


@pytest.fixture(scope="module")
def reference(local_ray, tmp_path_factory, tiny_model_dir) -> tuple[Path, list[tuple]]:
    """An undisturbed run (lake, rows): 3 docs x 2 chunks x 3 configs, one task per document."""
    lake = tmp_path_factory.mktemp("reference") / "lake"
    result = kvorch(*job_args(tiny_model_dir, lake, "--run-id", "ref"))
    assert result.exit_code == 0, result.output
    expected = rows(lake, "ref")
    assert len(expected) == len(set((r[0], r[1], r[4]) for r in expected)) == 3 * 2 * 3
    return lake, expected


def test_a_killed_actor_is_replaced_and_its_task_rerun(reference, tmp_path, tiny_model_dir, monkeypatch):
    marker = tmp_path / "died"
    monkeypatch.setenv(FAULT_ENV, f"exit:after=1,once={marker}")  # dies mid-task, after its first chunk
    lake = tmp_path / "lake"
    result = kvorch(*job_args(tiny_model_dir, lake, "--run-id", "r", "--actors", "2"))
    assert result.exit_code == 0, result.output
    assert marker.exists()
    assert status(lake, "r")["retries"] == 1 and status(lake, "r")["status"] == "finished"
    assert rows(lake, "r") == reference[1]


def test_a_task_that_always_fails_is_recorded_and_the_rest_completes(reference, tmp_path, tiny_model_dir, monkeypatch):
    monkeypatch.setenv(FAULT_ENV, "raise:task=s0001-g000")
    lake = tmp_path / "lake"
    result = CliRunner().invoke(main, job_args(tiny_model_dir, lake, "--run-id", "r", "--max-retries", "1"))
    assert result.exit_code != 0
    error = result.output.strip().splitlines()[-1]
    assert error.startswith("Error: 1 of 3 tasks failed (first: s0001-g000: ") and "injected failure" in error
    recorded = status(lake, "r")
    assert recorded["status"] == "failed" and "after 2 attempts" in recorded["failures"]["s0001-g000"]
    assert len(recorded["tasks_done"]) == 2
    got = rows(lake, "r")
    failed_doc = ({r[0] for r in reference[1]} - {r[0] for r in got}).pop()
    assert got == [r for r in reference[1] if r[0] != failed_doc]
    table = json.loads(kvorch("status", "--lake", str(lake), "--run", "r", "--format", "json").stdout)
    assert table[0] | {"created_at": None} == {
        "run_id": "r",
        "status": "failed",
        "tasks_done": 2,
        "tasks_total": 3,
        "rows": 2 * 2 * 3,
        "failed": 1,
        "incomplete_configs": 0,
        "damaged_parts": 0,
        "created_at": None,
    }


def test_a_damaged_part_is_never_counted_and_the_same_command_repairs_the_run(reference, tmp_path, tiny_model_dir):
    lake = tmp_path / "lake"
    shutil.copytree(reference[0], lake)
    part = sorted((lake / "chunks" / "run_id=ref" / "method=h2o").glob("part-*.parquet"))[0]
    part.write_bytes(part.read_bytes()[: part.stat().st_size // 2])  # a crash on a non-atomic filesystem
    stray = part.with_name(part.name + ".tmp-dead")
    stray.write_bytes(b"half a file")

    readable = rows(lake, "ref")
    assert len(readable) == len(reference[1]) - 6  # the damaged part's task, every method of it, nothing else
    status_result = kvorch("status", "--lake", str(lake), "--run", "ref", "--format", "json")
    table = json.loads(status_result.stdout)
    assert (table[0]["status"], table[0]["tasks_done"], table[0]["damaged_parts"]) == ("finished, then damaged", 2, 1)
    assert f"damaged part {part}" in status_result.stderr

    # The same command again, without a run id, finds the damaged run and repairs it in place.
    result = kvorch(*job_args(tiny_model_dir, lake))
    assert result.exit_code == 0, result.output
    assert "run ref:" in result.output and "(2 done, 1 to go)" in result.output
    assert rows(lake, "ref") == reference[1]
    assert not stray.exists()
    assert [p.name for p in (lake / "runs").iterdir()] == ["run_id=ref"]
    # The status counts the whole run, this attempt's own figures apart.
    recorded = status(lake, "ref")
    assert (recorded["rows"], len(recorded["tasks_done"]), recorded["tasks_resumed"]) == (len(reference[1]), 3, 2)
    assert recorded["attempt"] == {"number": 2, "rows": 2 * 3, "tasks_done": 1, "retries": 0}


def test_a_disk_that_fills_mid_run_fails_in_one_line_and_the_same_command_resumes(
    reference, tmp_path, tiny_model_dir, monkeypatch
):
    lake = tmp_path / "lake"
    args = job_args(tiny_model_dir, lake, "--run-id", "r", "--actors", "1")
    # The disk fills while the second task writes its second part (methods go in name order).
    disk = full_disk(fills_at=lambda path: "part-s0001-g000.parquet" in path and "method=h2o" in path)
    monkeypatch.setattr("orchestrator.cli.submit.Lake", lambda uri: Lake(uri, filesystem=disk))
    result = CliRunner().invoke(main, args)
    assert result.exit_code == 1
    errors = [line for line in result.output.splitlines() if line.startswith("Error:")]
    assert errors == [
        f"Error: cannot write to lake {lake} (No space left on device); free space or fix the lake, "
        "then run the same command again: finished tasks are kept"
    ]
    assert not [p for p in lake.rglob("*") if ".tmp-" in p.name]  # no failed write left a temporary
    first_task = rows(lake, "r")  # the first task, whole; none of the second task's written part
    assert len(first_task) == 6 and first_task == [r for r in reference[1] if r[0] == first_task[0][0]]

    monkeypatch.undo()
    result = kvorch(*args)
    assert result.exit_code == 0, result.output
    assert "(1 done, 2 to go)" in result.output
    assert rows(lake, "r") == reference[1]
    assert status(lake, "r")["status"] == "finished"


def test_a_changed_spec_under_the_same_run_id_is_refused(reference, tmp_path, tiny_model_dir):
    lake = tmp_path / "lake"
    shutil.copytree(reference[0], lake)
    result = CliRunner().invoke(main, [*job_args(tiny_model_dir, lake, "--run-id", "ref"), "--window", "16"])
    assert result.exit_code != 0
    assert "was made with a different spec (window: 32 -> 16)" in result.output


def test_a_killed_driver_resumes_with_only_the_missing_tasks(reference, tmp_path, tiny_model_dir):
    lake = tmp_path / "lake"
    args = job_args(tiny_model_dir, lake, "--actors", "1")
    env = {**os.environ, FAULT_ENV: "hang:task=s0001-g000"}  # the second task never returns
    proc = subprocess.Popen([KVORCH, *args, "--address", start_address()], env=env, stderr=subprocess.PIPE, text=True)
    try:
        wait_for_first_task(proc, lake)
    finally:
        proc.send_signal(signal.SIGKILL)
        proc.wait()
    (run_dir,) = (lake / "runs").iterdir()
    assert json.loads((run_dir / "status.json").read_text())["status"] == "running"  # as the killed driver left it

    result = kvorch(*args)  # the same command again, no run id: finds the unfinished run
    assert result.exit_code == 0, result.output
    run_id = run_dir.name.split("=", 1)[1]
    assert f"run {run_id}:" in result.output and "(1 done, 2 to go)" in result.output
    assert rows(lake, run_id) == reference[1]
    assert [p.name for p in (lake / "runs").iterdir()] == [run_dir.name]
    recorded = status(lake, run_id)
    assert (recorded["rows"], len(recorded["tasks_done"]), recorded["attempt"]["number"]) == (len(reference[1]), 3, 2)


def default_sigint() -> None:
    """A shell running the suite in the background ignores SIGINT and children inherit that; the
    driver gets the default disposition back, as in a terminal where a user presses Ctrl-C."""
    signal.signal(signal.SIGINT, signal.SIG_DFL)


@pytest.mark.parametrize(
    ("sent", "code", "said", "reason"),
    [
        (signal.SIGINT, 130, "kvorch: interrupted; finished parts are kept", "interrupted by Ctrl-C"),
        (signal.SIGTERM, 143, "kvorch: SIGTERM; finished parts are kept", "terminated by SIGTERM"),
    ],
)
def test_ctrl_c_or_sigterm_keeps_finished_parts_and_records_why(
    local_ray, tmp_path, tiny_model_dir, sent, code, said, reason
):
    lake = tmp_path / "lake"
    env = {**os.environ, FAULT_ENV: "hang:task=s0001-g000"}
    args = [*job_args(tiny_model_dir, lake, "--run-id", "r", "--actors", "1"), "--address", start_address()]
    proc = subprocess.Popen([KVORCH, *args], env=env, stderr=subprocess.PIPE, text=True, preexec_fn=default_sigint)
    try:
        wait_for_first_task(proc, lake)
        proc.send_signal(sent)
        _, err = proc.communicate(timeout=HANG_SECONDS)
    finally:
        proc.kill()  # a driver that missed the signal must not hold the shared Ray's CPUs for later tests
    assert proc.returncode == code, err
    assert said in err
    recorded = status(lake, "r")
    assert recorded["status"] == "interrupted" and recorded["tasks_done"] == ["s0000-g000"]
    assert recorded["reason"].startswith(reason)
    assert len(list(lake.glob("chunks/*/*/part-s0000-g000.parquet"))) == 3
    shown = json.loads(kvorch("status", "--lake", str(lake), "--format", "json").stdout)
    assert shown[0]["status"] == "interrupted"


@contextmanager
def on_loopback() -> Iterator[None]:
    """Ray nodes started here (and their processes) take 127.0.0.1, not the host's routed address."""
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv(ray_constants.ENABLE_RAY_CLUSTERS_ENV_VAR, "0")
        patch.setattr(ray_constants, "ENABLE_RAY_CLUSTER", False)
        yield


def add_node(cluster: Cluster) -> None:
    with on_loopback():
        cluster.add_node(num_cpus=1, node_ip_address=LOOPBACK)
    cluster.wait_for_nodes(timeout=HANG_SECONDS)  # Ray's default, 30 s, is short for a busy machine


@pytest.fixture(scope="module")
def two_nodes() -> Iterator[Cluster]:
    """A Ray cluster of two simulated one-CPU nodes and a head without CPUs (as cluster.yaml's), in
    processes of its own. A test that adds a node removes one."""
    with on_loopback():
        cluster = Cluster(
            initialize_head=True,
            head_node_args={"num_cpus": 0, "include_dashboard": False, "node_ip_address": LOOPBACK},
        )
    for _ in range(2):
        add_node(cluster)
    yield cluster
    cluster.shutdown()


def join(cluster: Cluster, args: list[str]) -> list[str]:
    """``kvorch`` with ``args`` as a driver of ``cluster``."""
    return [KVORCH, *args, "--address", cluster.address]


def last_part_written(lake: Path) -> float:
    return max(p.stat().st_mtime for p in lake.glob("chunks/*/*/part-*.parquet"))


def wait_for_marker(proc: subprocess.Popen, marker: Path) -> str:
    """The Ray node id a fault hook wrote into ``marker`` when it fired."""
    tic = time.perf_counter()
    while not (marker.exists() and marker.read_text()):
        assert proc.poll() is None, proc.stderr.read()
        assert time.perf_counter() - tic < HANG_SECONDS, "the fault never fired"
        time.sleep(0.2)
    return marker.read_text()


def test_two_runs_into_one_lake_at_once_on_two_nodes(reference, two_nodes, tmp_path, tiny_model_dir):
    lake = tmp_path / "lake"
    procs = [
        subprocess.Popen(
            join(two_nodes, job_args(tiny_model_dir, lake, "--run-id", run_id, "--actors", "1")),
            env={**os.environ, **LOOPBACK_ENV},
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
            text=True,
        )
        for run_id in ("a", "b")
    ]
    for proc in procs:
        _, err = proc.communicate(timeout=HANG_SECONDS)
        assert proc.returncode == 0, err
    for run_id in ("a", "b"):
        assert rows(lake, run_id) == reference[1]
        assert status(lake, run_id)["status"] == "finished"


def test_a_lost_node_without_spare_room_costs_one_retry_and_the_run_ends_by_itself(
    reference, two_nodes, tmp_path, tiny_model_dir
):
    add_node(two_nodes)  # three one-CPU nodes, one actor on each: no room for a restart
    marker, lake = tmp_path / "hung", tmp_path / "lake"
    args = job_args(tiny_model_dir, lake, "--run-id", "r", "--actors", "3", "--actor-timeout", ACTOR_TIMEOUT)
    env = {**os.environ, **LOOPBACK_ENV, FAULT_ENV: f"hang:task=s0000-g000,once={marker}"}
    proc = subprocess.Popen(
        join(two_nodes, args), env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True
    )
    try:
        node_id = wait_for_marker(proc, marker)  # the first attempt of s0000-g000 hangs on that node
        (node,) = [n for n in two_nodes.worker_nodes if n.node_id == node_id]
        two_nodes.remove_node(node)
        _, err = proc.communicate(timeout=HANG_SECONDS)
    finally:
        proc.kill()
    exited = time.time()
    assert proc.returncode == 0, err
    assert rows(lake, "r") == reference[1]
    # The lost actor's restart has most of its 600 s left; nothing waits for it.
    assert exited - last_part_written(lake) < EXIT_SECONDS
    worker = re.search(r"kvorch: worker (kvorch-worker-\d) lost \(", err).group(1)
    assert f"kvorch: task s0000-g000 re-queued (attempt 2 of 4): its worker {worker} was lost" in err
    recorded = status(lake, "r")
    assert recorded["status"] == "finished" and recorded["retries"] == 1
    assert [e["kind"] for e in recorded["events"] if e["kind"] != "node_lost"] == ["actor_lost", "task_requeued"]
    shown = CliRunner().invoke(main, ["status", "--lake", str(lake), "--run", "r"])
    assert re.search(rf"^r .+ \(attempt 1\) actor_lost: worker {worker} lost \(", shown.stderr, re.MULTILINE)


def test_a_pool_larger_than_the_cluster_starts_on_the_actors_that_fit_and_finishes(
    reference, two_nodes, tmp_path, tiny_model_dir
):
    lake = tmp_path / "lake"
    args = job_args(tiny_model_dir, lake, "--run-id", "r", "--actors", "3", "--actor-timeout", ACTOR_TIMEOUT)
    proc = subprocess.run(
        join(two_nodes, args),
        env={**os.environ, **LOOPBACK_ENV},
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
        timeout=HANG_SECONDS,
    )
    exited = time.time()
    assert proc.returncode == 0, proc.stderr
    assert "on 3 cpu actor(s)" in proc.stderr
    assert rows(lake, "r") == reference[1]
    # The third actor can never be placed and has most of its 600 s left; nothing waits for it.
    assert exited - last_part_written(lake) < EXIT_SECONDS
    # At most the two that fit ever loaded the model; whether the second finished loading before
    # the first had run every task is the machine's speed, so it is not asserted.
    assert 1 <= len(status(lake, "r")["workers"]) <= 2
