"""Read-only SQL over the lake by construction: the one connection ``kvorch sql`` and
``LakeReader.sql`` run user queries on, and the bounds on each query.

:func:`connect_sealed` builds every view before DuckDB is sealed, from sources that need no file
access afterwards: the Parquet tables (``chunks``, ``docs``, ``scores``, ``heads``) are Arrow
datasets over the files (pyarrow opens them, for reading only), the JSON ones (``runs``,
``statuses``) are copied into in-memory tables. Then :func:`seal` turns DuckDB's file access off
with no directory or file excepted, turns spilling off (no temp directory), and locks the
configuration. From then on DuckDB opens no file at all, to read or to write, whatever the
statement (``EXPLAIN ANALYZE COPY``, a prepared statement, a table function, ``PIVOT``,
``EXPORT``, ``ATTACH``, ...): the statement list of :func:`check_read_only` only gives the forms it
refuses up front a clearer line. ``tests/test_sql_readonly.py`` runs every statement type the
parser knows and checks that the lake and the working directory are byte-identical afterwards.

:func:`run` bounds each query: a timer interrupts it past ``timeout`` seconds, and
``memory_limit`` is DuckDB's, which without spilling fails a query that needs more; each is a
one-line error naming its knob (``--timeout`` / ``timeout=``).
"""

from __future__ import annotations

import functools
import math
import re
import threading
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any, TypeVar

import duckdb
import pyarrow as pa
import pyarrow.dataset as ds

from orchestrator.errors import KvorchError
from orchestrator.lake import integrity
from orchestrator.lake.integrity import RunAudit
from orchestrator.lake.queries import (
    check_schema_versions,
    create_macros,
    create_views,
    no_runs,
    quote,
    run_relations,
    whole_decimals_as_ints,
)
from orchestrator.lake.store import Lake
from workers.contract.schema import CHUNK_SCHEMA, DOC_SCHEMA, HEADS_SCHEMA, PARTITION_COLUMNS, SCORES_SCHEMA

DEFAULT_TIMEOUT_S = 120.0  # no report query comes near it (BENCHMARKS.md: seconds on 10M rows)
DEFAULT_MEMORY_LIMIT = "4GB"

# Statements that only read: a query, or the plan of one. DESCRIBE, SHOW and SUMMARIZE parse as
# SELECT. Any statement holding a PIVOT whose values come from the data parses as MULTI (DuckDB
# lists the values first), a query or not: it counts as a query when it starts as one.
READ_ONLY_STATEMENTS = ("SELECT", "EXPLAIN")
_QUERY_STARTS = ("SELECT", "FROM", "WITH", "PIVOT", "UNPIVOT", "VALUES", "TABLE", "(")
VIEWS = "chunks, docs, runs, statuses, workers, scores, heads, answers"
# The statement an EXPLAIN shows, after its options: EXPLAIN [ANALYZE] [(FORMAT json, ...)] <statement>.
_EXPLAINED = re.compile(r"\s*EXPLAIN\s+(?:\([^)]*\)\s*)?(?:ANALY[SZ]E\s+)?(?P<rest>.*)", re.IGNORECASE | re.DOTALL)

T = TypeVar("T")


@dataclass(frozen=True)
class Limits:
    """How long and how much memory one query may take, and the names the user gave them."""

    timeout_s: float = DEFAULT_TIMEOUT_S
    memory_limit: str = DEFAULT_MEMORY_LIMIT
    timeout_knob: str = "--timeout"
    memory_knob: str = "--memory-limit"

    def __post_init__(self) -> None:
        check_timeout(self.timeout_s, self.timeout_knob)
        check_memory_limit(self.memory_limit, self.memory_knob)


def check_timeout(seconds: float, knob: str = "--timeout") -> float:
    if isinstance(seconds, bool) or not isinstance(seconds, int | float) or not 0 < seconds < math.inf:
        raise KvorchError(f"{knob} {seconds!r} is not a number of seconds above 0; pass e.g. {knob} 120")
    return float(seconds)


