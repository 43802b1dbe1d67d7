"""``kvorch sql`` and ``LakeReader.sql`` write nothing, whatever the statement (issue 28, "A read-only
SQL that truly cannot write"), and every query is bounded in time and memory.

Every statement type DuckDB's parser knows, each write also wrapped in EXPLAIN, EXPLAIN ANALYZE
(which runs what it explains), a prepared statement, a table function and a multi-statement
string, runs against a real lake through the CLI, the notebook API and the sealed connection alone
(no statement list in front of it). Afterwards every file under the lake, the working directory
(DuckDB's default temp directory ``.tmp/`` holds a secret) and the home directory (persistent
secrets, extensions) is byte-identical and nothing new appeared; the secret never shows.
"""

from __future__ import annotations

import hashlib
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
from tests.test_notebook import SWEEP, run_rows, write_run
from workers.contract.schema import DOC_SCHEMA, HEADS_SCHEMA, SCORES_SCHEMA

ROOT = Path(__file__).resolve().parents[1]
SECRET = "kvorch-secret-28"
ROWS = 70 * (1 + len(SWEEP))  # run_rows(..., "a"): one document

# Statements that would create, change or delete a file if DuckDB could open one, or that change
# what the connection may do. {part}, {checksum}, {status}, {lake}, {cwd}, {home}, {outside} are paths.
WRITES = [
    "COPY (SELECT 1 AS x) TO '{part}' (FORMAT parquet)",
    "COPY (SELECT 'x' AS sha256) TO '{checksum}' (FORMAT json)",
    "COPY (SELECT 'failed' AS status) TO '{status}' (FORMAT json)",
    "COPY (SELECT 1 AS x) TO '{part}' (FORMAT parquet, USE_TMP_FILE false, OVERWRITE true)",
    "COPY chunks TO '{lake}/chunks/run_id=r/method=copied' (FORMAT parquet, PARTITION_BY (config))",
    "COPY chunks TO '{cwd}/copied.csv'",
    "COPY (SELECT 1) TO '{cwd}/.tmp/spilled.csv'",
    "COPY statuses FROM '{outside}'",
    "EXPORT DATABASE '{cwd}/exported'",
    "IMPORT DATABASE '{cwd}'",
    "ATTACH '{cwd}/new.duckdb' AS n",
    "ATTACH '{lake}/inside.duckdb' AS n (TYPE duckdb)",
    "COPY FROM DATABASE memory TO n",
    "DETACH n",
    "USE memory",
    "CREATE TABLE t AS SELECT * FROM chunks",
    "CREATE TABLE pivoted AS PIVOT chunks ON method USING sum(nll_sum)",
    "CREATE VIEW v AS SELECT 1",
    "CREATE MACRO m(x) AS x",
    "CREATE FUNCTION f(x) AS x + 1",
    "CREATE SEQUENCE s",
    "CREATE TYPE e AS ENUM ('a')",
    "CREATE SECRET s (TYPE s3, KEY_ID 'k', SECRET 'v')",
    "CREATE PERSISTENT SECRET s (TYPE s3, KEY_ID 'k', SECRET 'v')",
    "INSERT INTO statuses SELECT * FROM statuses",
    "UPDATE statuses SET status = 'failed'",
    "DELETE FROM statuses",
    "TRUNCATE runs",
    "MERGE INTO statuses USING statuses AS s ON statuses.run_id = s.run_id WHEN MATCHED THEN DELETE",
    "ALTER TABLE runs RENAME TO old_runs",
    "COMMENT ON TABLE runs IS 'x'",
    "DROP TABLE runs",
    "DROP VIEW chunks",
    "INSTALL httpfs",
    "LOAD httpfs",
    "UPDATE EXTENSIONS",
    "SET temp_directory = '{cwd}'",
    "RESET temp_directory",
    "SET enable_external_access = true",
    "SET lock_configuration = false",
    "SET allowed_directories = ['{cwd}']",
    "SET memory_limit = '1TB'",
    "SET VARIABLE v = 1",
    "SET profiling_output = '{cwd}/profile.json'",
    "PRAGMA enable_profiling = 'json'",
    "SET log_query_path = '{cwd}/queries.log'",
    "CALL enable_logging(storage := 'file', storage_path := '{cwd}/logs')",
    "CALL pragma_version()",
    "CHECKPOINT",
    "FORCE CHECKPOINT",
    "VACUUM",
    "ANALYZE",
    "BEGIN TRANSACTION",
    "COMMIT",
    "PREPARE p AS COPY (SELECT 1 AS x) TO '{part}' (FORMAT parquet)",
    "EXECUTE p",
    "DEALLOCATE p",
]
# The same statements inside the forms that got past the old statement list, or might get past one.
WRAPPERS = [
    "{}",
    "EXPLAIN {}",
    "EXPLAIN ANALYZE {}",
    "EXPLAIN (FORMAT json) ANALYZE {}",
    "PREPARE q AS {}; EXECUTE q",
    "SELECT 1; {}",
]
TABLE_FUNCTION = "SELECT * FROM query('{}')"  # a table function that runs a query string
# Reads of files DuckDB must not open: outside the lake, its temp directory, or the lake's files
# other than through the views.
READS = [
    "SELECT content FROM read_text('{cwd}/.tmp/secret.txt')",
    "SELECT content FROM read_blob('{cwd}/.tmp/secret.txt')",
    "SELECT * FROM read_csv('{cwd}/.tmp/secret.txt')",
    "SELECT * FROM '{cwd}/.tmp/secret.txt'",
    "SELECT * FROM read_csv('/etc/passwd')",
    "SELECT * FROM read_parquet('{outside}')",
    "SELECT * FROM glob('{cwd}/.tmp/*')",
    "SELECT * FROM glob('/*')",
    "SELECT * FROM read_json('{status}')",
    "SELECT * FROM parquet_metadata('{part}')",
    "SELECT * FROM read_parquet('{lake}/../outside.parquet')",
    "SELECT * FROM duckdb_extensions()",
    "SELECT * FROM query_table('{outside}')",
]
# Queries that only read the views, all of which run.
QUERIES = [
    "SELECT count(*) FROM chunks",
    "FROM chunks LIMIT 1",
    "WITH c AS (SELECT config FROM chunks) SELECT count(DISTINCT config) FROM c",
    "DESCRIBE chunks",
    "SHOW TABLES",
    "SUMMARIZE runs",
    "SELECT * FROM config_metrics('r')",
    "PIVOT chunks ON method USING sum(nll_sum) GROUP BY run_id",
    "UNPIVOT (SELECT 1 AS a, 2 AS b) ON a, b INTO NAME k VALUE v",
    "EXPLAIN SELECT * FROM chunks",
    "EXPLAIN ANALYZE SELECT count(*) FROM chunks",
    "SELECT * FROM query('SELECT count(*) FROM chunks')",
    "SELECT * FROM workers",
    "SELECT count(*) FROM docs JOIN scores USING (run_id, doc_id)",
    "SELECT * FROM heads",
]
# StatementType members no SQL text reaches: the parser files these forms under another type
# (ANALYZE under VACUUM, CREATE FUNCTION under CREATE, SET VARIABLE under SET, COPY FROM DATABASE
# under PRAGMA), and INVALID, RELATION, LOGICAL_PLAN and EXTENSION come from the Python relation
# API, internal plans and extensions' own parsers.
NOT_FROM_TEXT = {"ANALYZE", "CREATE_FUNC", "VARIABLE_SET", "COPY_DATABASE", "INVALID", "RELATION", "LOGICAL_PLAN"}
NOT_FROM_TEXT |= {"EXTENSION"}


