"""A lake you can trust: run ids that cannot leave it, damage that is named and never counted,
a read-only `kvorch sql`, bounded cluster connects, one driver per run, and corpus errors that
name the file and line. Each test here failed before the lake learned it."""

from __future__ import annotations

import json
import os
import shutil
import socket
import struct
import subprocess
import sys
import time
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from click.testing import CliRunner
from pyarrow.fs import PyFileSystem

from orchestrator.cli import main
from orchestrator.corpus import load_corpus
from orchestrator.errors import KvorchError
from orchestrator.lake.integrity import audit
from orchestrator.lake.queries import connect
from orchestrator.lake.store import Lake
from orchestrator.sweep.heartbeat import Heartbeat
from orchestrator.sweep.resume import shown_state
from orchestrator.sweep.run_lock import RunLock
from tests.full_disk import FullDiskHandler, full_disk
from tests.test_cli import snapshot
from tests.test_reports import chunk_row
from workers.contract.schema import ROW_SCHEMA

KVORCH = str(Path(sys.executable).parent / "kvorch")
MARKER = 1234.5678  # an nll_sum whose 8 bytes are findable in the part file


def kvorch(*args: str):
    return CliRunner().invoke(main, list(args))


def two_task_lake(path: Path) -> Lake:
    """Run "r": tasks t0 (doc a) and t1 (doc b), methods baseline and knorm, like a real job's lake."""
    lake = Lake(str(path))
    lake.write_spec("r", {"model": "m", "tasks": {"t0": ["baseline", "knorm"], "t1": ["baseline", "knorm"]}})
    for task, doc in (("t0", "a"), ("t1", "b")):
        rows = [
            chunk_row(doc, 0, "baseline", 10.0),
            chunk_row(doc, 10, "baseline", MARKER if doc == "b" else 20.0),
            chunk_row(doc, 0, "knorm@-2", 10.0, threshold=-2.0),
            chunk_row(doc, 10, "knorm@-2", 21.0, kept=30, threshold=-2.0),
        ]
        lake.write_rows("r", task, pa.Table.from_pylist(rows, schema=ROW_SCHEMA))
    lake.write_status("r", {"status": "finished"})
    return lake


def flip_value(part: Path, old: float, new: float) -> None:
    """Overwrite one double inside a data page; the footer stays intact and Parquet reads on."""
    data = part.read_bytes()
    at = data.index(struct.pack("<d", old))
    part.write_bytes(data[:at] + struct.pack("<d", new) + data[at + 8 :])


# --- names ---------------------------------------------------------------------------------


@pytest.mark.parametrize("bad", ["../../../../outside", "../../escape", "a/b", "x" * 300, ".hidden", "a b", ""])
def test_a_bad_run_id_is_refused_before_anything_is_written(tmp_path, bad):
    lake = two_task_lake(tmp_path / "lake")
    before = snapshot(tmp_path)
    for args in (
        ["submit", "--lake", lake.uri, "--run-id", bad, "--no-progress"],
        ["submit", "--lake", lake.uri, "--resume", bad, "--no-progress"],
        ["status", "--lake", lake.uri, "--run", bad],
        ["report", "--lake", lake.uri, "--run", bad],
    ):
        result = kvorch(*args)
        assert result.exit_code != 0, args
        assert "is not a valid run id" in result.output and len(result.output.strip().splitlines()) == 1, args
    assert snapshot(tmp_path) == before
    with pytest.raises(KvorchError, match="not a valid run id"):
        lake.part_path("../x", "baseline", "t0")


def test_a_refused_job_leaves_no_lake_directory_behind(tmp_path):
    lake = Lake(str(tmp_path / "new" / "lake"))
    lake.ensure_writable()
    assert not (tmp_path / "new").exists()
    with RunLock(lake, "r"):
        assert (tmp_path / "new" / "lake" / ".locks").is_dir()
    assert not (tmp_path / "new" / "lake").exists()
    with RunLock(lake, "r"):  # another submission writes into the new lake meanwhile: it stays
        (tmp_path / "new" / "lake" / "theirs").write_text("x")
    assert [p.name for p in (tmp_path / "new" / "lake").iterdir()] == ["theirs"]



