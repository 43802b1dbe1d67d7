"""The notebook API (kvorch/): the CLI's tables as Arrow, kvorch sql's read-only SQL, run
selection, one-line errors, and an import that stays clear of torch. Lakes are built by hand."""

from __future__ import annotations

import hashlib
import json
import math
import random
import subprocess
import sys
from pathlib import Path

import duckdb
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from click.testing import CliRunner

import kvorch
from orchestrator.cli import main
from orchestrator.errors import KvorchError
from orchestrator.lake.store import Lake
from orchestrator.reports.formatting import render
from orchestrator.reports.tables import TABLES
from tests.test_lake_and_report import row
from workers.contract.schema import ROW_SCHEMA, SCORES_SCHEMA

ROOT = Path(__file__).resolve().parents[1]
SWEEP = {"knorm@-2": (-2.0, 0.6), "knorm@-1": (-1.0, 0.3), "h2o@1": (1.0, 0.45)}  # config -> (threshold, kept fraction)


def run_rows(seed: int, docs: str = "abc") -> list[dict]:
    """Documents of 70 chunks of 10 tokens (positions 0-700, so two position buckets); baseline,
    a two-point knorm sweep and h2o, with random NLLs and kept fractions per config."""
    rng = random.Random(seed)
    rows = []
    for doc in docs:
        for chunk in range(70):
            total = chunk * 10 * 4  # 4 layers x kv-heads
            window = min(total, 40)
            base = rng.uniform(20, 30)
            rows.append(row(doc, chunk, "baseline", "baseline", base, 10, rng.randint(0, 10), total, total, window, 0))
            for config, (threshold, kept) in SWEEP.items():
                nll = base * (1 + (1 - kept) * rng.uniform(-0.02, 0.2))
                keys = window + int(kept * (total - window))
                method, correct = config.split("@")[0], rng.randint(0, 10)
                rows.append(row(doc, chunk, method, config, nll, 10, correct, total, keys, window, 0, threshold))
    return rows


def write_run(lake: Lake, run_id: str, rows: list[dict], created_at: str, tasks: list[str] = ("t0",)) -> None:
    """``rows`` as task t0 of ``run_id``; spec.json says the run was created at ``created_at`` and
    planned ``tasks`` (a task without parts leaves the run incomplete)."""
    methods = sorted({r["method"] for r in rows})
    lake.write_spec(run_id, {"model": "m", "tasks": {t: methods for t in tasks}})
    spec_path = lake.run_dir(run_id) + "/spec.json"
    lake.write_json(spec_path, {**lake.read_json(spec_path), "created_at": created_at})
    lake.write_rows(run_id, "t0", pa.Table.from_pylist(rows, schema=ROW_SCHEMA))
    lake.write_status(run_id, {"status": "finished"})


@pytest.fixture(scope="module")
def lake(tmp_path_factory) -> Lake:
    """Two runs whose names sort against their age: "zz-old" (created first) and "aa-new"."""
    lake = Lake(str(tmp_path_factory.mktemp("notebook") / "lake"))
    write_run(lake, "zz-old", run_rows(1, "ab"), "2024-01-01T00:00:00+00:00")
    write_run(lake, "aa-new", run_rows(2), "2024-06-01T00:00:00+00:00")
    return lake


def snapshot(root: Path) -> dict[str, str]:
    """Every file under ``root`` and its sha256 (as tests/test_cli.py's, without importing torch)."""
    files = sorted(p for p in root.rglob("*") if p.is_file())
    return {str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest() for p in files}


def cli_json(*args: str) -> list[dict]:
    result = CliRunner().invoke(main, list(args))
    assert result.exit_code == 0, result.output
    return json.loads(result.stdout)


def as_cli_json(table: pa.Table) -> list[dict]:
    """An Arrow table as ``--format json`` prints rows (non-finite floats as strings)."""
    return json.loads(render(table.column_names, list(zip(*(c.to_pylist() for c in table.columns))), "json"))


def assert_same_rows(got: list[dict], want: list[dict]) -> None:
    """Same columns, rows and types; floats to 1e-9 relative, as DuckDB's parallel aggregates
    (stddev_samp, avg) may add in another order each time a query runs."""
    assert [list(r) for r in got] == [list(r) for r in want]
    for mine, theirs in zip(got, want, strict=True):
        for column, value in mine.items():
            other = theirs[column]
            assert type(value) is type(other), (column, value, other)
            if isinstance(value, float):
                assert value == pytest.approx(other, rel=1e-9, abs=1e-12, nan_ok=True), (column, mine, theirs)
            else:
                assert value == other, (column, mine, theirs)