def wrapped(write: str) -> list[str]:
    """``write`` in every wrapper, and inside the table function."""
    return [wrapper.format(write) for wrapper in WRAPPERS] + [TABLE_FUNCTION.format(write.replace("'", "''"))]


def statements() -> list[str]:
    return [sql for write in WRITES for sql in wrapped(write)] + READS + QUERIES


def statement_types(sql: str) -> set[str]:
    try:
        return {s.type.name for s in duckdb.extract_statements(sql)}
    except ValueError:  # a type DuckDB's Python package has no name for ("UPDATE EXTENSIONS")
        return {"UNNAMED"}
    except duckdb.Error:
        return set()


def snapshot(*roots: Path) -> dict[str, str]:
    """Every file (its sha256) and directory under ``roots``."""
    seen = {}
    for root in roots:
        for p in sorted(root.rglob("*")):
            seen[str(p)] = hashlib.sha256(p.read_bytes()).hexdigest() if p.is_file() else "dir"
    return seen


@pytest.fixture
def world(tmp_path, monkeypatch) -> dict[str, str]:
    """A lake with every table, a working directory whose ``.tmp/`` holds a secret, a home
    directory, and a Parquet file outside the lake; the paths, by placeholder."""
    lake = Lake(str(tmp_path / "lake"))
    write_run(lake, "r", run_rows(3, "a"), "2024-01-01T00:00:00+00:00")
    docs = [{"doc_id": "a", "source": "s", "n_chars": 700, "n_tokens": 700, "sha256": "0" * 64}]
    lake.write_docs("r", pa.Table.from_pylist(docs, schema=DOC_SCHEMA))
    score = {"doc_id": "a", "config": "knorm@-1", "layer": 0, "kv_head": 0, "position": 0}
    scores = [{**score, "score": 1.0, "kept": True}]
    lake.write_table(lake.path("scores", "run_id=r", "scores.parquet"), pa.Table.from_pylist(scores, SCORES_SCHEMA))
    lake.write_table(lake.path("heads", "run_id=h", "heads.parquet"), HEADS_SCHEMA.empty_table())
    cwd, home = tmp_path / "cwd", tmp_path / "home"
    (cwd / ".tmp").mkdir(parents=True)
    (cwd / ".tmp" / "secret.txt").write_text(f"{SECRET}\n")
    home.mkdir()
    outside = tmp_path / "outside.parquet"
    pq.write_table(pa.table({"secret": [SECRET]}), outside)
    monkeypatch.chdir(cwd)
    monkeypatch.setenv("HOME", str(home))
    part = lake.part_path("r", "knorm", "t0")
    return {
        "lake": lake.root,
        "part": part,
        "checksum": part + ".sha256",
        "status": lake.run_dir("r") + "/status.json",
        "cwd": str(cwd),
        "home": str(home),
        "outside": str(outside),
        "root": str(tmp_path),
    }