def test_a_lake_another_submission_removes_while_this_one_probes_it_is_made_again(tmp_path):
    """Two submissions into one new lake at once: the other's probe clean-up removes the empty
    directory between this one making it and writing its probe; this one makes it again."""

    class OtherSubmissionCleansUp(FullDiskHandler):
        removed = 0

        def open_output_stream(self, path: str, metadata: dict):
            if ".kvorch-write-probe-" in path and not self.removed:
                type(self).removed += 1
                os.rmdir(os.path.dirname(path))  # the other submission's remove_empty_dirs
            return super().open_output_stream(path, metadata)

    lake = Lake(str(tmp_path / "lake"), filesystem=PyFileSystem(OtherSubmissionCleansUp()))
    lake.ensure_writable()
    assert OtherSubmissionCleansUp.removed == 1
    assert not (tmp_path / "lake").exists()  # left as it found it

# --- integrity -------------------------------------------------------------------------------


def test_a_flipped_value_is_named_by_status_refused_by_report_and_left_out_of_sql(tmp_path):
    lake = two_task_lake(tmp_path / "lake")
    clean = kvorch("report", "--lake", lake.uri, "--format", "json")
    assert clean.exit_code == 0, clean.output
    part = tmp_path / "lake" / "chunks" / "run_id=r" / "method=baseline" / "part-t1.parquet"
    flip_value(part, MARKER, 1.0)
    assert pq.read_table(part).column("nll_sum").to_pylist()[1] == 1.0  # Parquet itself sees nothing wrong

    status = kvorch("status", "--lake", lake.uri, "--format", "json")
    assert json.loads(status.stdout)[0] | {"created_at": None} == {
        "run_id": "r",
        "status": "finished, then damaged",
        "tasks_done": 1,
        "tasks_total": 2,
        "rows": 4,
        "failed": 0,
        "incomplete_configs": 0,
        "damaged_parts": 1,
        "created_at": None,
    }
    assert f"damaged part {part}: checksum mismatch" in status.stderr

    refused = kvorch("report", "--lake", lake.uri)
    assert refused.exit_code == 1 and len(refused.output.strip().splitlines()) == 1
    assert f"run r is incomplete: 1 of 2 tasks not done; damaged part {part}" in refused.output
    assert "--allow-incomplete" in refused.output

    allowed = kvorch("report", "--lake", lake.uri, "--allow-incomplete")
    assert allowed.exit_code == 0 and allowed.stdout.startswith("INCOMPLETE RUN r:")
    # Both methods of the damaged task are left out, so the comparison stays paired: doc a only.
    sql = kvorch("sql", "--lake", lake.uri, "SELECT DISTINCT doc_id FROM chunks", "--format", "csv")
    assert sql.stdout.split() == ["doc_id", "a"] and f"damaged part {part}" in sql.stderr


def test_a_task_cut_short_adds_no_rows_and_a_missing_checksum_is_damage(tmp_path):
    lake = two_task_lake(tmp_path / "lake")
    # A disk that filled between a task's two parts: knorm's part of t1 never got its checksum.
    (tmp_path / "lake" / "chunks" / "run_id=r" / "method=knorm" / "part-t1.parquet.sha256").unlink()
    found = audit(lake, "r")
    assert found.done == {"t0"} and list(found.damaged.values()) == [
        "its checksum file is missing (a write that did not finish)"
    ]
    counted = connect(lake).execute("SELECT doc_id, method, count(*) FROM chunks GROUP BY ALL ORDER BY ALL")
    assert counted.fetchall() == [("a", "baseline", 2), ("a", "knorm", 2)]