def one_line_error(call) -> str:
    with pytest.raises(KvorchError) as caught:
        call()
    message = str(caught.value)
    assert "\n" not in message and message
    return message


# --- the report tables are the CLI's ------------------------------------------------------------


@pytest.mark.parametrize(
    ("method", "kwargs", "cli_args"),
    [
        ("compare", {}, []),
        ("paired", {}, ["--table", "paired"]),
        ("paired", {"reference": "knorm@-1"}, ["--table", "paired", "--reference", "knorm@-1"]),
        ("by_position", {}, ["--table", "by_position"]),
        ("frontier", {}, ["--table", "frontier"]),
        ("frontier", {"densities": (0.6, 0.35, 0.05)}, ["--table", "frontier", "--densities", "0.05,0.35,0.6"]),
    ],
)
@pytest.mark.parametrize("run", [None, "zz-old"])
def test_named_tables_equal_kvorch_report(lake, method, kwargs, cli_args, run):
    with kvorch.open_lake(lake.uri) as nb:
        table = getattr(nb, method)(run=run, **kwargs)
    assert isinstance(table, pa.Table) and table.num_rows > 0
    run_args = ["--run", run] if run else []
    cli = cli_json("report", "--lake", lake.uri, *run_args, *cli_args, "--format", "json")
    assert_same_rows(as_cli_json(table), cli)


@pytest.mark.parametrize("name", sorted(TABLES))
def test_table_by_name_equals_kvorch_report(lake, name):
    with kvorch.open_lake(lake.uri) as nb:
        table = nb.table(name, run="aa-new")
    cli = cli_json("report", "--lake", lake.uri, "--run", "aa-new", "--table", name, "--format", "json")
    assert_same_rows(as_cli_json(table), cli)


def test_compare_matches_a_hand_computation_with_integer_counts(lake):
    rows = [r for r in run_rows(2) if r["config"] == "knorm@-1"]
    with kvorch.open_lake(lake.uri) as nb:
        got = {r["config"]: r for r in nb.compare().to_pylist()}["knorm@-1"]
        assert nb.compare().schema.field("tokens").type == pa.int64()  # not a DuckDB HUGEINT as decimal
    assert got["tokens"] == sum(r["n_tokens"] for r in rows) == 2100
    assert got["ppl"] == pytest.approx(math.exp(sum(r["nll_sum"] for r in rows) / 2100), rel=1e-12)
    assert got["accuracy"] == pytest.approx(sum(r["n_correct"] for r in rows) / 2100, rel=1e-12)


def test_frontier_densities_are_checked_and_one_number_is_fine(lake):
    with kvorch.open_lake(lake.uri) as nb:
        assert_same_rows(
            as_cli_json(nb.frontier(densities=0.35)),
            cli_json("report", "--lake", lake.uri, "--table", "frontier", "--densities", "0.35", "--format", "json"),
        )
        assert "is outside (0, 1]" in one_line_error(lambda: nb.frontier(densities=[0.0, 0.5]))
        assert "is not a number" in one_line_error(lambda: nb.frontier(densities=["half"]))


# --- sql -------------------------------------------------------------------------------------------


def test_sql_returns_what_the_parquet_parts_hold(lake):
    expected: dict[str, list[float]] = {}
    for part in sorted(Path(lake.root, "chunks", "run_id=aa-new").rglob("*.parquet")):
        for r in pq.read_table(part).to_pylist():
            sums = expected.setdefault(r["config"], [0.0, 0, 0])
            sums[0], sums[1], sums[2] = sums[0] + r["nll_sum"], sums[1] + r["n_tokens"], sums[2] + 1
    query = (
        "SELECT config, sum(nll_sum) AS nll, sum(n_tokens) AS tokens, count(*) AS n "
        "FROM chunks WHERE run_id = $run GROUP BY config ORDER BY config"
    )
    with kvorch.open_lake(lake.uri) as nb:
        got = nb.sql(query, params={"run": "aa-new"})
        positional = nb.sql("SELECT count(*) AS n FROM chunks WHERE run_id = ?", params=["zz-old"])
    assert isinstance(got, pa.Table) and got.schema.field("tokens").type == pa.int64()
    assert got.column("config").to_pylist() == sorted(expected)
    for r in got.to_pylist():
        nll, tokens, n = expected[r["config"]]
        assert (r["tokens"], r["n"]) == (tokens, n) and r["nll"] == pytest.approx(nll, rel=1e-12)
    assert positional.to_pylist() == [{"n": 2 * 70 * (1 + len(SWEEP))}]


