"""What a submission says before Ray starts about work the lake already holds (issue 39,
point 5): a finished ``--run-id`` resubmitted computes nothing and never starts Ray; a new run
of a spec whose results exist, or are being computed now, says so; a resume says what is left.

Ray is replaced by a stand-in that fails the test if it is started where it must not be, and
otherwise stops the submission right there (what happens after is other tests' business).
"""

from __future__ import annotations

import dataclasses
import os
import platform
import time

import pyarrow as pa
import pytest

from orchestrator.lake.store import Lake
from orchestrator.sweep import submission
from orchestrator.sweep.spec import JobSpec
from tests.test_lake_and_report import row
from workers.contract.schema import ROW_SCHEMA


class RayStarted(Exception):
    """Raised by the stand-in for starting Ray."""


@pytest.fixture
def no_ray(monkeypatch):
    def start_ray(*_args, **_kwargs):
        raise RayStarted

    monkeypatch.setattr(submission.actors, "start_ray", start_ray)


@pytest.fixture
def spec(tiny_model_dir) -> JobSpec:
    return JobSpec(model=tiny_model_dir, methods=("baseline",), max_docs=1, max_tokens=64, chunk_size=16, window=16)


def write_run(lake: Lake, spec: JobSpec, run_id: str, status: dict, tasks_written=("t0", "t1")) -> None:
    """A run of ``spec`` as a submission leaves it: spec.json with the real fingerprint, parts of
    ``tasks_written`` out of two planned tasks, and ``status``."""
    inputs = submission._prepare(spec, lake, run_id, False, time.perf_counter())
    lake.write_spec(run_id, {"model": spec.model, "spec_hash": inputs.fingerprint,
                             "tasks": {"t0": ["baseline"], "t1": ["baseline"]}})  # fmt: skip
    for task in tasks_written:
        rows = [row(f"doc-{task}", 0, "baseline", "baseline", 10.0, 10, 5, 0, 0, 0, 0)]
        lake.write_rows(run_id, task, pa.Table.from_pylist(rows, schema=ROW_SCHEMA))
    lake.write_status(run_id, status)


def test_a_finished_run_id_resubmitted_computes_nothing_and_never_starts_ray(tmp_path, spec, no_ray, capsys):
    lake = Lake(str(tmp_path / "lake"))
    write_run(lake, spec, "run-a", {"status": "finished"})
    result = submission.submit(spec, lake, run_id="run-a")
    assert (result.run_id, result.rows_written, result.tasks, result.failures) == ("run-a", 0, 2, {})
    assert "run run-a is finished and complete (2 tasks): nothing to compute" in capsys.readouterr().err


def test_a_resume_says_what_is_done_and_what_is_left_before_ray(tmp_path, spec, no_ray, capsys):
    lake = Lake(str(tmp_path / "lake"))
    write_run(lake, spec, "run-a", {"status": "interrupted"}, tasks_written=("t0",))
    with pytest.raises(RayStarted):
        submission.submit(spec, lake)  # no run id: the unfinished run of this spec is resumed
    assert "resuming run run-a of this spec: 1 of 2 tasks done, 1 to compute" in capsys.readouterr().err


def test_a_new_run_of_a_spec_already_computed_says_so_before_ray(tmp_path, spec, no_ray, capsys):
    lake = Lake(str(tmp_path / "lake"))
    write_run(lake, spec, "run-a", {"status": "finished"})
    with pytest.raises(RayStarted):
        submission.submit(spec, lake)
    err = capsys.readouterr().err
    assert "run run-a already holds this spec's results (kvorch report --run run-a); this submission computes " in err
    assert "them again as new run " in err


def test_the_same_spec_submitted_while_it_runs_says_so_before_ray(tmp_path, spec, no_ray, capsys):
    lake = Lake(str(tmp_path / "lake"))
    alive = {"status": "running", "driver": {"host": platform.node(), "pid": os.getpid()}, "heartbeat": time.time()}
    write_run(lake, spec, "run-a", alive, tasks_written=("t0",))
    with pytest.raises(RayStarted):
        submission.submit(spec, lake)
    assert "run run-a of this spec is being computed right now by another kvorch submit" in capsys.readouterr().err


def test_another_spec_says_nothing(tmp_path, spec, no_ray, capsys):
    lake = Lake(str(tmp_path / "lake"))
    write_run(lake, spec, "run-a", {"status": "finished"})
    with pytest.raises(RayStarted):
        submission.submit(dataclasses.replace(spec, max_tokens=32, configs=()), lake)
    assert "run-a" not in capsys.readouterr().err
