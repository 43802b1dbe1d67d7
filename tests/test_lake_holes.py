"""Issue 38's holes in the lake's driver side, one test per defect: nothing read or written
through a symbolic link inside a lake, a run's setup rewritten on resume, one damaged run never
hiding the others, and the lake byte-identical after every refused command."""

from __future__ import annotations

import errno
import hashlib
import json
import os
import platform
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import pyarrow as pa
import pytest
from click.testing import CliRunner

from orchestrator.cli import main
from orchestrator.errors import KvorchError
from orchestrator.lake import incomplete, integrity
from orchestrator.lake.store import Lake
from orchestrator.reports.plots import PLOTS_RECORD, check_plot_dir, write_plots
from orchestrator.sweep import attempts, resume, submission
from orchestrator.sweep.run_lock import RunLock
from tests.test_lake_and_report import row
from workers.contract.schema import DOC_SCHEMA, ROW_SCHEMA


def snapshot(root: Path) -> dict[str, str]:
    """Every entry under ``root``, never through a link: files by content hash, links by target."""
    seen = {}
    for folder, dirs, files in os.walk(root):
        for name in dirs + files:
            path = os.path.join(folder, name)
            if os.path.islink(path):
                seen[path] = "link -> " + os.readlink(path)
            elif os.path.isfile(path):
                seen[path] = hashlib.sha256(Path(path).read_bytes()).hexdigest()
            else:
                seen[path] = "dir"
    return seen


def add_run(lake: Lake, run_id: str, model: str = "m") -> None:
    lake.write_spec(run_id, {"model": model, "tasks": {"t0": ["baseline", "knorm"]}})
    rows = [
        row("a", 0, "baseline", "baseline", 10.0, 10, 5, 0, 0, 0, 0),
        row("a", 1, "baseline", "baseline", 20.0, 10, 4, 40, 40, 16, 16),
        row("a", 0, "knorm", "knorm@-2", 10.0, 10, 5, 0, 0, 0, 0, -2.0),
        row("a", 1, "knorm", "knorm@-2", 23.0, 10, 3, 40, 28, 16, 20, -2.0),
    ]
    lake.write_rows(run_id, "t0", pa.Table.from_pylist(rows, schema=ROW_SCHEMA))
    lake.write_status(run_id, {"status": "finished", "reason": "", "rows": 4})


@pytest.fixture
def two_runs(tmp_path) -> Lake:
    lake = Lake(str(tmp_path / "lake"))
    add_run(lake, "r1", "good-model")
    add_run(lake, "r2", "other-model")
    return lake


@pytest.fixture
def outside(tmp_path) -> Path:
    folder = tmp_path / "outside"
    folder.mkdir()
    (folder / "secret.json").write_text(json.dumps({"model": "SECRET-OUTSIDE", "run_id": "r3"}))
    return folder


def cli(*args: str):
    return CliRunner().invoke(main, list(args))


# --- 1. a run's setup is resumable ----------------------------------------------------------


def test_a_full_disk_while_a_run_is_set_up_is_one_line_and_the_resume_rewrites_the_docs(tmp_path, monkeypatch):
    lake = Lake(str(tmp_path / "lake"))
    docs = pa.Table.from_pylist(
        [{"doc_id": "a", "source": "s", "n_chars": 3, "n_tokens": 2, "sha256": "x"}], schema=DOC_SCHEMA
    )
    inputs = SimpleNamespace(lake=lake, run_id="r1", previous=None, docs_table=docs, started=0.0)
    record = SimpleNamespace(to_json=lambda: {"model": "m", "tasks": {"t0": ["baseline"]}, "spec_hash": "h"})
    real_write_docs = Lake.write_docs

    def disk_full(self, run_id, table):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(Lake, "write_docs", disk_full)
    with pytest.raises(KvorchError, match="No space left on device.*run the same command again"):
        submission._claim(inputs, record, [])
    assert not lake.docs_sound("r1") and lake.read_spec("r1") is not None
    monkeypatch.setattr(Lake, "write_docs", real_write_docs)
    resumed = SimpleNamespace(**{**vars(inputs), "previous": lake.read_spec("r1")})
    submission._claim(resumed, record, [])
    assert lake.docs_sound("r1")
    # A docs.parquet damaged since is rewritten too; a sound one is left as it is.
    Path(lake.docs_path("r1")).write_bytes(b"PAR1 cut")
    submission._claim(resumed, record, [])
    assert lake.docs_sound("r1")
    before = os.stat(lake.docs_path("r1")).st_ino
    submission._claim(resumed, record, [])
    assert os.stat(lake.docs_path("r1")).st_ino == before