def check_memory_limit(size: str, knob: str = "--memory-limit") -> str:
    """``size`` if DuckDB reads it as a memory size (``500MB``, ``4GB``, ``25%``), else a one-line error."""
    if not isinstance(size, str) or not re.fullmatch(r"\s*\d+(\.\d+)?\s*(%|[KMGT]i?B|B|bytes)\s*", size, re.I):
        raise KvorchError(f"{knob} {size!r} is not a memory size; pass e.g. 500MB, 4GB or 25% (of RAM)")
    refused = _duckdb_refuses_size(size)
    if refused:
        raise KvorchError(f"{knob} {size!r} is not a memory size ({refused}); pass e.g. 500MB, 4GB or 25% (of RAM)")
    return size


@functools.lru_cache(maxsize=32)
def _duckdb_refuses_size(size: str) -> str:
    """DuckDB's first line on ``SET memory_limit = size`` ("" when it takes it); a new connection
    costs ~20 ms, so each size is tried once."""
    con = duckdb.connect()
    try:
        con.execute(f"SET memory_limit = {quote(size)}")
    except duckdb.Error as exc:
        return _first_line(exc)
    finally:
        con.close()
    return ""


def check_read_only(sql: str) -> None:
    """A one-line KvorchError unless every statement of ``sql`` is a query (COPY, CREATE, INSERT,
    ATTACH, SET, INSTALL, ... and an EXPLAIN ANALYZE of one, which runs it, are refused before
    anything runs). A clearer message only: the sealed connection writes nothing either way."""
    for kind, text in _statements(sql):
        if kind not in READ_ONLY_STATEMENTS:
            raise _refused(kind, text)
        explained = _EXPLAINED.fullmatch(text) if kind == "EXPLAIN" else None
        if explained:
            for inner, _ in _statements(explained["rest"], quiet=True):
                if inner not in READ_ONLY_STATEMENTS:
                    raise _refused(inner, text, f"EXPLAIN runs its statement, and {inner}")


def _statements(sql: str, quiet: bool = False) -> list[tuple[str, str]]:
    """(statement type, text) of each statement of ``sql``; a statement DuckDB's Python package
    has no type name for (``UPDATE EXTENSIONS``) reads as OTHER, and a MULTI (a statement holding
    a data-driven PIVOT) as SELECT when it starts as a query, else as its first keyword."""
    try:
        return [(_kind(s.type.name, s.query.strip()), s.query.strip()) for s in duckdb.extract_statements(sql)]
    except duckdb.Error as exc:
        if quiet:
            return []
        raise KvorchError(f"query failed: {_first_line(exc)}") from None
    except ValueError:  # e.g. "29 is not a valid StatementType"
        return [] if quiet else [("OTHER", sql.strip())]


def _kind(kind: str, text: str) -> str:
    if kind != "MULTI":
        return kind
    first = _first_word(text)
    return "SELECT" if first in _QUERY_STARTS else first


def _first_word(text: str) -> str:
    """The statement's first keyword, upper case, after any comments."""
    text = re.sub(r"^(\s+|--[^\n]*\n?|/\*.*?\*/)*", "", text, flags=re.DOTALL)
    return text[:1] if text[:1] == "(" else (re.match(r"[A-Za-z_]*", text)[0] or "OTHER").upper()


def _refused(kind: str, text: str, what: str | None = None) -> KvorchError:
    return KvorchError(
        f"kvorch sql is read-only: {what or kind} statements are refused ({text[:60]!r}); "
        f"use SELECT queries over the views {VIEWS}"
    )


