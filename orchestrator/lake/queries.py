"""DuckDB over the lake: views ``chunks``, ``docs``, ``runs``, ``statuses``, ``workers``, ``scores``, ``heads``,
``answers`` (``sql/_views.sql``), the shared macros of ``sql/_macros.sql``, and the named queries of ``sql/``."""

from __future__ import annotations

import os
from dataclasses import dataclass
from importlib import resources

import duckdb
import pyarrow as pa
import pyarrow.fs as pafs

from orchestrator.errors import KvorchError
from orchestrator.lake import integrity, run_status
from orchestrator.lake.integrity import RunAudit
from orchestrator.lake.store import RUN_ID_PATTERN, Lake
from workers.contract.schema import (
    CHUNK_SCHEMA,
    DOC_SCHEMA,
    HEADS_SCHEMA,
    PARTITION_COLUMNS,
    READABLE_SCHEMA_VERSIONS,
    SCHEMA_VERSION,
    SCORES_SCHEMA,
)

# What the views read of status.json (orchestrator/lake/run_status.py), as read_json's columns,
# and as an empty table for a lake with no status yet.
_STATUS_COLUMNS = "{" + ", ".join(f"{name}: '{kind}'" for name, kind in run_status.SQL_COLUMNS.items()) + "}"
_EMPTY_STATUSES = (
    "SELECT "
    + ", ".join(
        f"[]::{kind} AS {name}" if kind.endswith("[]") else f"NULL::{kind} AS {name}"
        for name, kind in run_status.SQL_COLUMNS.items()
    )
    + " WHERE false"
)


def query_names() -> list[str]:
    """Named queries: ``sql/<name>.sql``; files starting with ``_`` are shared definitions."""
    return sorted(
        f.name[: -len(".sql")]
        for f in resources.files("sql").iterdir()
        if f.name.endswith(".sql") and not f.name.startswith("_")
    )


def query_text(name: str) -> str:
    path = resources.files("sql") / f"{name}.sql"
    if name.startswith("_") or not path.is_file():
        raise KvorchError(f"no query named {name!r}; available: {', '.join(query_names())}")
    return path.read_text(encoding="utf-8")


def run_relations(con: duckdb.DuckDBPyConnection, lake: Lake, kind: str) -> None:
    """``runs`` (every readable spec.json), ``statuses`` (every readable status.json) and
    ``workers`` (theirs, unnested) as ``kind``: VIEW reads the files at each query, TABLE copies
    them in now (the sealed connection, which may open no file later: orchestrator/lake/readonly.py).
    Only the files :func:`run_files` vouches for are read, so one damaged run never hides the others."""
    files = run_files(lake)
    if files.specs:
        con.execute(
            f"CREATE {kind} runs AS SELECT * FROM read_json({_listed(files.specs)}, union_by_name = true, "
            f"maximum_object_size = {files.largest})"
        )
    else:  # a lake with only `kvorch scores` output
        con.execute(f"CREATE {kind} runs AS SELECT NULL::VARCHAR AS run_id, NULL::VARCHAR AS created_at WHERE false")
    if files.statuses:
        con.execute(
            f"CREATE {kind} statuses AS SELECT * FROM read_json({_listed(files.statuses)}, "
            f"columns = {_STATUS_COLUMNS}, maximum_object_size = {files.largest})"
        )
    else:
        con.execute(f"CREATE {kind} statuses AS {_EMPTY_STATUSES}")
    con.execute("CREATE VIEW workers AS SELECT run_id, unnest(workers, recursive := true) FROM statuses")


@dataclass(frozen=True)
class RunFiles:
    """The run records the views may read, and one line for each run left out."""

    specs: list[str]
    statuses: list[str]
    problems: list[str]
    largest: int  # bytes of the largest file, DuckDB's maximum_object_size (its default is 16 MB)