def test_every_statement_type_the_parser_knows_is_tried():
    covered = set().union(*(statement_types(sql) for sql in statements()))
    assert set(duckdb.StatementType.__members__) - covered <= NOT_FROM_TEXT, "add a statement of the new type"
    assert not covered & NOT_FROM_TEXT  # else it comes from text after all: move it out of NOT_FROM_TEXT


def test_kvorch_sql_writes_nothing_and_reads_only_the_views(world):
    """Through the CLI, each write as given and under EXPLAIN ANALYZE (the notebook test below
    and the sealed connection's take every wrapper: a CLI run costs a connection, ~0.1 s)."""
    before = snapshot(Path(world["root"]))
    for template in [*WRITES, *(f"EXPLAIN ANALYZE {write}" for write in WRITES), *READS, *QUERIES]:
        sql = template.format(**world)
        result = CliRunner().invoke(main, ["sql", "--lake", world["lake"], sql])
        if result.exit_code:
            errors = result.output.strip().splitlines()
            assert len(errors) == 1 and errors[0].startswith("Error: "), (sql, result.output)
        assert result.exception is None or isinstance(result.exception, SystemExit), (sql, result.exception)
        assert SECRET not in result.output, sql
        assert snapshot(Path(world["root"])) == before, sql
    counted = CliRunner().invoke(main, ["sql", "--lake", world["lake"], "SELECT count(*) AS n FROM chunks"])
    assert counted.exit_code == 0 and counted.output.split()[-1] == str(ROWS)