@pytest.mark.parametrize(
    ("query", "message"),
    [
        ("COPY (SELECT 1 AS x) TO '{part}' (FORMAT parquet)", "read-only: COPY statements are refused"),
        ("CREATE TABLE t AS SELECT 1", "read-only: CREATE statements are refused"),
        ("ATTACH '{outside_db}' AS other", "read-only: ATTACH statements are refused"),
        ("SELECT 1; DELETE FROM chunks", "read-only: DELETE statements are refused"),
        ("SELECT * FROM read_csv('/etc/passwd')", "file system operations are disabled"),
        ("SELECT * FROM read_parquet('{outside}')", "file system operations are disabled"),
        ("SELECT * FROM no_such_view", "query failed: Catalog Error"),
    ],
)
def test_sql_refuses_writes_and_files_outside_the_lake(tmp_path, query, message):
    lake = Lake(str(tmp_path / "lake"))
    write_run(lake, "r", run_rows(3, "a"), "2024-01-01T00:00:00+00:00")
    outside = tmp_path / "outside.parquet"
    pq.write_table(pa.table({"secret": [1]}), outside)
    part = lake.part_path("r", "baseline", "t0")
    before = snapshot(tmp_path)
    with kvorch.open_lake(lake.uri) as nb:
        sql = query.format(part=part, outside=outside, outside_db=tmp_path / "other.duckdb")
        assert message in one_line_error(lambda: nb.sql(sql))
        assert nb.sql("SELECT count(*) AS n FROM chunks").to_pylist() == [{"n": 70 * (1 + len(SWEEP))}]
    assert snapshot(tmp_path) == before


# --- runs --------------------------------------------------------------------------------------------


def test_runs_oldest_first_and_run_none_is_the_newest_as_in_the_cli(lake):
    with kvorch.open_lake(lake.uri) as nb:
        assert nb.runs == ["zz-old", "aa-new"]  # by creation time, not by name
        newest, old = nb.compare(), nb.compare(run="zz-old")
        assert_same_rows(newest.to_pylist(), nb.compare(run="aa-new").to_pylist())
    assert_same_rows(as_cli_json(newest), cli_json("report", "--lake", lake.uri, "--format", "json"))
    assert {r["docs"] for r in old.to_pylist()} == {2} and {r["docs"] for r in newest.to_pylist()} == {3}


def test_a_run_written_after_opening_is_refused_until_reopened(tmp_path):
    lake = Lake(str(tmp_path / "lake"))
    write_run(lake, "first", run_rows(4, "a"), "2024-01-01T00:00:00+00:00")
    with kvorch.open_lake(lake.uri) as nb:
        write_run(lake, "second", run_rows(5, "a"), "2024-02-01T00:00:00+00:00")
        assert nb.runs == ["first"]
        assert_same_rows(nb.compare().to_pylist(), nb.compare(run="first").to_pylist())
        assert "after it was opened; open it again" in one_line_error(lambda: nb.compare(run="second"))
    with kvorch.open_lake(lake.uri) as nb:
        assert nb.runs == ["first", "second"]
        assert_same_rows(nb.compare().to_pylist(), nb.compare(run="second").to_pylist())


def test_an_incomplete_run_is_refused_unless_allowed_and_then_warns(tmp_path):
    lake = Lake(str(tmp_path / "lake"))
    write_run(lake, "r", run_rows(6, "ab"), "2024-01-01T00:00:00+00:00", tasks=["t0", "t1"])  # t1 never ran
    with kvorch.open_lake(lake.uri) as nb:
        assert "run r is incomplete: 1 of 2 tasks not done" in one_line_error(nb.compare)
    with kvorch.open_lake(lake.uri, allow_incomplete=True) as nb, pytest.warns(UserWarning) as warned:
        table = nb.compare()
    assert table.num_rows == 1 + len(SWEEP)
    assert [str(w.message).split(":")[0] for w in warned] == ["INCOMPLETE RUN r"]
    assert warned[0].filename == __file__  # pointed at the caller's line, not inside kvorch/