def run_files(lake: Lake) -> RunFiles:
    """Every spec.json and status.json the views read: JSON objects, the status of its shape
    (``run_status.problem``), neither through a link. One that is not is left out, with a line
    saying why; the run's other file and every other run still read."""
    specs: list[str] = []
    statuses: list[str] = []
    problems: list[str] = []
    largest = 1 << 20
    for run_id in lake.run_ids():
        if not RUN_ID_PATTERN.fullmatch(run_id):
            problems.append(f"{lake.path('runs', 'run_id=' + run_id)} is not a kvorch run (not a valid run id)")
            continue
        for name, kept in (("spec.json", specs), ("status.json", statuses)):
            path = f"{lake.run_dir(run_id)}/{name}"
            try:
                payload = lake.read_json(path)
            except KvorchError as exc:
                problems.append(f"run {run_id}: {exc}; left out of {'runs' if name == 'spec.json' else 'statuses'}")
                continue
            why = run_status.problem(payload) if payload is not None and name == "status.json" else ""
            if why:
                problems.append(f"run {run_id}: {path} is damaged ({why}); left out of statuses")
            elif payload is not None:
                kept.append(path)
                largest = max(largest, lake.fs.get_file_info(path).size + 1)
    return RunFiles(specs, statuses, problems, largest)


def _listed(paths: list[str]) -> str:
    return "[" + ", ".join(quote(p) for p in paths) + "]"


def connect(lake: Lake, audits: dict[str, RunAudit] | None = None) -> duckdb.DuckDBPyConnection:
    """An in-memory, read-only DuckDB with the lake's tables as views (hive partitions as columns).

    ``chunks`` holds only parts whose checksum verifies and whose task is done
    (``orchestrator/lake/integrity.py``; ``audits`` when the caller already has them), so a damaged
    part or a task cut short never enters a number. A table with no files yet (a run still
    starting) is an empty view of its schema, so queries fail only on what they ask, never on
    what is merely not written yet. Parts written under a schema this kvorch cannot read stop
    here, with the fix, before any query runs. Once the views exist the connection is locked
    (:func:`lock_down`): queries read the lake and nothing else. This is the connection of
    kvorch's own queries (reports, ``kvorch runs``); user SQL runs on
    :func:`orchestrator.lake.readonly.connect_sealed`, which has the same views.
    """
    if not lake.run_ids() and not lake.exists("scores") and not lake.exists("heads"):
        raise no_runs(lake)
    con = duckdb.connect()
    audits = integrity.audit_lake(lake) if audits is None else audits
    parts = sorted(path for run in audits.values() for path in run.readable)
    doc_files = lake.table_files("docs")
    check_schema_versions(con, parts + doc_files)
    partitions = [pa.field(name, pa.string()) for name in PARTITION_COLUMNS]
    _parquet_view(con, "chunks", parts, pa.schema([*CHUNK_SCHEMA, *partitions]))
    _parquet_view(con, "docs", doc_files, pa.schema([*DOC_SCHEMA, partitions[0]]))
    _parquet_view(con, "scores", lake.table_files("scores"), pa.schema([*SCORES_SCHEMA, partitions[0]]))
    _parquet_view(con, "heads", lake.table_files("heads"), pa.schema([*HEADS_SCHEMA, partitions[0]]))
    run_relations(con, lake, "VIEW")
    create_macros(con)
    create_views(con)
    lock_down(con, lake)
    return con


def no_runs(lake: Lake) -> KvorchError:
    """The error for a lake without runs: what to run first, and the lakes with runs nearby (a
    copied command's ``--lake`` is often not where the first ``kvorch submit`` wrote)."""
    hint = nearby_hint(lake, "--lake {}")
    if lake.is_file():  # never advise writing a lake over a file
        fix = hint or "pass the directory kvorch submit --lake wrote to"
        return KvorchError(f"lake {lake.uri} is a file, not a lake directory; {fix}")
    first = f"run kvorch submit --lake {lake.uri} first"
    return KvorchError(f"lake {lake.uri} has no runs; {hint + ', or ' + first if hint else first}")