# --- 2. --plot never overwrites the user's files --------------------------------------------


def test_plot_refuses_a_directory_with_a_file_kvorch_did_not_write(tmp_path, monkeypatch):
    from orchestrator.reports import plots

    out = tmp_path / "plots"
    out.mkdir()
    (out / "index.html").write_text("<p>my own page</p>")
    before = snapshot(out)
    monkeypatch.setattr(plots, "plot_figures", lambda *args: {})  # the check comes before any table is read
    with pytest.raises(KvorchError, match=r"already holds index.html.*empty or new directory"):
        write_plots(str(out), "r1", {})
    assert snapshot(out) == before
    # Files kvorch wrote and no one changed may be rewritten; once edited, they may not.
    (out / "index.html").unlink()
    (out / "kl.png").write_bytes(b"png")
    (out / PLOTS_RECORD).write_text(json.dumps({"kl.png": hashlib.sha256(b"png").hexdigest()}))
    check_plot_dir(out, ["kl.png", "index.html"])
    (out / "kl.png").write_bytes(b"edited")
    with pytest.raises(KvorchError, match="kl.png"):
        check_plot_dir(out, ["kl.png"])
    (out / "kl.png").unlink()
    (out / "kl.png").symlink_to(tmp_path / "elsewhere.png")
    with pytest.raises(KvorchError, match="kl.png"):
        check_plot_dir(out, ["kl.png"])
    assert not (tmp_path / "elsewhere.png").exists()


# --- 3. the run lock follows no link ---------------------------------------------------------


@pytest.mark.parametrize("dangling", [False, True])
def test_the_run_lock_never_writes_through_a_link(two_runs, tmp_path, dangling):
    target = tmp_path / "victim.txt"
    if not dangling:
        target.write_text("precious")
    locks = Path(two_runs.root) / ".locks"
    locks.mkdir()
    (locks / "run_id=r1.lock").symlink_to(target)
    before = snapshot(tmp_path)
    with pytest.raises(KvorchError, match="symbolic link inside the lake"):
        RunLock(two_runs, "r1").acquire()
    assert snapshot(tmp_path) == before
    assert target.exists() != dangling


def test_the_run_lock_never_writes_through_a_linked_locks_folder(two_runs, tmp_path):
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    (Path(two_runs.root) / ".locks").symlink_to(elsewhere)
    with pytest.raises(KvorchError, match="symbolic link inside the lake"):
        RunLock(two_runs, "r1").acquire()
    assert list(elsewhere.iterdir()) == []


# --- 4. resume deletes nothing through a link ------------------------------------------------


def test_a_resume_lists_and_deletes_nothing_through_a_linked_folder(two_runs, outside):
    for name in ("part-t9.parquet", "part-t9.parquet.sha256", "notes.tmp-1", "data.sha256"):
        (outside / name).write_bytes(b"the user's")
    (Path(two_runs.root) / "chunks" / "run_id=r1" / "method=x").symlink_to(outside)
    found = integrity.audit(two_runs, "r1")
    assert not any("method=x" in p for p in [*found.damaged, *two_runs.leftovers("r1"), *two_runs.parts()])
    assert found.complete and found.rows == 4
    before = snapshot(outside)
    two_runs.delete([two_runs.part_path("r1", "x", "t9")])
    assert snapshot(outside) == before
    result = cli("status", "--lake", two_runs.uri)
    assert result.exit_code == 0, result.output
    assert result.output.count("method=x is a symbolic link inside the lake") == 1


# --- 5. no view reads through a link --------------------------------------------------------


def test_the_runs_view_reads_no_json_through_a_link(two_runs, outside):
    spec = Path(two_runs.run_dir("r2")) / "spec.json"
    spec.unlink()
    spec.symlink_to(outside / "secret.json")
    result = cli("sql", "--lake", two_runs.uri, "SELECT run_id, model FROM runs")
    assert result.exit_code == 0, result.output
    assert "SECRET-OUTSIDE" not in result.output and "good-model" in result.output
    linked_run = Path(two_runs.root) / "runs" / "run_id=r3"
    linked_run.symlink_to(outside)
    (outside / "spec.json").write_text(json.dumps({"model": "SECRET-OUTSIDE", "run_id": "r3"}))
    for args in (["runs"], ["sql", "SELECT * FROM runs"], ["status"]):
        result = cli(args[0], "--lake", two_runs.uri, *args[1:])
        assert result.exit_code == 0 and "SECRET-OUTSIDE" not in result.output, (args, result.output)
    assert "run_id=r3 is a symbolic link inside the lake" in result.output