def connect_sealed(
    lake: Lake,
    audits: dict[str, RunAudit] | None = None,
    memory_limit: str = DEFAULT_MEMORY_LIMIT,
) -> duckdb.DuckDBPyConnection:
    """An in-memory DuckDB with the views of :func:`orchestrator.lake.queries.connect` (the same
    rows: only parts whose checksum verifies and whose task is done, hive partitions as columns,
    the macros of ``sql/_macros.sql``), sealed (:func:`seal`) so that it cannot open any file."""
    if not lake.run_ids() and not lake.exists("scores") and not lake.exists("heads"):
        raise no_runs(lake)
    audits = integrity.audit_lake(lake) if audits is None else audits
    parts = sorted(path for run in audits.values() for path in run.readable)
    files = {table: lake.table_files(table) for table in ("docs", "scores", "heads")}
    con = duckdb.connect()
    check_schema_versions(con, parts + files["docs"])
    _arrow_view(con, lake, "chunks", parts, CHUNK_SCHEMA, PARTITION_COLUMNS)
    _arrow_view(con, lake, "docs", files["docs"], DOC_SCHEMA, PARTITION_COLUMNS[:1])
    _arrow_view(con, lake, "scores", files["scores"], SCORES_SCHEMA, PARTITION_COLUMNS[:1])
    _arrow_view(con, lake, "heads", files["heads"], HEADS_SCHEMA, PARTITION_COLUMNS[:1])
    # spec.json and status.json: small, read now into memory (a run written later needs a reopen,
    # as for the parts).
    run_relations(con, lake, "TABLE")
    create_macros(con)
    create_views(con)
    seal(con, memory_limit)
    return con


def seal(con: duckdb.DuckDBPyConnection, memory_limit: str = DEFAULT_MEMORY_LIMIT) -> None:
    """From here on ``con`` opens no file: external access off with nothing allowed (no
    directory, no path: ``COPY ... TO`` anywhere is a permission error, and so is reading one),
    no temp directory (nothing spills; a query needing more than ``memory_limit`` fails), no
    extension installed or loaded, and ``lock_configuration`` so no statement can undo it."""
    con.execute("SET temp_directory = ''")
    con.execute(f"SET memory_limit = {quote(memory_limit)}")
    con.execute("SET autoinstall_known_extensions = false")
    con.execute("SET autoload_known_extensions = false")
    con.execute("SET enable_external_access = false")
    con.execute("SET lock_configuration = true")


def run(
    con: duckdb.DuckDBPyConnection,
    query: str,
    fetch: Callable[[duckdb.DuckDBPyConnection, str, Any], T],
    params: dict[str, Any] | Sequence[Any] | None = None,
    limits: Limits | None = None,
) -> T:
    """``fetch(con, query, params)`` under ``limits``: interrupted past ``limits.timeout_s``, and
    every DuckDB error as one line (the knob to raise, the views to read, or DuckDB's first line)."""
    limits = limits or Limits()
    deadline = _Deadline(con, limits.timeout_s)
    try:
        with deadline:
            return fetch(con, query, params)
    except duckdb.InterruptException:
        if not deadline.fired:
            raise
        raise KvorchError(
            f"query stopped after {limits.timeout_knob} {limits.timeout_s:g} s; narrow it "
            f"(a WHERE on run_id, fewer joins) or raise {limits.timeout_knob}"
        ) from None
    except duckdb.OutOfMemoryException as exc:
        raise KvorchError(
            f"query needs more memory than {limits.memory_knob} {limits.memory_limit} ({_first_line(exc)}); "
            f"aggregate before fetching, or raise {limits.memory_knob}"
        ) from None
    except duckdb.PermissionException as exc:
        raise KvorchError(f"kvorch sql reads only the views {VIEWS} and writes nothing: {_first_line(exc)}") from None
    except duckdb.Error as exc:
        raise KvorchError(f"query failed: {_first_line(exc)}") from None


def fetch_bounded(
    con: duckdb.DuckDBPyConnection, query: str, params: Any, limits: Limits
) -> tuple[list[str], list[tuple]] | None:
    """``query``'s columns and rows (None for a statement without a result), within the memory
    limit (:func:`fetch_table`)."""
    table = fetch_table(con, query, params, limits)
    if table is None:
        return None
    return table.column_names, [tuple(row.values()) for row in table.to_pylist()]