def nearby_hint(lake: Lake, how: str) -> str:
    """"lakes with runs nearby: ./kvorch-lake (1 run); pass <how>" ("" when there is none), with
    ``how`` formatted with the first lake's path."""
    nearby = nearby_lakes(lake)
    if not nearby:
        return ""
    shown = ", ".join(f"{path} ({n} run{'s' if n != 1 else ''})" for path, n in nearby)
    return f"lakes with runs nearby: {shown}; pass {how.format(nearby[0][0])}"


def nearby_lakes(lake: Lake, limit: int = 5) -> list[tuple[str, int]]:
    """(path, runs) of the local lakes with runs next to ``lake`` and in the working directory
    (their direct subdirectories that hold ``runs/run_id=*``), as paths to pass to ``--lake``;
    none for a lake on an object store."""
    if not isinstance(lake.fs, pafs.LocalFileSystem):
        return []
    here = os.getcwd()
    found: dict[str, int] = {}
    for folder in dict.fromkeys([here, os.path.dirname(lake.root)]):
        try:
            entries = sorted(os.scandir(folder), key=lambda e: e.name)
        except OSError:
            continue
        for entry in entries:
            path = os.path.abspath(entry.path)
            if path == lake.root or path in found or not entry.is_dir(follow_symlinks=False):
                continue
            runs = os.path.join(path, "runs")
            try:
                n = sum(1 for e in os.scandir(runs) if e.name.startswith("run_id="))
            except OSError:
                continue
            if n:
                found[path] = n
    shown = [(_shown_path(path, here), n) for path, n in found.items()]
    return shown[:limit]


def _shown_path(path: str, here: str) -> str:
    """``./name`` for a path under the working directory, else the absolute path."""
    relative = os.path.relpath(path, here)
    return path if relative.startswith("..") else f"./{relative}"


def lock_down(con: duckdb.DuckDBPyConnection, lake: Lake) -> None:
    """From here on the connection reads files inside the lake only, spills nothing (no temp
    directory, which DuckDB would otherwise add to the allowed ones), installs and loads no
    extension, and cannot undo this (``lock_configuration``). This connection runs kvorch's own
    named queries with DuckDB's Parquet reader; a ``COPY ... TO`` into the lake would still work
    at this level, so user SQL never runs here but on ``orchestrator/lake/readonly.py``'s sealed
    connection, which opens no file at all."""
    con.execute("SET temp_directory = ''")
    con.execute(f"SET allowed_directories = [{quote(lake.root.rstrip('/') + '/')}]")
    con.execute("SET enable_external_access = false")
    con.execute("SET autoinstall_known_extensions = false")
    con.execute("SET autoload_known_extensions = false")
    con.execute("SET lock_configuration = true")


def metrics_of(rows: pa.Table) -> list[dict]:
    """``config_metrics`` (sql/_macros.sql) of engine rows that are not in a lake, e.g. calibration's."""
    con = duckdb.connect()
    con.register("_rows", rows)
    con.execute("CREATE VIEW chunks AS SELECT *, 'rows' AS run_id FROM _rows")
    create_macros(con)
    result = con.execute("SELECT * FROM config_metrics('rows')")
    columns = [d[0] for d in result.description]
    return [dict(zip(columns, row, strict=True)) for row in result.fetchall()]


def create_macros(con: duckdb.DuckDBPyConnection) -> None:
    con.execute((resources.files("sql") / "_macros.sql").read_text(encoding="utf-8"))


def create_views(con: duckdb.DuckDBPyConnection) -> None:
    """The views of ``sql/_views.sql`` (``answers``), over ``chunks`` and ``docs``, which must exist."""
    con.execute((resources.files("sql") / "_views.sql").read_text(encoding="utf-8"))


