"""The lake layout, atomic parts, and compare.sql against hand-computed values."""

from __future__ import annotations

import math

import duckdb
import pyarrow as pa
import pytest
from click.testing import CliRunner

from orchestrator.cli import main
from orchestrator.cli.report import comparison
from orchestrator.errors import KvorchError
from orchestrator.lake.queries import connect, run_named
from orchestrator.lake.store import Lake
from orchestrator.reports.formatting import render
from orchestrator.reports.tables import RunReport
from workers.contract.schema import ROW_SCHEMA, SCHEMA_VERSION, SCORES_SCHEMA


def row(doc, chunk, method, config, nll, n, correct, total, kept, in_window, protected, threshold=None):
    return {
        "doc_id": doc,
        "chunk_index": chunk,
        "chunk_start": chunk * 10,
        "chunk_end": chunk * 10 + 10,
        "config": config,
        "method_params": "{}",
        "threshold": threshold,
        "policy": "threshold",
        "window": 4,
        "n_sink": 0,
        "protected_window": 0,
        "nll_sum": nll,
        "n_tokens": n,
        "n_correct": correct,
        "keys_total": total,
        "keys_in_window": in_window,
        "keys_outside_window": total - in_window,
        "keys_kept": kept,
        "keys_discarded_outside_window": total - kept,
        "keys_protected": protected,
        "keys_kept_unprotected": kept - protected,
        "forward_seconds": 0.5,
        "batch_size": 2,
        "worker": "w",
        "device": "cpu",
        "method": method,
    }


@pytest.fixture
def lake(tmp_path) -> Lake:
    lake = Lake(str(tmp_path / "lake"))
    lake.write_spec("r1", {"model": "m"})
    rows = [
        row("a", 0, "baseline", "baseline", 10.0, 10, 5, 0, 0, 0, 0),
        row("a", 1, "baseline", "baseline", 20.0, 10, 4, 40, 40, 16, 16),
        row("a", 0, "knorm", "knorm@-2", 10.0, 10, 5, 0, 0, 0, 0, -2.0),
        row("a", 1, "knorm", "knorm@-2", 23.0, 10, 3, 40, 28, 16, 20, -2.0),
    ]
    lake.write_rows("r1", "t0", pa.Table.from_pylist(rows, schema=ROW_SCHEMA))
    return lake


def test_parts_are_partitioned_by_method_and_hide_temporaries(lake):
    con = connect(lake)
    # A crash mid-write leaves only a temporary name, which readers never match.
    stray = lake.part_path("r1", "knorm", "t9") + ".tmp-deadbeef"
    with open(stray, "wb") as fh:
        fh.write(b"PAR1 truncated")
    assert con.execute("SELECT method, count(*) FROM chunks GROUP BY 1 ORDER BY 1").fetchall() == [
        ("baseline", 2),
        ("knorm", 2),
    ]
    assert con.execute("SELECT DISTINCT run_id FROM chunks").fetchall() == [("r1",)]
    assert con.execute("SELECT model FROM runs").fetchall() == [("m",)]


def test_compare_matches_hand_computed_values(lake):
    result = run_named(connect(lake), "compare", {"run_id": "r1"})
    cols = [d[0] for d in result.description]
    got = {r[cols.index("config")]: dict(zip(cols, r)) for r in result.fetchall()}
    knorm = got["knorm@-2"]
    assert knorm["docs"] == 1 and knorm["tokens"] == 20 and knorm["threshold"] == -2.0
    assert knorm["ppl"] == pytest.approx(math.exp(33 / 20))
    assert knorm["delta_nll_pct"] == pytest.approx(100 * (33 - 30) / 30)
    assert knorm["accuracy"] == pytest.approx(8 / 20)
    assert knorm["density_with_window"] == pytest.approx(28 / 40)
    assert knorm["density_without_window"] == pytest.approx(1 - 12 / 24)
    assert knorm["density_compressible"] == pytest.approx(8 / 20)
    base = got["baseline"]
    assert base["delta_nll_pct"] == 0 and base["density_with_window"] == 1 and base["density_compressible"] == 1


def test_report_formats(lake):
    table = comparison(lake, None, "table").splitlines()
    assert table[0].split()[:3] == ["method", "config", "threshold"]
    assert any(line.startswith("knorm") for line in table)
    assert comparison(lake, "r1", "markdown").splitlines()[1].startswith("|--")
    assert comparison(lake, "r1", "csv").splitlines()[0].startswith("method,config,threshold,docs")
    with pytest.raises(KvorchError, match="not in lake"):
        comparison(lake, "r2", "table")


def test_render_json_keeps_infinities_readable():
    assert '"t": "-inf"' in render(["t"], [(float("-inf"),)], "json")


def test_empty_or_unwritable_lake_is_a_clear_error(tmp_path):
    with pytest.raises(KvorchError, match="has no runs"):
        connect(Lake(str(tmp_path / "empty")))
    blocker = tmp_path / "file"
    blocker.write_text("x")
    with pytest.raises(KvorchError, match="cannot write to lake"):
        Lake(str(blocker / "lake")).ensure_writable()


def test_arrow_is_the_same_table_with_whole_sums_as_int64(lake):
    report = RunReport(lake)
    for name in ("compare", "by_position", "throughput"):  # each has a sum of integers (HUGEINT in DuckDB)
        arrow = report.arrow(name)
        assert arrow.to_pylist() == report.table(name).records()
        assert not any(pa.types.is_decimal(t) for t in arrow.schema.types), arrow.schema
    assert report.arrow("compare").schema.field("tokens").type == pa.int64()