def test_sql_warns_that_a_damaged_runs_rows_are_left_out(tmp_path):
    lake = Lake(str(tmp_path / "lake"))
    write_run(lake, "r", run_rows(7, "a"), "2024-01-01T00:00:00+00:00")
    Path(lake.part_path("r", "knorm", "t0") + ".sha256").unlink()
    with kvorch.open_lake(lake.uri) as nb, pytest.warns(UserWarning, match="its rows are left out of chunks"):
        assert nb.sql("SELECT count(*) AS n FROM chunks").to_pylist() == [{"n": 0}]


# --- errors and lifetime ----------------------------------------------------------------------------


def test_errors_are_one_line(lake, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    assert "no lake at" in one_line_error(lambda: kvorch.open_lake(tmp_path / "missing"))
    (tmp_path / "empty").mkdir()
    assert "has no runs; run kvorch submit" in one_line_error(lambda: kvorch.open_lake(tmp_path / "empty"))
    with kvorch.open_lake(Path(lake.uri)) as nb:
        assert "run 'nope' is not in lake" in one_line_error(lambda: nb.compare(run="nope"))
        assert "is not a valid run id" in one_line_error(lambda: nb.compare(run="../zz-old"))
        assert "no report table 'nope'; tables: compare" in one_line_error(lambda: nb.table("nope"))
        assert "takes densities besides run, not reference" in one_line_error(
            lambda: nb.table("frontier", reference="baseline")
        )
        assert "is not a config of run aa-new" in one_line_error(lambda: nb.paired(reference="tova"))


def test_a_lake_with_only_scores_opens_for_sql_but_has_no_run_tables(tmp_path):
    lake = Lake(str(tmp_path / "lake"))
    lake.write_table(lake.path("scores", "run_id=s", "scores.parquet"), SCORES_SCHEMA.empty_table())
    with kvorch.open_lake(lake.uri) as nb:
        assert nb.runs == []
        assert nb.sql("SELECT count(*) AS n FROM scores").to_pylist() == [{"n": 0}]
        assert "has no runs" in one_line_error(nb.compare)


def test_the_context_manager_closes_the_connection(lake):
    with kvorch.open_lake(lake.uri) as nb:
        con = nb._con
        assert nb.sql("SELECT 1 AS x").to_pylist() == [{"x": 1}]
    with pytest.raises(duckdb.ConnectionException):
        con.execute("SELECT 1")
    assert "is closed; open it again" in one_line_error(nb.compare)
    assert "is closed" in one_line_error(lambda: nb.sql("SELECT 1"))
    nb.close()  # twice is fine
    assert "closed" in repr(nb)


def test_importing_and_reading_never_imports_torch_transformers_or_ray(lake):
    code = (
        "import sys, kvorch\n"
        f"with kvorch.open_lake({lake.uri!r}) as nb:\n"
        "    nb.compare(); nb.frontier(); nb.sql('SELECT count(*) FROM chunks')\n"
        "print(sorted(m for m in ('torch', 'transformers', 'ray') if m in sys.modules))\n"
    )
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"


def test_to_pandas_without_pandas_says_what_to_install(lake, tmp_path):
    """pyarrow's to_pandas() with pandas missing: the error names the extra, in a fresh process
    where pandas cannot be found (whatever this environment has)."""
    code = (
        "import sys, importlib.machinery as m\n"
        "sys.path_importer_cache.clear()\n"
        "real = m.PathFinder.find_spec\n"
        "m.PathFinder.find_spec = classmethod(lambda cls, n, p=None, t=None: None if n == 'pandas' "
        "else real(n, p, t))\n"
        "import kvorch\n"
        f"with kvorch.open_lake({lake.uri!r}) as nb:\n"
        "    nb.compare().to_pandas()\n"
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=tmp_path)
    assert done.returncode == 1
    last = done.stderr.strip().splitlines()[-1]
    assert last.startswith("ModuleNotFoundError: No module named 'pandas'"), last
    assert "pip install 'kvorch[notebook]'" in last


def test_every_report_names_its_run_and_runs_shows_each_kind(tmp_path):
    """After a probe run, a plain `kvorch report` reads it (the newest): stderr says which run,
    what it evaluated and when; `kvorch runs` shows each run's kind."""
    lake = Lake(str(tmp_path / "lake"))
    write_run(lake, "prose", run_rows(1), "2024-01-01T00:00:00+00:00")
    write_run(lake, "probe", run_rows(1), "2024-06-01T00:00:00+00:00")
    for run_id, task in (("prose", None), ("probe", "needle")):
        extra = {"corpus": "pydoc", "task": task}
        path = lake.run_dir(run_id) + "/spec.json"
        lake.write_json(path, {**lake.read_json(path), **extra})
    result = CliRunner().invoke(main, ["report", "--lake", lake.uri])
    assert result.exit_code == 0, result.output
    said = "kvorch: report of run probe (task needle, created 2024-06-01T00:00:00+00:00)"
    assert result.stderr.splitlines()[0] == said
    other = CliRunner().invoke(main, ["report", "--lake", lake.uri, "--run", "prose"])
    assert "report of run prose (corpus pydoc," in other.stderr
    listed = CliRunner().invoke(main, ["runs", "--lake", lake.uri, "--format", "csv"]).output.splitlines()
    assert listed[0].startswith("run_id,kind,created_at")
    assert [line.split(",")[:2] for line in listed[1:]] == [["prose", "corpus pydoc"], ["probe", "task needle"]]


def test_table_all_and_index_html_show_only_tables_with_content(tmp_path):
    """A run whose methods have one threshold each (as the default run): --table all leaves out
    frontier, head_ablation, retrieval and answers, one line each saying why; index.html opens with
    compare. The same lake with a two-point sweep keeps frontier."""
    single = Lake(str(tmp_path / "single"))
    write_run(single, "r", [r for r in run_rows(1) if r["method"] != "knorm"], "2024-01-01T00:00:00+00:00")
    result = CliRunner().invoke(main, ["report", "--lake", single.uri, "--table", "all", "--plot", str(tmp_path / "p")])
    assert result.exit_code == 0, result.output
    assert [line for line in result.output.splitlines() if line.startswith("== ")] == [
        "== compare ==", "== paired ==", "== by_position ==", "== pareto ==", "== throughput ==",
    ]  # fmt: skip
    left = [line for line in result.stderr.splitlines() if line.startswith("kvorch: left out ")]
    assert [line.split(":")[1].split()[-1] for line in left] == [
        "frontier", "head_ablation", "retrieval", "answers", "head_budgets", "traces",
    ]  # fmt: skip
    assert "each method has one threshold; pass --thresholds or --densities" in left[0]
    page = (tmp_path / "p" / "index.html").read_text()
    headings = [part.split("</h2>")[0] for part in page.split("<h2>")[1:]]
    assert headings[0] == "compare" and "frontier" not in headings
    assert "left out frontier: each method has one threshold" in page
    swept = Lake(str(tmp_path / "swept"))
    write_run(swept, "r", run_rows(1), "2024-01-01T00:00:00+00:00")
    result = CliRunner().invoke(main, ["report", "--lake", swept.uri, "--table", "all"])
    assert "== frontier ==" in result.output and "left out frontier" not in result.stderr


def test_the_default_table_fits_120_columns_and_names_what_it_left_out(lake):
    """--format table fits 120 characters (--wide: every column); csv keeps every column."""
    narrow = CliRunner().invoke(main, ["report", "--lake", lake.uri, "--table", "all"]).stdout
    assert max(len(line) for line in narrow.splitlines()) <= 120
    assert "density_compressible" in narrow.splitlines()[1].split()  # the density to compare on stays
    assert "left out for width: " in narrow and "--wide shows every column" in narrow
    wide = CliRunner().invoke(main, ["report", "--lake", lake.uri, "--wide"]).stdout
    header = wide.splitlines()[0].split()
    csv_header = CliRunner().invoke(main, ["report", "--lake", lake.uri, "--format", "csv"]).stdout.splitlines()[0]
    assert header == csv_header.split(",") and max(len(line) for line in wide.splitlines()) > 120
    for column in ("method", "threshold", "density_with_window", "effective_context"):
        assert column in header
