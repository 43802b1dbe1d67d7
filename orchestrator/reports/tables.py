"""The report tables of a run: which ``sql/`` file each is, its parameters, and its rendering.

The CLI (``kvorch report``, ``kvorch submit``) and the plots read tables through here, so a
table's query and parameters are named in one place.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import duckdb

from orchestrator.errors import KvorchError
from orchestrator.lake import incomplete, integrity
from orchestrator.lake.queries import connect, latest_run, run_named
from orchestrator.lake.store import Lake, check_run_id
from orchestrator.reports.densities import DEFAULT_DENSITIES, parse_densities
from orchestrator.reports.formatting import render

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
}


@dataclass(frozen=True)
class Table:
    name: str
    columns: list[str]
    rows: list[tuple]

    def records(self) -> list[dict[str, Any]]:
        return [dict(zip(self.columns, row, strict=True)) for row in self.rows]


class RunReport:
    """One run of a lake, open for queries; validates the run and the report parameters once.

    A run with damaged parts or tasks not done is refused: its means would silently cover other
    documents than a complete run's (a truncated baseline part once turned +2.5 % into -30 %).
    ``allow_incomplete`` reports what it has, and :meth:`incomplete_mark` says so.
    """

    def __init__(self, lake: Lake, run_id: str | None = None, allow_incomplete: bool = False) -> None:
        self.lake = lake
        audits = integrity.audit_lake(lake)
        self.con = connect(lake, audits)
        self.run_id = check_run_id(run_id, "--run") if run_id is not None else latest_run(self.con)
        if self.run_id not in lake.run_ids():
            raise KvorchError(f"run {self.run_id!r} is not in lake {lake.uri}; runs there: {', '.join(lake.run_ids())}")
        self.audit = audits.get(self.run_id) or integrity.audit(lake, self.run_id)
        if not self.audit.complete and not allow_incomplete:
            raise KvorchError(
                f"run {self.run_id} is incomplete: {self.audit.problem()}; {integrity.repair_hint(self.run_id)}, "
                "or pass --allow-incomplete to report what it has"
            )

    def incomplete_mark(self) -> str:
        """One line for a report over an incomplete run ("" for a complete one)."""
        if self.audit.complete:
            return ""
        return (
            f"INCOMPLETE RUN {self.run_id}: {self.audit.problem()}; these numbers cover only its "
            f"{len(self.audit.done)} done task(s)"
        )

    def table(
        self, name: str, densities: Sequence[float] = parse_densities(DEFAULT_DENSITIES), reference: str = "baseline"
    ) -> Table:
        params: dict[str, Any] = {"run_id": self.run_id}
        if name == "frontier":
            params["densities"] = list(densities)
        if name == "paired":
            params["reference"] = self.resolve_config(reference)
        try:
            result = run_named(self.con, name, params)
        except duckdb.Error as exc:
            raise KvorchError(
                f"cannot read run {self.run_id} from {self.lake.uri}: {str(exc).splitlines()[0]}"
            ) from None
        return Table(name, [d[0] for d in result.description], result.fetchall())

    def incomplete_warnings(self) -> list[str]:
        """One line per config that failed on some documents (status.json): its means cover
        fewer documents than the others', so the tables alone would compare unlike with unlike."""
        return incomplete.warnings(self.run_id, incomplete.recorded(self.lake.read_status(self.run_id)))

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


def render_tables(tables: Sequence[Table], fmt: str) -> str:
    """One table as :func:`render` prints it; several, each under its name."""
    if len(tables) == 1:
        return render(tables[0].columns, tables[0].rows, fmt)
    if fmt == "json":
        return "{\n" + ",\n".join(f"{json.dumps(t.name)}: {render(t.columns, t.rows, 'json')}" for t in tables) + "\n}"
    heading = {"csv": "# {}", "markdown": "## {}", "table": "== {} =="}[fmt]
    return "\n\n".join(heading.format(t.name) + "\n" + render(t.columns, t.rows, fmt) for t in tables)