def test_a_failed_write_leaves_no_temporary(tmp_path):
    lake = Lake(str(tmp_path / "lake"), filesystem=full_disk(after_bytes=100))
    with pytest.raises(OSError, match="No space left"):
        lake.write_rows("r", "t0", pa.Table.from_pylist([chunk_row("a", 0, "baseline", 1.0)], schema=ROW_SCHEMA))
    assert [p.name for p in (tmp_path / "lake").rglob("*") if p.is_file()] == []
    with pytest.raises(KvorchError, match="cannot write to lake .*No space left on device"):
        Lake(str(tmp_path / "other"), filesystem=full_disk(after_bytes=0)).ensure_writable()
    assert not (tmp_path / "other").exists()


# --- read-only SQL ---------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("query", "message"),
    [
        ("COPY (SELECT 1 AS x) TO '{part}' (FORMAT parquet)", "kvorch sql is read-only: COPY statements are refused"),
        ("CREATE TABLE t AS SELECT 1", "kvorch sql is read-only: CREATE statements are refused"),
        ("INSTALL httpfs", "kvorch sql is read-only"),
        ("SELECT 1; DELETE FROM chunks", "kvorch sql is read-only: DELETE statements are refused"),
        ("SELECT * FROM read_csv('/etc/passwd')", "file system operations are disabled"),
        ("SELECT * FROM read_parquet('{outside}')", "file system operations are disabled"),
        ("SELECT * FROM glob('/etc/*')", "file system operations are disabled"),
    ],
)
def test_kvorch_sql_cannot_write_the_lake_or_read_outside_it(tmp_path, query, message):
    lake = two_task_lake(tmp_path / "lake")
    outside = tmp_path / "outside.parquet"
    pq.write_table(pa.table({"secret": [1]}), outside)
    part = tmp_path / "lake" / "chunks" / "run_id=r" / "method=baseline" / "part-t0.parquet"
    before = snapshot(tmp_path)
    result = kvorch("sql", "--lake", lake.uri, query.format(part=part, outside=outside))
    assert result.exit_code == 1 and message in result.output and len(result.output.strip().splitlines()) == 1
    assert snapshot(tmp_path) == before
    inside = kvorch("sql", "--lake", lake.uri, "SELECT count(*) AS n FROM chunks", "--format", "csv")
    assert inside.stdout.split() == ["n", "8"]


# --- bounded connect ----------------------------------------------------------------------


@pytest.mark.slow
def test_an_address_that_refuses_or_stays_silent_fails_in_one_line_and_writes_nothing(tmp_path, tiny_model_dir):
    """The whole command; how long the connect itself takes is the next test's (a command's wall
    time here is mostly importing torch and loading the tokenizer, which a busy machine stretches)."""
    silent = socket.socket()
    silent.bind(("127.0.0.1", 0))
    silent.listen(1)  # accepts, never answers: not a Ray cluster
    base = [KVORCH, "submit", "--model", tiny_model_dir, "--max-docs", "1", "--max-tokens", "64"]
    base += ["--chunk-size", "32", "--methods", "baseline", "--no-progress"]
    for address, timeout, expected in (
        ("127.0.0.1:1", "30", "cannot reach the Ray cluster: connection refused"),
        (f"127.0.0.1:{silent.getsockname()[1]}", "3", "no Ray cluster answered within 3 s"),
    ):
        lake = tmp_path / f"lake-{timeout}"
        proc = subprocess.run(
            [*base, "--lake", str(lake), "--address", address, "--connect-timeout", timeout],
            capture_output=True,
            text=True,
            timeout=900,  # only turns a hang into a failure
        )
        assert proc.returncode == 1, proc.stderr
        errors = [line for line in proc.stderr.splitlines() if line.startswith("Error:")]
        assert len(errors) == 1 and f"--address {address}: {expected}" in errors[0]
        assert not lake.exists()
    silent.close()