def test_a_lake_without_runs_is_a_clear_error_for_report(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    only_scores = Lake(str(tmp_path / "lake"))
    only_scores.write_table(only_scores.path("scores", "run_id=s", "scores.parquet"), SCORES_SCHEMA.empty_table())
    with pytest.raises(KvorchError, match="has no runs; run kvorch submit"):  # was a TypeError
        RunReport(only_scores)


def test_a_lake_without_runs_names_the_lakes_with_runs_nearby(tmp_path, monkeypatch):
    """A copied command's --lake ./lake, where the first run wrote ./kvorch-lake: the error names it."""
    monkeypatch.chdir(tmp_path)
    written = Lake(str(tmp_path / "kvorch-lake"))
    written.write_json(written.path("runs", "run_id=r1", "spec.json"), {"run_id": "r1"})
    written.write_json(written.path("runs", "run_id=r2", "spec.json"), {"run_id": "r2"})
    (tmp_path / "empty-dir" / "runs").mkdir(parents=True)  # no run in it: not named
    with pytest.raises(KvorchError) as raised:
        RunReport(Lake("./lake"))
    assert str(raised.value) == (
        "lake ./lake has no runs; lakes with runs nearby: ./kvorch-lake (2 runs); pass --lake ./kvorch-lake, "
        "or run kvorch submit --lake ./lake first"
    )
    result = CliRunner().invoke(main, ["status", "--lake", "./lake"])
    assert result.exit_code == 1 and "lakes with runs nearby: ./kvorch-lake (2 runs)" in result.output


@pytest.mark.parametrize("command", [["report"], ["status"], ["runs"], ["sql", "SELECT 1"], ["submit"]])
def test_a_file_or_an_empty_path_as_lake_is_one_line_that_never_advises_writing_there(tmp_path, monkeypatch, command):
    """Issue 28: --lake <a file> advised `kvorch submit --lake <that file>`; --lake '' printed
    "lake  has no runs" (and as a path, '' is the working directory)."""
    monkeypatch.chdir(tmp_path)
    (tmp_path / "notes.txt").write_text("not a lake")
    before = sorted(p.name for p in tmp_path.iterdir())
    extra = ["--methods", "baseline", "--no-progress"] if command == ["submit"] else []
    for lake, message in (
        ("notes.txt", "lake notes.txt is a file, not "),
        ("", "the lake path is empty (--lake ''); pass the directory kvorch submit writes to, e.g. --lake"),
    ):
        result = CliRunner().invoke(main, [command[0], "--lake", lake, *command[1:], *extra])
        assert result.exit_code == 1 and result.output.count("\n") == 1, result.output
        assert message in result.output and "--lake notes.txt" not in result.output, result.output
    assert sorted(p.name for p in tmp_path.iterdir()) == before
    assert (tmp_path / "notes.txt").read_text() == "not a lake"


def test_duckdb_sees_schema_version(lake):
    parts = lake.path("chunks", "*", "*", "*.parquet")
    meta = duckdb.sql(f"SELECT key, value FROM parquet_kv_metadata('{parts}')").fetchall()
    assert (b"kvorch_schema_version", str(SCHEMA_VERSION).encode()) in meta


def test_traces_table_buckets_trace_positions_against_hand_computed_values(tmp_path):
    """kvorch report --table traces: per config and bucket of trace positions, ΔNLL % on the same
    tokens, mean KL and top-1 agreement per token, and kept / total keys, as computed by hand."""
    lake = Lake(str(tmp_path / "lake"))
    lake.write_spec("r1", {"model": "m"})
    rows = []
    # One trace read a token at a time: positions 0, 300 (bucket 0-512) and 600, 900 (512-1k).
    for i, start in enumerate([0, 300, 600, 900]):
        for method, config, nll, kl, agree, kept in [
            ("baseline", "baseline", 1.0 + i, 0.0, 1, start),
            ("knorm", "knorm@r0.5", 1.5 + i, 0.1 * (i + 1), i % 2, start // 2),
        ]:
            r = row("t", i, method, config, nll, 1, 1, start, kept, 0, 0)
            r.update(chunk_start=start, chunk_end=start + 1, kl_sum=kl, top1_agree=agree)
            rows.append(r)
    lake.write_rows("r1", "t0", pa.Table.from_pylist(rows, schema=ROW_SCHEMA))
    table = RunReport(lake, "r1").table("traces")
    got = {(r["config"], r["bucket"]): r for r in table.records()}
    first, second = got[("knorm@r0.5", "0-512")], got[("knorm@r0.5", "512-1k")]
    assert (first["traces"], first["tokens"], second["tokens"]) == (1, 2, 2)
    assert first["delta_nll_pct"] == pytest.approx(100 * (1.5 + 2.5 - 3.0) / 3.0)
    assert second["delta_nll_pct"] == pytest.approx(100 * (3.5 + 4.5 - 7.0) / 7.0)
    assert (first["kl"], second["kl"]) == (pytest.approx(0.15), pytest.approx(0.35))
    assert (first["top1_agreement"], second["top1_agreement"]) == (0.5, 0.5)
    assert first["density"] == pytest.approx((0 + 150) / (0 + 300))
    assert second["density"] == pytest.approx((300 + 450) / (600 + 900))
    assert got[("baseline", "512-1k")]["delta_nll_pct"] == 0 and got[("baseline", "512-1k")]["density"] == 1
