"""The report tables of a run: which ``sql/`` file each is, its parameters, and its rendering.

The CLI (``kvorch report``, ``kvorch submit``), the plots and the notebook API (``kvorch/``) read
tables through here, so a table's query and parameters are named in one place
(:meth:`RunReport.relation`); :meth:`RunReport.table` fetches it as rows, :meth:`RunReport.arrow`
as an Arrow table.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import duckdb
import pyarrow as pa

from orchestrator.errors import KvorchError
from orchestrator.lake import incomplete, integrity, run_status
from orchestrator.lake.queries import arrow_of, connect, latest_run, named_relation, no_runs, run_order
from orchestrator.lake.store import Lake, check_run_id
from orchestrator.reports.densities import DEFAULT_TARGETS, check_densities
from orchestrator.reports.formatting import fit, render

# Report table -> what it shows; each is sql/<name>.sql.
TABLES = {
    "compare": "per config: ppl, ΔNLL % vs baseline, accuracy, KL and top-1/top-5 agreement with baseline, "
    "three densities, effective context",
    "paired": "per config: per-document paired ΔNLL %, mean, stderr, 95 % t interval, wins/losses vs --reference; "
    "KL and top-1 agreement with their 95 % t intervals",
    "by_position": "per config and position bucket (0-512, 512-1k, 1k-2k, ...): NLL and ΔNLL %",
    "frontier": "per threshold sweep: ΔNLL % interpolated at each of --densities (compressible density)",
    "pareto": "every config as (compressible density, ΔNLL %), marked when on the Pareto frontier",
    "throughput": "token-configs/s per worker, per method, per device type",
    "head_ablation": "head_aware configs under the ablation's names: ppl, accuracy, effective context, vs B_128",
    "retrieval": "retrieval probes (--task): exact-match accuracy and answer NLL per config, length and depth",
    "answers": "question tasks: mean answer score per task, length and config, its paired difference from "
    "baseline with a 95 % interval, generated and prompt density",
    "head_budgets": "per config: the smallest, mean and largest share of a document's keys one (layer, kv-head) "
    "kept at its end (--allocation moves budgets between heads; --plot draws every head)",
    "traces": "long generations at --chunk-size 1: per config and trace-position bucket, ΔNLL %, KL and top-1 "
    "agreement with baseline, and the density held there",
}
# Report table -> the parameters its query takes besides $run_id (RunReport.relation fills them in).
TABLE_PARAMETERS = {"frontier": ("densities",), "paired": ("reference",)}


def table_parameters(name: str) -> tuple[str, ...]:
    """The parameters report table ``name`` takes besides the run; a KvorchError for a name not in TABLES."""
    if name not in TABLES:
        raise KvorchError(f"no report table {name!r}; tables: {', '.join(TABLES)}")
    return TABLE_PARAMETERS.get(name, ())


@dataclass(frozen=True)
class Table:
    name: str
    columns: list[str]
    rows: list[tuple]
    caption: str = ""  # what the numbers are relative to, where a parameter chose it (paired: --reference)

    def records(self) -> list[dict[str, Any]]:
        return [dict(zip(self.columns, row, strict=True)) for row in self.rows]


class RunReport:
    """One run of a lake, open for queries; validates the run and the report parameters once.

    A run with damaged parts or tasks not done is refused: its means would silently cover other
    documents than a complete run's (a truncated baseline part once turned +2.5 % into -30 %).
    ``allow_incomplete`` reports what it has, and :meth:`incomplete_mark` says so.
    """

    def __init__(
        self,
        lake: Lake,
        run_id: str | None = None,
        allow_incomplete: bool = False,
        con: duckdb.DuckDBPyConnection | None = None,
        audits: dict[str, integrity.RunAudit] | None = None,
    ) -> None:
        """``con`` and ``audits``: a connection already opened by ``connect(lake, audits)``, which
        several reports then share (the notebook API's one per open lake); by default, a new one."""
        self.lake = lake
        self._audits = integrity.audit_lake(lake) if audits is None else audits
        self.con = connect(lake, self._audits) if con is None else con
        # One line for stderr when the run shown is not the newest (the newest still runs).
        self.notice = ""
        self.run_id = check_run_id(run_id, "--run") if run_id is not None else latest_run(self.con)
        if self.run_id is None:  # a lake with only `kvorch scores` or `kvorch heads` output
            raise no_runs(lake)
        if self.run_id not in lake.run_ids():
            raise KvorchError(f"run {self.run_id!r} is not in lake {lake.uri}; runs there: {', '.join(lake.run_ids())}")
        self.audit = self._audit(self.run_id)
        if run_id is None and not allow_incomplete and self.running:
            self._show_newest_finished()
        if not self.audit.complete and not allow_incomplete:
            if self.running:
                raise KvorchError(
                    f"run {self.run_id} is still running ({self.progress()}); wait for it to finish (kvorch status "
                    "follows it), or pass --allow-incomplete to report what it has so far"
                )
            raise KvorchError(
                f"run {self.run_id} is incomplete: {self.audit.problem()}; {integrity.repair_hint(self.run_id)}, "
                "or pass --allow-incomplete to report what it has"
            )

    def _audit(self, run_id: str) -> integrity.RunAudit:
        return self._audits.get(run_id) or integrity.audit(self.lake, run_id)

    @property
    def running(self) -> bool:
        """Whether a live driver is still writing this run (its status.json says running and its
        driver lives): then a missing task is on its way, not lost, and no resume is needed."""
        return run_status.driver_alive(self.lake.read_status(self.run_id))

    def progress(self) -> str:
        """``N of M tasks done`` for this run, from its parts."""
        return f"{len(self.audit.done)} of {len(self.audit.planned)} tasks done"

    def _show_newest_finished(self) -> None:
        """The newest run still runs: show the newest complete run that does not, and say so;
        with none, say what to do."""
        newest, progress = self.run_id, self.progress()
        for candidate in reversed(run_order(self.con)[:-1]):
            if self._audit(candidate).complete and not run_status.driver_alive(self.lake.read_status(candidate)):
                self.run_id, self.audit = candidate, self._audit(candidate)
                self.notice = (
                    f"kvorch: run {newest} is still running ({progress}); this is the newest finished run, "
                    f"{candidate}; --run {newest} --allow-incomplete shows what {newest} has so far"
                )
                return
        raise KvorchError(
            f"run {newest} is still running ({progress}) and the lake has no finished run yet; wait for it "
            "(kvorch status follows it), or pass --allow-incomplete to report what it has so far"
        )

    def describe(self) -> str:
        """Which run this is, for stderr: ``run R (corpus pydoc, created ...)``; a plain
        ``kvorch report`` reads the newest run, which a probe run may have just become."""
        spec = self.lake.read_spec(self.run_id) or {}
        created = spec.get("created_at") or "unknown"
        return f"run {self.run_id} ({run_kind(spec)}, created {created})"

    def incomplete_mark(self) -> str:
        """One line for a report over an incomplete run ("" for a complete one)."""
        if self.audit.complete:
            return ""
        if self.running:
            return f"RUNNING RUN {self.run_id}: {self.progress()} so far; these numbers cover only those tasks"
        return (
            f"INCOMPLETE RUN {self.run_id}: {self.audit.problem()}; these numbers cover only its "
            f"{len(self.audit.done)} done task(s)"
        )

    def relation(
        self, name: str, densities: Sequence[float] = DEFAULT_TARGETS, reference: str = "baseline"
    ) -> duckdb.DuckDBPyRelation:
        """Report table ``name`` of this run, not yet fetched: ``sql/<name>.sql`` with ``$run_id`` and
        the parameters :data:`TABLE_PARAMETERS` names (a table ignores the others)."""
        wanted = table_parameters(name)
        params: dict[str, Any] = {"run_id": self.run_id}
        if "densities" in wanted:
            params["densities"] = list(check_densities(densities))
        if "reference" in wanted:
            params["reference"] = self.resolve_config(reference)
        return self._read(lambda: named_relation(self.con, name, params))

    def table(self, name: str, densities: Sequence[float] = DEFAULT_TARGETS, reference: str = "baseline") -> Table:
        """Report table ``name`` as Python rows (what the CLI renders)."""
        relation = self.relation(name, densities, reference)
        return Table(name, list(relation.columns), self._read(relation.fetchall), self.caption(name, reference))

    def caption(self, name: str, reference: str = "baseline") -> str:
        """One line naming what table ``name`` compares against ("" when only baseline can be):
        the paired table's wins and losses are against ``reference``, its differences against baseline."""
        if name != "paired":
            return ""
        return (
            f"paired: ΔNLL %, KL and top-1 agreement against baseline; wins, losses and ties against "
            f"{self.resolve_config(reference)} (--reference)"
        )

    def arrow(self, name: str, densities: Sequence[float] = DEFAULT_TARGETS, reference: str = "baseline") -> pa.Table:
        """Report table ``name`` as an Arrow table straight from DuckDB: the query and parameters of :meth:`table`."""
        relation = self.relation(name, densities, reference)
        return self._read(lambda: arrow_of(relation))

    def _read(self, step: Callable[[], Any]) -> Any:
        """``step()``, with a DuckDB error (while planning or while fetching) as a one-line KvorchError."""
        try:
            return step()
        except duckdb.Error as exc:
            raise KvorchError(
                f"cannot read run {self.run_id} from {self.lake.uri}: {str(exc).splitlines()[0]}"
            ) from None

    def incomplete_warnings(self) -> list[str]:
        """One line per config that failed on some documents (status.json): its means cover
        fewer documents than the others', so the tables alone would compare unlike with unlike."""
        return incomplete.warnings(self.run_id, incomplete.recorded(self.lake.read_status(self.run_id)))

    def probe_warnings(self) -> list[str]:
        """One line naming the retrieval probes the uncompressed baseline misses ([] when it
        answers all, or the run has no probes or no baseline): a probe the full cache cannot
        answer measures the probe set, not compression, and scores 0 for every config."""
        missed = self.con.execute(
            "SELECT doc_id, sum(answer_correct) = sum(answer_tokens) FROM chunks WHERE run_id = $run_id "
            "AND method = 'baseline' AND answer_tokens IS NOT NULL GROUP BY doc_id ORDER BY doc_id",
            {"run_id": self.run_id},
        ).fetchall()
        names = [doc_id for doc_id, answered in missed if not answered]
        if not names:
            return []
        shown = ", ".join(names[:5]) + (f" and {len(names) - 5} more" if len(names) > 5 else "")
        return [
            f"kvorch: warning: baseline misses {len(names)} of {len(missed)} probes ({shown}): with the full cache "
            "the model does not predict their answers (too hard for it, or the answer is not the text it writes "
            "right after the question), so they cannot show what compression costs (docs/probes.md#your-own-probes)"
        ]

    def resolve_config(self, name: str) -> str:
        """A config label of this run, given the label or a method name that has one config."""
        pairs = self.con.execute(
            "SELECT DISTINCT method, config FROM chunks WHERE run_id = $run_id ORDER BY config",
            {"run_id": self.run_id},
        ).fetchall()
        configs = [config for _, config in pairs]
        if name in configs:
            return name
        of_method = [config for method, config in pairs if method == name]
        if len(of_method) == 1:
            return of_method[0]
        if of_method:
            raise KvorchError(
                f"--reference {name!r} has {len(of_method)} configs in run {self.run_id}; name one: "
                f"{', '.join(of_method)}"
            )
        raise KvorchError(
            f"--reference {name!r} is not a config of run {self.run_id}; use one of: {', '.join(configs)}"
        )


def left_out(table: Table) -> str | None:
    """Why ``table`` has nothing to show for this run (one line, naming what would fill it), or
    None when it has content: ``--table all`` and index.html show only tables with content."""
    records = table.records()
    if table.name == "frontier":
        if records and all((r["sweep_points"] or 0) < 2 for r in records):
            return "frontier: each method has one threshold; pass --thresholds or --densities to kvorch submit to sweep"
        if records and all(r["delta_nll_pct"] is None for r in records):
            return "frontier: no sweep reaches any of --densities; pass densities inside the sweeps' range"
    if table.name == "head_ablation" and not any(r["name"] != "baseline_full_cache" for r in records):
        return "head_ablation: no head_aware configs in this run; run kvorch submit --preset head-ablation"
    if table.name == "retrieval" and not records:
        return "retrieval: not a probe run; run kvorch submit --task needle (or passkey, kv)"
    if table.name == "answers" and not records:
        return "answers: no question tasks in this run; run kvorch submit --task ruler (or a .jsonl with answers)"
    if table.name == "head_budgets" and not records:
        return "head_budgets: no per-head counts in this run (written since schema version 6, never for question tasks)"
    if table.name == "traces" and not records:
        return "traces: not read a token at a time; run kvorch submit --corpus traces.jsonl --chunk-size 1"
    if not records:
        return f"{table.name}: no rows in this run"
    return None


def run_kind(spec: dict) -> str:
    """What a run evaluated, from its spec.json: ``task needle`` for probes, else ``corpus NAME``."""
    if spec.get("task"):
        return f"task {spec['task']}"
    return f"corpus {spec.get('corpus') or 'unknown'}"


def render_tables(tables: Sequence[Table], fmt: str, width: int | None = None) -> str:
    """One table as :func:`render` prints it; several, each under its name. ``width``: a
    terminal table (``fmt`` table) keeps the columns that fit and says which it left out."""
    if fmt == "table" and width is not None:
        fitted = []
        for t in tables:
            columns, rows, note = fit(t.columns, t.rows, width)
            notes = "".join(f"\n{line}" for line in (note, t.caption) if line)
            fitted.append((t.name, render(columns, rows, fmt) + notes))
    else:
        captioned = fmt in ("table", "markdown")  # csv and json stay machine-readable
        fitted = [
            (t.name, render(t.columns, t.rows, fmt) + (f"\n\n{t.caption}" if captioned and t.caption else ""))
            for t in tables
        ]
    if len(tables) == 1:
        return fitted[0][1]
    if fmt == "json":
        return "{\n" + ",\n".join(f"{json.dumps(name)}: {text}" for name, text in fitted) + "\n}"
    heading = {"csv": "# {}", "markdown": "## {}", "table": "== {} =="}[fmt]
    return "\n\n".join(heading.format(name) + "\n" + text for name, text in fitted)