def test_joining_an_address_that_refuses_or_stays_silent_takes_no_longer_than_its_timeout():
    """join_cluster alone, timed inside a fresh process (no Ray there yet, imports done first):
    a refusal is known at once, silence after --connect-timeout. The margins (10 s over an
    immediate answer, 27 s over a 3 s timeout) are what a loaded machine adds to a connect, not
    to importing torch."""
    silent = socket.socket()
    silent.bind(("127.0.0.1", 0))
    silent.listen(1)
    code = (
        "import sys, time\n"
        "from orchestrator.errors import KvorchError\n"
        "from orchestrator.pool.connect import join_cluster\n"
        "tic = time.perf_counter()\n"
        "try:\n"
        "    join_cluster(sys.argv[1], 'kvorch-test', float(sys.argv[2]))\n"
        "except KvorchError as exc:\n"
        "    print(f'{time.perf_counter() - tic:.3f} {exc}', flush=True)\n"
    )
    for address, timeout, expected, at_most in (
        ("127.0.0.1:1", "30", "cannot reach the Ray cluster: connection refused", 10.0),
        (f"127.0.0.1:{silent.getsockname()[1]}", "3", "no Ray cluster answered within 3 s", 3.0 + 27.0),
    ):
        command = [sys.executable, "-c", code, address, timeout]
        done = subprocess.run(command, capture_output=True, text=True, timeout=900)
        seconds, _, message = done.stdout.strip().partition(" ")
        assert f"--address {address}: {expected}" in message, done.stdout + done.stderr
        assert float(seconds) < at_most
    silent.close()


# --- one driver per run, and a driver that died ----------------------------------------------


def test_a_second_driver_on_a_run_is_refused_while_the_first_holds_it(tmp_path):
    lake = two_task_lake(tmp_path / "lake")
    with RunLock(lake, "r"):
        with pytest.raises(
            KvorchError, match=rf"run r in lake .* is being computed by another driver \(pid {os.getpid()}"
        ):
            RunLock(lake, "r").acquire()
        RunLock(lake, "other").acquire()  # other runs of the lake are free
    with RunLock(lake, "r"):  # released on exit: the next driver takes it
        pass


def test_a_second_driver_in_another_process_is_refused(tmp_path):
    lake = two_task_lake(tmp_path / "lake")
    holder = subprocess.Popen(
        [sys.executable, "-c", "from orchestrator.sweep.run_lock import RunLock; "
         f"from orchestrator.lake.store import Lake; l = RunLock(Lake({str(lake.uri)!r}), 'r'); l.acquire(); "
         "print('held', flush=True); input()"],
        stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True,
    )  # fmt: skip
    try:
        assert holder.stdout.readline().strip() == "held"
        with pytest.raises(KvorchError, match=f"pid {holder.pid} on"):
            RunLock(lake, "r").acquire()
    finally:
        holder.kill()  # SIGKILL: no cleanup runs, yet the kernel frees the lock
        holder.wait()
    RunLock(lake, "r").acquire()


def test_a_running_run_whose_driver_died_shows_as_interrupted(tmp_path):
    gone = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    dead_pid = int(gone.stdout)
    lake = two_task_lake(tmp_path / "lake")
    here = {"host": os.uname().nodename, "pid": dead_pid}
    lake.write_status("r", {"status": "running", "driver": here, "heartbeat": time.time()})
    table = json.loads(kvorch("status", "--lake", lake.uri, "--format", "json").stdout)
    assert table[0]["status"] == "interrupted (driver gone)"
    alive = {"status": "running", "driver": {**here, "pid": os.getpid()}, "heartbeat": time.time()}
    assert shown_state(alive) == "running"
    elsewhere = {"status": "running", "driver": {"host": "elsewhere", "pid": 1}}
    assert shown_state({**elsewhere, "heartbeat": time.time()}) == "running"
    assert shown_state({**elsewhere, "heartbeat": time.time() - 3600}) == "interrupted (driver gone)"


