"""DuckDB over the lake: views ``chunks``, ``docs``, ``runs``, and the named queries of ``sql/``."""

from __future__ import annotations

from importlib import resources

import duckdb

from orchestrator.errors import KvorchError
from orchestrator.lake import Lake


def query_names() -> list[str]:
    return sorted(f.name[: -len(".sql")] for f in resources.files("sql").iterdir() if f.name.endswith(".sql"))


def query_text(name: str) -> str:
    path = resources.files("sql") / f"{name}.sql"
    if not path.is_file():
        raise KvorchError(f"no query named {name!r}; available: {', '.join(query_names())}")
    return path.read_text(encoding="utf-8")


def connect(lake: Lake) -> duckdb.DuckDBPyConnection:
    """An in-memory DuckDB with the lake's tables as views (hive partitions as columns)."""
    if not lake.run_ids():
        raise KvorchError(f"lake {lake.uri} has no runs; run kvorch submit --lake {lake.uri} first")
    con = duckdb.connect()
    con.execute(
        f"CREATE VIEW chunks AS SELECT * FROM read_parquet({_quote(lake.glob('chunks'))}, "
        "hive_partitioning = true, union_by_name = true)"
    )
    con.execute(
        f"CREATE VIEW docs AS SELECT * FROM read_parquet({_quote(lake.glob('docs'))}, hive_partitioning = true)"
    )
    con.execute(
        f"CREATE VIEW runs AS SELECT * FROM read_json({_quote(lake.glob('runs'))}, "
        "hive_partitioning = false, union_by_name = true)"
    )
    return con


def latest_run(con: duckdb.DuckDBPyConnection) -> str:
    row = con.execute("SELECT run_id FROM runs ORDER BY created_at DESC, run_id DESC LIMIT 1").fetchone()
    return row[0]


def run_named(con: duckdb.DuckDBPyConnection, name: str, params: dict) -> duckdb.DuckDBPyRelation:
    return con.execute(query_text(name), params)


def _quote(text: str) -> str:
    return "'" + text.replace("'", "''") + "'"