def test_the_notebook_api_writes_nothing_and_reads_only_the_views(world):
    before = snapshot(Path(world["root"]))
    with kvorch.open_lake(world["lake"]) as nb:
        for template in statements():
            sql = template.format(**world)
            try:
                table = nb.sql(sql)
            except KvorchError as exc:
                assert "\n" not in str(exc) and SECRET not in str(exc), sql
            else:
                assert SECRET not in str(table.to_pylist()), sql
            assert snapshot(Path(world["root"])) == before, sql
        assert nb.sql("SELECT count(*) AS n FROM chunks").to_pylist() == [{"n": ROWS}]


def test_the_sealed_connection_alone_writes_nothing(world):
    """No statement list in front: DuckDB itself cannot open a file once sealed. One connection
    per write, for all its wrappers (a ROLLBACK after each ends any transaction one opened)."""
    from orchestrator.lake.readonly import connect_sealed

    lake = Lake(world["lake"])
    before = snapshot(Path(world["root"]))
    for group in [*(wrapped(write) for write in WRITES), READS, QUERIES]:
        con = connect_sealed(lake)
        for template in group:
            sql = template.format(**world)
            try:
                fetched = con.execute(sql).fetchall()
            except (duckdb.Error, ValueError):
                pass
            else:
                assert SECRET not in str(fetched), sql
            try:
                con.execute("ROLLBACK")
            except duckdb.Error:
                pass
            assert snapshot(Path(world["root"])) == before, sql
        con.close()


def test_the_issue_probes_are_one_line_errors_and_the_lake_stays_as_it_was(world):
    before = snapshot(Path(world["root"]))
    probes = {
        f"EXPLAIN ANALYZE COPY (SELECT 1 AS x) TO '{world['part']}' (FORMAT parquet)": (
            "kvorch sql is read-only: EXPLAIN runs its statement, and COPY statements are refused"
        ),
        f"SELECT content FROM read_text('{world['cwd']}/.tmp/secret.txt')": "writes nothing: Permission Error",
        "UPDATE EXTENSIONS": "kvorch sql is read-only: OTHER statements are refused",
    }
    for sql, message in probes.items():
        result = CliRunner().invoke(main, ["sql", "--lake", world["lake"], sql])
        assert result.exit_code == 1 and result.output.count("\n") == 1 and message in result.output, result.output
    assert snapshot(Path(world["root"])) == before


# --- bounded queries -----------------------------------------------------------------------------

NEVER_ENDS = "SELECT sum(a.range * b.range) FROM range(100000000) a, range(100000000) b"  # 10^16 products


def test_a_query_past_its_timeout_is_interrupted_naming_the_knob(world):
    result = CliRunner().invoke(main, ["sql", "--lake", world["lake"], "--timeout", "0.5", NEVER_ENDS])
    assert result.exit_code == 1 and result.output.count("\n") == 1
    assert "query stopped after --timeout 0.5 s" in result.output and "raise --timeout" in result.output
    with kvorch.open_lake(world["lake"]) as nb:
        with pytest.raises(KvorchError, match=r"query stopped after timeout= 0.5 s; .* raise timeout="):
            nb.sql(NEVER_ENDS, timeout=0.5)
        assert nb.sql("SELECT 42 AS x", timeout=600).to_pylist() == [{"x": 42}]
        # A deadline ends with its query: this one's 1 s timer must not interrupt the next query,
        # which would then fail as a raw interrupt after ~1 s rather than by its own 4 s deadline.
        assert nb.sql("SELECT 1 AS x", timeout=1).to_pylist() == [{"x": 1}]
        with pytest.raises(KvorchError, match=r"query stopped after timeout= 4 s"):
            nb.sql(NEVER_ENDS, timeout=4)


