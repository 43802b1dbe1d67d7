"""The notebook API: :func:`open_lake` and the :class:`LakeReader` it returns.

A thin layer over what the CLI runs: every report table is :class:`RunReport`'s (``kvorch report
--table NAME``: the same query, parameters and refusals), fetched as Arrow straight from DuckDB
(:meth:`RunReport.arrow`); :meth:`LakeReader.sql` is ``kvorch sql`` (``check_read_only``, then the
sealed connection of ``orchestrator/lake/readonly.py``, which opens no file, under the same limits).
Imports orchestrator.reports, orchestrator.lake and orchestrator.errors only, so no torch,
transformers or Ray (``tests/test_layering.py``).
"""

from __future__ import annotations

import os
import sys
import warnings
from collections.abc import Sequence
from typing import Any

import duckdb
import pyarrow as pa

from orchestrator.errors import KvorchError
from orchestrator.lake import integrity, readonly
from orchestrator.lake.queries import connect, nearby_hint, no_runs, run_order
from orchestrator.lake.store import Lake
from orchestrator.reports.densities import DEFAULT_TARGETS
from orchestrator.reports.tables import RunReport, table_parameters


def open_lake(path: str | os.PathLike[str], allow_incomplete: bool = False) -> LakeReader:
    """Open the local result lake at ``path`` (the ``--lake`` of ``kvorch submit``) for reading.

    The lake is read as it is now: parts written later (a run still going) show after opening it
    again. A run with damaged parts or unfinished tasks is refused, as ``kvorch report`` refuses
    it, unless ``allow_incomplete`` (``--allow-incomplete``): then its tables cover only its done
    tasks and each read warns so. A missing lake, or one without runs, is a one-line KvorchError.
    """
    return LakeReader(path, allow_incomplete)