def check_schema_versions(con: duckdb.DuckDBPyConnection, files: list[str]) -> None:
    """Every Parquet file read must carry a schema version this kvorch reads.

    Only footers are read (the key-value metadata), so this costs milliseconds on large lakes.
    """
    if not files:
        return
    versions = dict(
        con.execute(
            "SELECT file_name, decode(value) FROM parquet_kv_metadata($files) "
            "WHERE decode(key) = 'kvorch_schema_version'",
            {"files": files},
        ).fetchall()
    )
    for path in files:
        version = versions.get(path)
        if version is None or not version.isdigit():
            raise KvorchError(f"{path} has no kvorch schema version: not written by kvorch; remove it from the lake")
        if int(version) > SCHEMA_VERSION:
            raise KvorchError(
                f"{path} was written with lake schema version {version}, newer than this kvorch reads "
                f"({SCHEMA_VERSION}); upgrade kvorch (pip install -U kvorch)"
            )
        if int(version) not in READABLE_SCHEMA_VERSIONS:
            raise KvorchError(
                f"{path} was written with lake schema version {version}, which this kvorch no longer reads "
                f"(reads {', '.join(map(str, sorted(READABLE_SCHEMA_VERSIONS)))}); re-run that job with "
                "kvorch submit or read it with the kvorch version that wrote it"
            )


def _parquet_view(con: duckdb.DuckDBPyConnection, name: str, files: list[str], schema: pa.Schema) -> None:
    listed = ", ".join(quote(f) for f in files)
    try:
        if not files:
            raise duckdb.IOException("no files")
        source = f"read_parquet([{listed}], hive_partitioning = true, union_by_name = true)"
        con.execute(f"CREATE VIEW {name} AS SELECT * FROM {source}")
    except duckdb.IOException:  # no files yet
        con.register(f"_{name}_empty", schema.empty_table())
        con.execute(f"CREATE VIEW {name} AS SELECT * FROM _{name}_empty")
        return
    present = {row[0] for row in con.execute(f"DESCRIBE {name}").fetchall()}
    if any(f.name not in present for f in schema):  # only parts of an older schema version
        con.register(f"_{name}_empty", schema.empty_table())
        con.execute(
            f"CREATE OR REPLACE VIEW {name} AS SELECT * FROM {source} UNION ALL BY NAME SELECT * FROM _{name}_empty"
        )


def run_order(con: duckdb.DuckDBPyConnection) -> list[str]:
    """The lake's run ids (``runs``: those with a spec.json), oldest first by ``created_at``, then
    by id; the last one is the newest, which reports show when no run is named."""
    rows = con.execute("SELECT run_id FROM runs ORDER BY created_at NULLS FIRST, run_id").fetchall()
    return [row[0] for row in rows]


def latest_run(con: duckdb.DuckDBPyConnection) -> str | None:
    """The newest run (None in a lake without runs, e.g. one with only ``kvorch scores`` output)."""
    runs = run_order(con)
    return runs[-1] if runs else None


def run_named(con: duckdb.DuckDBPyConnection, name: str, params: dict) -> duckdb.DuckDBPyRelation:
    return con.execute(query_text(name), params)


def named_relation(con: duckdb.DuckDBPyConnection, name: str, params: dict) -> duckdb.DuckDBPyRelation:
    """Named query ``name`` as a relation: run when fetched, as Python rows (``fetchall``) or as
    Arrow (:func:`arrow_of`)."""
    return con.sql(query_text(name), params=params)


def arrow_of(relation: duckdb.DuckDBPyRelation) -> pa.Table:
    """``relation`` fetched as an Arrow table straight from DuckDB (no Python rows in between).

    DuckDB's sums of integers are HUGEINT, which Arrow receives as ``decimal128(38, 0)`` (pandas
    would hold Decimal objects); whole-number decimal columns become int64 when every value fits,
    as the rows path gives Python ints. A column with a larger value keeps its exact decimals.
    """
    return whole_decimals_as_ints(relation.to_arrow_table())


def whole_decimals_as_ints(table: pa.Table) -> pa.Table:
    """``table`` with each whole-number decimal column as int64 where every value fits (:func:`arrow_of`)."""
    for i, field in enumerate(table.schema):
        if pa.types.is_decimal(field.type) and field.type.scale == 0:
            try:
                table = table.set_column(i, field.with_type(pa.int64()), table.column(i).cast(pa.int64()))
            except pa.ArrowInvalid:
                pass
    return table


def quote(text: str) -> str:
    return "'" + text.replace("'", "''") + "'"