def test_the_cli_query_ends_by_its_timeout_in_a_fresh_process(world):
    """Bounded from outside: the whole command ends well inside the test's own limit however busy
    the machine is (no assertion on how long it took, only that it ended with the message)."""
    command = [sys.executable, "-c", "from orchestrator.cli import main; main()", "sql", "--lake", world["lake"]]
    done = subprocess.run(
        [*command, "--timeout", "1", NEVER_ENDS], capture_output=True, text=True, timeout=900, cwd=ROOT
    )
    assert done.returncode == 1 and "query stopped after --timeout 1 s" in done.stderr, done.stderr


def test_a_query_past_its_memory_limit_fails_naming_the_knob(world):
    big_sort = "SELECT * FROM range(30000000) ORDER BY random()"
    result = CliRunner().invoke(main, ["sql", "--lake", world["lake"], "--memory-limit", "30MB", big_sort])
    assert result.exit_code == 1 and result.output.count("\n") == 1, result.output
    assert "query needs more memory than --memory-limit 30MB" in result.output
    assert "raise --memory-limit" in result.output
    with kvorch.open_lake(world["lake"]) as nb:
        with pytest.raises(KvorchError, match="more memory than memory_limit= 30MB"):
            nb.sql(big_sort, memory_limit="30MB")
        assert nb.sql("SELECT count(*) AS n FROM chunks", memory_limit="30MB").to_pylist() == [{"n": ROWS}]
    assert not Path(world["cwd"], ".tmp", "duckdb_temp_storage").exists()  # nothing spilled


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--timeout", "0"], "--timeout 0.0 is not a number of seconds above 0"),
        (["--timeout", "inf"], "'inf' is not a finite number"),  # every float option's rule (cli/options.py)
        (["--timeout", "soon"], "'soon' is not a valid float"),
        (["--memory-limit", "lots"], "--memory-limit 'lots' is not a memory size; pass e.g. 500MB, 4GB or 25%"),
        (["--memory-limit", "4"], "--memory-limit '4' is not a memory size"),
    ],
)
def test_bad_limits_are_one_line_errors(world, args, message):
    result = CliRunner().invoke(main, ["sql", "--lake", world["lake"], *args, "SELECT 1"])
    assert result.exit_code != 0 and message in result.output, result.output
    assert "Traceback" not in result.output


def test_the_sealed_views_give_the_native_readers_rows(world):
    """The sealed connection's views (Arrow datasets, in-memory tables) hold exactly what the
    reports' connection (DuckDB's own Parquet reader) reads, column by column."""
    from orchestrator.lake.queries import connect
    from orchestrator.lake.readonly import connect_sealed

    lake = Lake(world["lake"])
    native, sealed = connect(lake), connect_sealed(lake)
    for view in ("chunks", "docs", "runs", "statuses", "workers", "scores", "heads"):
        query = f"SELECT * FROM {view} ORDER BY ALL"
        assert native.execute(f"DESCRIBE {view}").fetchall() == sealed.execute(f"DESCRIBE {view}").fetchall(), view
        assert native.execute(query).fetchall() == sealed.execute(query).fetchall(), view
    filters = [
        "run_id = 'r'",
        "method = 'knorm'",
        "config IN ('knorm@-1', 'h2o@1')",
        "config LIKE 'knorm%'",
        "press IS NULL",
        "threshold > -1.5",
        "doc_id <> 'b' AND chunk_index BETWEEN 3 AND 9",
    ]
    for where in filters:
        columns = "run_id, method, config, count(*), round(sum(nll_sum), 6)"
        query = f"SELECT {columns} FROM chunks WHERE {where} GROUP BY ALL ORDER BY ALL"
        assert native.execute(query).fetchall() == sealed.execute(query).fetchall(), where