class LakeReader:
    """A result lake open for reading; every table comes back as a ``pyarrow.Table``
    (``.to_pandas()`` with pandas installed, ``polars.from_arrow(...)``, ...).

    ``run=None`` means the newest run (``runs[-1]``), as in the CLI. Close it with :meth:`close`,
    or use it as a context manager.
    """

    def __init__(self, path: str | os.PathLike[str], allow_incomplete: bool = False) -> None:
        self._lake = Lake(os.fspath(path))
        self.uri = self._lake.uri
        if not self._lake.exists():
            hint = nearby_hint(self._lake, "kvorch.open_lake({!r})")
            hint = hint or "pass the directory kvorch submit --lake wrote to"
            raise KvorchError(f"no lake at {self.uri}; {hint}")
        self.allow_incomplete = allow_incomplete
        self._audits = integrity.audit_lake(self._lake)
        self._con: duckdb.DuckDBPyConnection | None = connect(self._lake, self._audits)
        # User SQL runs on a sealed connection (no file access at all), opened on first use and
        # again when another memory_limit is asked for (a sealed connection's settings are locked).
        self._sealed: tuple[str, duckdb.DuckDBPyConnection] | None = None
        self._runs = run_order(self._con)

    @property
    def runs(self) -> list[str]:
        """The lake's run ids, oldest first (by creation time): the last is what ``run=None`` reads."""
        return list(self._runs)

    # --- report tables: thin wrappers over table() -----------------------------------------

    def compare(self, run: str | None = None) -> pa.Table:
        """Per config: ppl, ΔNLL % vs baseline, accuracy, the three densities, effective context."""
        return self.table("compare", run)

    def paired(self, run: str | None = None, reference: str = "baseline") -> pa.Table:
        """Per config: per-document paired ΔNLL %, mean, stderr, 95 % t interval, wins/losses vs
        ``reference`` (a config label, or a method with one config)."""
        return self.table("paired", run, reference=reference)

    def frontier(self, run: str | None = None, densities: Sequence[float] = DEFAULT_TARGETS) -> pa.Table:
        """Per threshold sweep: ΔNLL % interpolated at each compressible density of ``densities``."""
        return self.table("frontier", run, densities=densities)

    def by_position(self, run: str | None = None) -> pa.Table:
        """Per config and position bucket (0-512, 512-1k, 1k-2k, ...): NLL and ΔNLL %."""
        return self.table("by_position", run)

    def retrieval(self, run: str | None = None, **params: Any) -> pa.Table:
        """The retrieval-probe table (``sql/retrieval.sql``)."""
        return self.table("retrieval", run, **params)

    def table(self, name: str, run: str | None = None, **params: Any) -> pa.Table:
        """Report table ``name`` (any of ``kvorch report --table``) of ``run``, with the parameters
        that table takes (``densities`` for frontier, ``reference`` for paired)."""
        takes = table_parameters(name)
        unknown = sorted(set(params) - set(takes))
        if unknown:
            raise KvorchError(
                f"table {name!r} takes {', '.join(takes) or 'no parameters'} besides run, not {', '.join(unknown)}"
            )
        # No run named: RunReport picks the newest (of the runs the lake had when opened), or the
        # newest finished one while that one still runs, and says so in report.notice.
        chosen = self._run(run) if run is not None or not self._runs else None
        report = RunReport(self._lake, chosen, self.allow_incomplete, self._connection(), self._audits)
        for line in filter(None, [report.notice, report.incomplete_mark(), *report.incomplete_warnings()]):
            _warn(line.removeprefix("kvorch: warning: ").removeprefix("kvorch: "))
        return report.arrow(name, **params)

    # --- SQL ---------------------------------------------------------------------------------

    def sql(
        self,
        query: str,
        params: dict[str, Any] | Sequence[Any] | None = None,
        timeout: float = readonly.DEFAULT_TIMEOUT_S,
        memory_limit: str = readonly.DEFAULT_MEMORY_LIMIT,
    ) -> pa.Table:
        """Run ``query`` (read-only DuckDB SQL) over the views ``kvorch sql`` has: chunks, docs, answers, runs,
        statuses, workers, scores, heads, and the macros of sql/_macros.sql. ``params`` fills
        ``$name`` (a dict) or ``?`` (a sequence) placeholders. Statements other than queries are
        refused with a KvorchError, and the connection is sealed: it opens no file, so no query
        reads outside the views or writes anything. ``timeout`` (seconds) interrupts the query and
        ``memory_limit`` (``"500MB"``, ``"4GB"``, ``"25%"``) bounds DuckDB's memory; past either it
        is a KvorchError naming the knob, as ``kvorch sql --timeout / --memory-limit``."""
        limits = readonly.Limits(timeout, memory_limit, "timeout=", "memory_limit=")
        readonly.check_read_only(query)
        con = self._sealed_connection(memory_limit)
        for line in integrity.left_out(self._audits):
            _warn(line)
        table = readonly.run(con, query, lambda c, q, p: readonly.fetch_table(c, q, p, limits), params, limits)
        return pa.table({}) if table is None else table

    def _sealed_connection(self, memory_limit: str) -> duckdb.DuckDBPyConnection:
        self._connection()  # closed: the one-line error
        if self._sealed is None or self._sealed[0] != memory_limit:
            if self._sealed is not None:
                self._sealed[1].close()
            self._sealed = (memory_limit, readonly.connect_sealed(self._lake, self._audits, memory_limit))
        return self._sealed[1]

    # --- lifetime ------------------------------------------------------------------------------

    def close(self) -> None:
        """Close the DuckDB connection; later calls raise a KvorchError. Closing twice is fine."""
        if self._con is not None:
            self._con.close()
            self._con = None
        if self._sealed is not None:
            self._sealed[1].close()
            self._sealed = None

    def __enter__(self) -> LakeReader:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __repr__(self) -> str:
        state = "closed" if self._con is None else f"{len(self._runs)} run(s)"
        return f"<kvorch lake {self.uri}: {state}>"

    def _connection(self) -> duckdb.DuckDBPyConnection:
        if self._con is None:
            raise KvorchError(f"lake {self.uri} is closed; open it again with kvorch.open_lake({self.uri!r})")
        return self._con

    def _run(self, run: str | None) -> str:
        """``run``, or the newest run, among those the lake had when opened: a run written since
        has parts the open views do not hold, so its tables would silently miss rows."""
        if run is None:
            if not self._runs:
                raise no_runs(self._lake)
            return self._runs[-1]
        if run not in self._runs and run in self._lake.run_ids():
            raise KvorchError(
                f"run {run!r} was written to lake {self.uri} after it was opened; open it again to read that run"
            )
        return run  # RunReport refuses a run that is not in the lake


def _warn(message: str) -> None:
    """Warn at the caller's line outside this module (a notebook cell), however the API got here."""
    level, frame = 2, sys._getframe(1)
    while frame is not None and frame.f_code.co_filename == __file__:
        level, frame = level + 1, frame.f_back
    warnings.warn(message, stacklevel=level)