def fetch_table(con: duckdb.DuckDBPyConnection, query: str, params: Any, limits: Limits) -> pa.Table | None:
    """``query``'s result as Arrow (None for a statement without one), fetched in batches that
    together stay within the connection's memory limit: DuckDB's limit bounds what it holds, not
    the result handed to Python, which a ``SELECT repeat('x', 400000000)`` under 200 MB once grew
    to 2.9 GB while being converted and printed. A result over the limit is one line naming
    ``limits.memory_knob``; nothing of it is returned. ``kvorch sql`` and ``LakeReader.sql`` both
    fetch here."""
    budget = memory_bytes(con)
    relation = con.sql(query, params=params)
    if relation is None:
        return None
    reader = relation.to_arrow_reader(2048)
    batches, held = [], 0
    for batch in reader:
        held += batch.nbytes
        if held > budget:
            raise KvorchError(
                f"the query's result is larger than {limits.memory_knob} {limits.memory_limit}; aggregate it, "
                f"add a LIMIT, or raise {limits.memory_knob}"
            )
        batches.append(batch)
    return whole_decimals_as_ints(pa.Table.from_batches(batches, schema=reader.schema))


_UNITS = {"bytes": 1, "kib": 1 << 10, "mib": 1 << 20, "gib": 1 << 30, "tib": 1 << 40, "pib": 1 << 50}


def memory_bytes(con: duckdb.DuckDBPyConnection) -> int:
    """The connection's memory limit in bytes, as DuckDB states it (``190.7 MiB``)."""
    text = con.execute("SELECT current_setting('memory_limit')").fetchall()[0][0]
    number, unit = text.split()
    return int(float(number) * _UNITS[unit.lower()])


class _Deadline:
    """Interrupts ``con``'s query once ``seconds`` have passed, unless it ended first."""

    def __init__(self, con: duckdb.DuckDBPyConnection, seconds: float) -> None:
        self.con, self.seconds, self.fired = con, seconds, False
        self._lock = threading.Lock()
        self._running = False
        self._timer = threading.Timer(seconds, self._fire)
        self._timer.daemon = True

    def _fire(self) -> None:
        with self._lock:
            if self._running:
                self.fired = True
                self.con.interrupt()

    def __enter__(self) -> _Deadline:
        self._running = True
        self._timer.start()
        return self

    def __exit__(self, *exc: object) -> None:
        with self._lock:  # an interrupt after this point could hit the connection's next query
            self._running = False
        self._timer.cancel()


def _arrow_view(
    con: duckdb.DuckDBPyConnection,
    lake: Lake,
    name: str,
    files: list[str],
    schema: pa.Schema,
    partitions: Sequence[str],
) -> None:
    """View ``name``: ``files`` as one Arrow dataset in ``schema`` plus the hive partition columns
    (a column an older part lacks reads as null). Strings are read dictionary-encoded, as the
    Parquet files hold them, which DuckDB scans about twice as fast as plain Arrow strings; they
    read as VARCHAR all the same."""
    dictionary = pa.dictionary(pa.int32(), pa.string())
    strings = [f.name for f in schema if pa.types.is_string(f.type)]
    fields = [pa.field(f.name, dictionary, f.nullable) if f.name in strings else f for f in schema]
    keys = pa.schema([pa.field(key, dictionary) for key in partitions])
    # After the file's columns, in DuckDB's order for hive partitions (by name), as queries.connect has them.
    schema = pa.schema([*fields, *sorted(keys, key=lambda f: f.name)])
    if not files:
        con.register(name, schema.empty_table())
        return
    base = lake.path(name)
    values = {key: pa.array(sorted({_partition_value(p, base, key, partitions) for p in files})) for key in partitions}
    dataset = ds.dataset(
        files,
        schema=schema,
        format=ds.ParquetFileFormat(read_options=ds.ParquetReadOptions(dictionary_columns=strings)),
        filesystem=lake.fs,
        partitioning=ds.HivePartitioning(keys, dictionaries=values, segment_encoding="none"),
        partition_base_dir=base,
    )
    con.register(name, dataset)


def _partition_value(path: str, base: str, key: str, partitions: Sequence[str]) -> str:
    segment = path[len(base) + 1 :].split("/")[list(partitions).index(key)]
    return segment.split("=", 1)[1]


def _first_line(exc: BaseException) -> str:
    return (str(exc).splitlines() or [type(exc).__name__])[0]