# --- 12, 13, 14, 19: one bad run never hides the others --------------------------------------

BAD_STATUSES = [
    {"status": "running", "driver": {"host": platform.node(), "pid": "1234"}, "heartbeat": 1.0},
    {"status": "running", "driver": "me"},
    ["finished"],
    {"status": "finished", "rows": "many"},
    {"status": "finished", "events": "lots"},
    {"status": "finished", "events": [{"kind": "x"}]},
    {"status": "finished", "config_failures": [{"config": "k"}]},
    {"status": "finished", "attempt": {"number": "two"}},
]


@pytest.mark.parametrize("payload", BAD_STATUSES, ids=range(len(BAD_STATUSES)))
def test_a_status_json_of_the_wrong_shape_hides_no_run(two_runs, payload):
    (Path(two_runs.run_dir("r2")) / "status.json").write_text(json.dumps(payload))
    before = snapshot(Path(two_runs.root))
    result = cli("status", "--lake", two_runs.uri)
    assert result.exit_code == 0 and "r1" in result.output and "r2" in result.output, result.output
    for args in (["sql", "SELECT run_id, status FROM statuses"], ["runs"], ["report", "--run", "r1"]):
        result = cli(args[0], "--lake", two_runs.uri, *args[1:])
        assert result.exit_code == 0, (args, result.output)
        assert "Traceback" not in result.output
    assert ("r1", "finished") in _sql(two_runs, "SELECT run_id, status FROM statuses")
    for args in (["sql", "SELECT 1"], ["runs"]):  # the run left out is named, in one line
        result = CliRunner().invoke(main, [args[0], "--lake", two_runs.uri, *args[1:]])
        assert "status.json is damaged" in result.stderr and "left out of statuses" in result.stderr, args
    # The resume search of kvorch submit reads every run's status: it goes on to a fresh run.
    assert resume.choose_run(two_runs, None, "no-such-hash", {}, must_exist=False).previous is None
    assert resume.shown_state(payload) in {"unknown", "finished"}
    # A resume of the run itself reads its attempts and incomplete configs through the same check.
    assert attempts.number(payload) >= 2 and incomplete.recorded(payload) == []
    assert snapshot(Path(two_runs.root)) == before


def test_a_status_json_over_16_mb_reads_and_its_warning_names_a_few_documents(two_runs):
    failures = [
        {"task_id": "t0", "doc_id": f"doc-{i:06d}", "config": "knorm@-2", "reason": "x" * 200} for i in range(70_000)
    ]
    two_runs.write_status("r2", {"status": "finished", "rows": 4, "config_failures": failures})
    assert os.path.getsize(Path(two_runs.run_dir("r2")) / "status.json") > 16 << 20
    assert ("r2", "finished") in _sql(two_runs, "SELECT run_id, status FROM statuses")
    result = cli("runs", "--lake", two_runs.uri)
    assert result.exit_code == 0 and "r2" in result.output, result.output[-500:]
    (line,) = incomplete.warnings("r2", failures)
    assert len(line) < 600 and "doc-000004 and 69995 more" in line


def test_a_folder_kvorch_did_not_make_under_chunks_hides_no_run(two_runs):
    stray = Path(two_runs.root) / "chunks" / "notes" / "method=x"
    stray.mkdir(parents=True)
    (stray / "part-t0.parquet").write_bytes(Path(two_runs.part_path("r1", "knorm", "t0")).read_bytes())
    (Path(two_runs.root) / "chunks" / "README.txt").write_text("mine")
    (Path(two_runs.root) / "docs" / "copy").mkdir(parents=True)
    for args in (["sql", "SELECT count(*) FROM chunks"], ["runs"], ["report", "--run", "r1"], ["status"]):
        result = cli(args[0], "--lake", two_runs.uri, *args[1:])
        assert result.exit_code == 0 and "Traceback" not in result.output, (args, result.output)
    assert _sql(two_runs, "SELECT count(*) FROM chunks") == [(8,)]


