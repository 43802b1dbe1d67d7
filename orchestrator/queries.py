"""DuckDB over the lake: views ``chunks``, ``docs``, ``runs``, and the named queries of ``sql/``."""

from __future__ import annotations

from importlib import resources

import duckdb
import pyarrow as pa

from orchestrator.errors import KvorchError
from orchestrator.lake import Lake
from workers.schema import CHUNK_SCHEMA, DOC_SCHEMA, PARTITION_COLUMNS


def query_names() -> list[str]:
    return sorted(f.name[: -len(".sql")] for f in resources.files("sql").iterdir() if f.name.endswith(".sql"))


def query_text(name: str) -> str:
    path = resources.files("sql") / f"{name}.sql"
    if not path.is_file():
        raise KvorchError(f"no query named {name!r}; available: {', '.join(query_names())}")
    return path.read_text(encoding="utf-8")


def connect(lake: Lake) -> duckdb.DuckDBPyConnection:
    """An in-memory DuckDB with the lake's tables as views (hive partitions as columns).

    A table with no files yet (a run still starting) is an empty view of its schema, so
    queries fail only on what they ask, never on what is merely not written yet. Chunks are read
    from the parts whose footer checks out, so a part damaged by a crash is ignored, not fatal.
    """
    if not lake.run_ids():
        raise KvorchError(f"lake {lake.uri} has no runs; run kvorch submit --lake {lake.uri} first")
    con = duckdb.connect()
    partitions = [pa.field(name, pa.string()) for name in PARTITION_COLUMNS]
    _parquet_view(con, "chunks", lake.valid_parts(), pa.schema([*CHUNK_SCHEMA, *partitions]))
    _parquet_view(con, "docs", [lake.glob("docs")], pa.schema([*DOC_SCHEMA, partitions[0]]))
    con.execute(f"CREATE VIEW runs AS SELECT * FROM read_json({_quote(lake.glob('runs'))}, union_by_name = true)")
    return con


def _parquet_view(con: duckdb.DuckDBPyConnection, name: str, files: list[str], schema: pa.Schema) -> None:
    listed = ", ".join(_quote(f) for f in files)
    try:
        con.execute(
            f"CREATE VIEW {name} AS SELECT * FROM read_parquet([{listed}], hive_partitioning = true, "
            "union_by_name = true)"
        )
    except duckdb.IOException:  # no files yet
        con.register(f"_{name}_empty", schema.empty_table())
        con.execute(f"CREATE VIEW {name} AS SELECT * FROM _{name}_empty")


def latest_run(con: duckdb.DuckDBPyConnection) -> str:
    row = con.execute("SELECT run_id FROM runs ORDER BY created_at DESC, run_id DESC LIMIT 1").fetchone()
    return row[0]


def run_named(con: duckdb.DuckDBPyConnection, name: str, params: dict) -> duckdb.DuckDBPyRelation:
    return con.execute(query_text(name), params)


def _quote(text: str) -> str:
    return "'" + text.replace("'", "''") + "'"