def test_status_shows_every_readable_run_and_one_line_per_broken_run_directory(tmp_path):
    """Issue 28: one empty runs/run_id=ghost made kvorch status fail for every run."""
    lake = two_task_lake(tmp_path / "lake")
    runs = tmp_path / "lake" / "runs"
    (runs / "run_id=ghost").mkdir()
    (runs / "run_id=torn").mkdir()
    (runs / "run_id=torn" / "spec.json").write_text('{"model": ')
    (runs / "run_id=a b").mkdir()
    result = kvorch("status", "--lake", lake.uri, "--format", "json")
    assert result.exit_code == 0, result.output
    assert [row["run_id"] for row in json.loads(result.stdout)] == ["r"]
    lines = result.stderr.splitlines()
    assert lines == [
        f"kvorch: {runs}/run_id=a b is not a kvorch run (run id 'a b' is not a valid run id: use 1 to 128 letters, "
        "digits, '.', '_' or '-', starting with a letter or digit); remove it",
        f"kvorch: run ghost: {runs}/run_id=ghost has no spec.json (no part of it in the lake; a kvorch submit "
        "that stopped before writing it, or a directory kvorch did not make); run that kvorch submit again with "
        "--run-id ghost, or remove it",
        f"kvorch: {runs}/run_id=torn/spec.json is damaged (not JSON: Expecting value: line 1 column 11 (char 10)); "
        "restore it or remove that run",
    ]
    alone = kvorch("status", "--lake", lake.uri, "--run", "ghost")
    assert alone.exit_code == 1 and alone.output.count("\n") == 1
    assert "run ghost: " in alone.output and "has no spec.json" in alone.output
    missing = kvorch("status", "--lake", lake.uri, "--run", "nope")
    assert missing.exit_code == 1 and "run 'nope' is not in lake" in missing.output
    shutil.rmtree(runs / "run_id=r")
    only_broken = kvorch("status", "--lake", lake.uri)
    assert only_broken.exit_code == 1 and only_broken.output.count("\n") == 1
    assert only_broken.output.startswith("Error: ") and "(and 2 more such runs)" in only_broken.output


# --- corpus errors ---------------------------------------------------------------------------


def test_corpus_errors_name_the_file_and_line(tmp_path):
    jsonl = tmp_path / "c.jsonl"
    jsonl.write_bytes(b'{"text": "fine"}\n{"text": "caf\xe9"}\n')
    with pytest.raises(KvorchError, match=rf"^{jsonl}:2: not valid UTF-8 \(byte 0xe9 at offset 13\)"):
        load_corpus(str(jsonl))
    numbers = tmp_path / "n.parquet"
    pq.write_table(pa.table({"text": [1, 2]}), numbers)
    with pytest.raises(KvorchError, match=rf"^{numbers}: column 'text' holds int64, not strings"):
        load_corpus(str(numbers))
    junk = tmp_path / "j.parquet"
    junk.write_bytes(b"not parquet")
    with pytest.raises(KvorchError, match=rf"^{junk}: not a readable Parquet file"):
        load_corpus(str(junk))
    texts = tmp_path / "txt"
    texts.mkdir()
    (texts / "good.txt").write_text("fine")
    (texts / "bad.txt").write_bytes(b"\xff\xfe broken")
    with pytest.raises(KvorchError, match=r"bad.txt: not valid UTF-8 \(byte 0xff at offset 0\)"):
        load_corpus(str(texts))


def test_the_heartbeat_keeps_a_running_status_fresh_between_task_ends(tmp_path):
    lake = two_task_lake(tmp_path / "lake")
    with Heartbeat(lake, "r", {"events": ["x"]}, period=0.05) as beat:
        first = lake.read_status("r")["heartbeat"]
        waited = time.monotonic()  # no task ends meanwhile, as while long tasks run
        while (later := lake.read_status("r"))["heartbeat"] == first:
            assert time.monotonic() - waited < 300, "no beat"  # a beat is due every 0.05 s, however busy
            time.sleep(0.05)
        assert later["heartbeat"] > first and later["events"] == ["x"] and later["status"] == "running"
        beat.update({"events": ["x", "y"]})
        assert lake.read_status("r")["events"] == ["x", "y"]
    assert not beat._thread.is_alive()  # stopped: no late beat can overwrite the final status
    lake.write_status("r", {"status": "finished"})
    time.sleep(0.2)
    assert lake.read_status("r")["status"] == "finished"