@pytest.mark.parametrize("damage", ["{cut", "[1, 2]"])
def test_a_damaged_spec_json_hides_no_other_run(two_runs, damage):
    (Path(two_runs.run_dir("r2")) / "spec.json").write_text(damage)
    before = snapshot(Path(two_runs.root))
    for args in (["report", "--run", "r1"], ["sql", "SELECT run_id, model FROM runs"], ["runs"], ["status"]):
        result = cli(args[0], "--lake", two_runs.uri, *args[1:])
        assert result.exit_code == 0 and "Traceback" not in result.output, (args, result.output)
        assert args[0] in ("report", "status") or "good-model" in result.output, (args, result.output)
    result = cli("sql", "--lake", two_runs.uri, "SELECT run_id FROM runs")
    assert "r2" in result.output and "spec.json is damaged" in result.output  # named on stderr
    assert snapshot(Path(two_runs.root)) == before


def _sql(lake: Lake, query: str) -> list[tuple]:
    from orchestrator.lake.readonly import connect_sealed

    return connect_sealed(lake).execute(query).fetchall()


# --- 16. a resumed run's new driver shows as running while it sets up ------------------------


def test_a_run_whose_lock_a_live_driver_holds_shows_as_running(two_runs):
    two_runs.write_status("r2", {"status": "running", "driver": {"host": platform.node(), "pid": 2**22 + 7}})
    before = cli("status", "--lake", two_runs.uri, "--run", "r2")
    assert "interrupted (driver gone)" in before.output
    sleeper = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(600)"])
    try:
        locks = Path(two_runs.root) / ".locks"
        locks.mkdir()
        (locks / "run_id=r2.lock").write_text(f"{sleeper.pid} {platform.node()}\n")
        result = cli("status", "--lake", two_runs.uri, "--run", "r2")
        assert "running (resuming)" in result.output, result.output
    finally:
        sleeper.kill()
        sleeper.wait()
    assert "interrupted (driver gone)" in cli("status", "--lake", two_runs.uri, "--run", "r2").output


# --- 11. a .gguf cut short ------------------------------------------------------------------


@pytest.mark.parametrize("kept", [100, 1_000_000])
def test_a_gguf_cut_short_is_one_line(tmp_path, kept):
    from workers.contract.models import EMBEDDED_MODEL, resolve_model

    whole = Path(resolve_model(EMBEDDED_MODEL).location)
    whole = whole / resolve_model(EMBEDDED_MODEL).gguf_file if whole.is_dir() else whole
    cut = tmp_path / "model.gguf"
    with open(whole, "rb") as src:
        cut.write_bytes(src.read(kept))
    result = cli("submit", "--model", str(cut), "--lake", str(tmp_path / "lake"))
    assert result.exit_code == 1 and result.output.count("\n") == 1, result.output
    assert f"--model {cut}: transformers could not load a tokenizer" in result.output
    assert "pass a complete .gguf" in result.output and not (tmp_path / "lake").exists()


# --- 15. SIGTERM while the embedded Ray starts ----------------------------------------------

SIGTERM_DURING_RAY_START = """
import os, signal, sys, time
from orchestrator.pool import actors

def start_ray(*args, **kwargs):  # Ray's start, and a scheduler's SIGTERM in the middle of it
    os.kill(os.getpid(), signal.SIGTERM)
    time.sleep(60)
    raise AssertionError("SIGTERM was not delivered")

actors.start_ray = start_ray
from orchestrator.cli import main
sys.argv = ["kvorch", "submit", "--lake", sys.argv[1], "--max-docs", "1", "--methods", "baseline", "--chunk-size", "8"]
main()
"""


@pytest.mark.slow  # runs kvorch submit in a subprocess (it loads the embedded tokenizer)
def test_sigterm_while_ray_starts_exits_143_with_the_resume_line(tmp_path):
    proc = subprocess.run(
        [sys.executable, "-c", SIGTERM_DURING_RAY_START, str(tmp_path / "lake")],
        capture_output=True,
        text=True,
        timeout=900,
        cwd=Path(__file__).resolve().parents[1],
    )
    assert proc.returncode == 143, (proc.returncode, proc.stderr[-2000:])
    assert "kvorch: SIGTERM; finished parts are kept, run the same command again to resume" in proc.stderr
    assert "Traceback" not in proc.stderr
