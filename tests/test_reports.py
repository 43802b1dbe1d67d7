"""Report tables (sql/*.sql) on lakes with known rows, checked against hand or naive computations."""

from __future__ import annotations

import json
import math
import random
import statistics
import struct
from pathlib import Path

import numpy as np
import pyarrow as pa
import pytest
from click.testing import CliRunner

from orchestrator.cli import main
from orchestrator.errors import KvorchError
from orchestrator.lake.integrity import audit
from orchestrator.lake.queries import connect
from orchestrator.lake.store import Lake
from orchestrator.reports.densities import parse_densities
from orchestrator.reports.tables import RunReport
from tests.test_cli import snapshot
from workers.contract.schema import CHUNK_COLUMNS_BY_VERSION, CHUNK_SCHEMA, ROW_SCHEMA, SCHEMA_VERSION

HEADS = 4  # layers x kv-heads of the synthetic rows


def chunk_row(doc, start, config, nll, *, n=10, end=None, kept=None, protected=0, threshold=None, **extra):
    """A row for a chunk [start, end) whose queries saw `kept` of the start * HEADS earlier keys."""
    total = start * HEADS
    kept = total if kept is None else kept
    method = config.split("@")[0].split(":")[0]
    return {
        "doc_id": doc,
        "chunk_index": start // 10 if end is None else start,
        "chunk_start": start,
        "chunk_end": start + 10 if end is None else end,
        "config": config,
        "press": config.split("@")[0],  # as the engine writes it: the label without threshold or ratio
        "method_params": "{}",
        "threshold": threshold,
        "policy": "threshold",
        "window": 0,
        "n_sink": 0,
        "protected_window": 0,
        "nll_sum": nll,
        "n_tokens": n,
        "n_correct": 0,
        "keys_total": total,
        "keys_in_window": 0,
        "keys_outside_window": total,
        "keys_kept": kept,
        "keys_discarded_outside_window": total - kept,
        "keys_protected": protected,
        "keys_kept_unprotected": kept - protected,
        "forward_seconds": 1.0,
        "batch_size": 1,
        "worker": "w0",
        "device": "cpu",
        "method": method,
        **extra,
    }


def make_lake(path: Path, runs: dict[str, list[dict]], statuses: dict[str, dict] | None = None) -> Lake:
    lake = Lake(str(path))
    for run_id, rows in runs.items():
        lake.write_spec(run_id, {"model": f"model-{run_id}"})
        lake.write_rows(run_id, "t0", pa.Table.from_pylist(rows, schema=ROW_SCHEMA))
    for run_id, status in (statuses or {}).items():
        lake.write_status(run_id, status)
    return lake


def kvorch(*args: str):
    return CliRunner().invoke(main, list(args))


# --- compare: effective context -------------------------------------------------------------


def test_effective_context_is_mean_visible_keys_per_query(tmp_path):
    # Chunk [0, 10) sees nothing before it; chunk [10, 20) sees 28 of 40 earlier keys (7 per head).
    rows = [
        chunk_row("a", 0, "baseline", 10.0),
        chunk_row("a", 10, "baseline", 20.0),
        chunk_row("a", 0, "knorm@-2", 10.0, threshold=-2.0),
        chunk_row("a", 10, "knorm@-2", 22.0, kept=28, threshold=-2.0),
        chunk_row("a", 10, "knorm@-1", 25.0, kept=8, n=4, threshold=-1.0),  # last chunk: 4 targets
    ]
    lake = make_lake(tmp_path / "lake", {"r": rows})
    got = {r["config"]: r for r in RunReport(lake).table("compare").records()}

    def naive(chunks):  # (start, kept per head, targets): visible keys of every target's query
        seen = [kept + (i - s + 1) for s, kept, n in chunks for i in range(s, s + n)]
        return sum(seen) / len(seen)

    assert got["baseline"]["effective_context"] == pytest.approx(naive([(0, 0, 10), (10, 10, 10)]))
    assert got["knorm@-2"]["effective_context"] == pytest.approx(naive([(0, 0, 10), (10, 7, 10)]))
    assert got["knorm@-1"]["effective_context"] == pytest.approx(naive([(10, 2, 4)]))
    assert got["knorm@-1"]["delta_nll_pct"] == pytest.approx(100 * (25 - 20) / 20)  # only the chunk it has


# --- paired ----------------------------------------------------------------------------------


def three_doc_rows() -> list[dict]:
    base = {"a": 10.0, "b": 20.0, "c": 40.0}
    x = {"a": 11.0, "b": 21.0, "c": 46.0}  # +10 %, +5 %, +15 %
    y = {"a": 10.5, "b": 23.0, "c": 44.0}  # +5 %, +15 %, +10 %
    rows = []
    for config, nlls in (("baseline", base), ("knorm@-2", x), ("random@0.5", y)):
        threshold = None if config == "baseline" else float(config.split("@")[1])
        rows += [chunk_row(doc, 0, config, nll, threshold=threshold) for doc, nll in nlls.items()]
    return rows


def test_paired_mean_stderr_t_interval_and_wins(tmp_path):
    report = RunReport(make_lake(tmp_path / "lake", {"r": three_doc_rows()}))
    got = {r["config"]: r for r in report.table("paired", reference="knorm@-2").records()}
    x = got["knorm@-2"]
    stderr = statistics.stdev([10, 5, 15]) / math.sqrt(3)
    assert x["docs"] == 3 and x["mean_delta_nll_pct"] == pytest.approx(10)
    assert x["stderr"] == pytest.approx(stderr)
    assert x["ci95_low"] == pytest.approx(10 - 4.302653 * stderr, rel=1e-6)  # t(0.975, 2 df)
    assert x["ci95_high"] == pytest.approx(10 + 4.302653 * stderr, rel=1e-6)
    assert (x["wins"], x["losses"], x["ties"]) == (0, 0, 3)
    y = got["random@0.5"]
    assert (y["wins"], y["losses"], y["ties"]) == (2, 1, 0)  # a: 5 < 10, b: 15 > 5, c: 10 < 15
    assert (got["baseline"]["wins"], got["baseline"]["losses"]) == (3, 0)
    # A method with a single config may be named by its method name.
    by_method = {r["config"]: r for r in report.table("paired", reference="random").records()}
    assert (by_method["knorm@-2"]["wins"], by_method["knorm@-2"]["losses"]) == (1, 2)


def test_paired_interval_beyond_the_t_table(tmp_path):
    rng = random.Random(7)
    deltas = [rng.uniform(-5, 20) for _ in range(40)]
    rows = []
    for i, d in enumerate(deltas):
        rows.append(chunk_row(f"d{i:02d}", 0, "baseline", 50.0))
        rows.append(chunk_row(f"d{i:02d}", 0, "knorm@-2", 50.0 * (1 + d / 100), threshold=-2.0))
    got = {r["config"]: r for r in RunReport(make_lake(tmp_path / "lake", {"r": rows})).table("paired").records()}
    stderr = statistics.stdev(deltas) / math.sqrt(40)
    half = got["knorm@-2"]["ci95_high"] - got["knorm@-2"]["mean_delta_nll_pct"]
    assert got["knorm@-2"]["mean_delta_nll_pct"] == pytest.approx(statistics.mean(deltas))
    assert half / stderr == pytest.approx(2.0226909, abs=2e-4)  # t(0.975, 39 df)


def test_reference_must_name_one_config(tmp_path):
    rows = three_doc_rows() + [chunk_row("a", 0, "knorm@-1", 12.0, threshold=-1.0)]
    report = RunReport(make_lake(tmp_path / "lake", {"r": rows}))
    with pytest.raises(KvorchError, match="has 2 configs in run r; name one: knorm@-1, knorm@-2"):
        report.table("paired", reference="knorm")
    with pytest.raises(KvorchError, match="not a config of run r"):
        report.table("paired", reference="h2o")


# --- by_position -----------------------------------------------------------------------------


def test_nll_by_position_bucket(tmp_path):
    rng = random.Random(3)
    rows, naive = [], {}
    edges = [0, 512, 1024, 2048, 4096]
    for doc in ("a", "b"):
        for start in range(0, 4096, 256):
            base, comp = rng.uniform(100, 300), rng.uniform(100, 400)
            rows.append(chunk_row(doc, start, "baseline", base, n=256, end=start + 256))
            rows.append(chunk_row(doc, start, "h2o@1", comp, n=256, end=start + 256, threshold=1.0))
            bucket = max(i for i, edge in enumerate(edges[:-1]) if start >= edge)
            sums = naive.setdefault(bucket, [0.0, 0.0, 0])
            sums[0] += base
            sums[1] += comp
            sums[2] += 256
    table = RunReport(make_lake(tmp_path / "lake", {"r": rows})).table("by_position")
    h2o = [r for r in table.records() if r["config"] == "h2o@1"]
    assert [r["bucket"] for r in h2o] == ["0-512", "512-1k", "1k-2k", "2k-4k"]
    assert [(r["bucket_start"], r["bucket_end"]) for r in h2o] == list(zip(edges[:-1], edges[1:], strict=True))
    for i, r in enumerate(h2o):
        base, comp, n = naive[i]
        assert r["tokens"] == n
        assert r["nll"] == pytest.approx(comp / n)
        assert r["delta_nll_pct"] == pytest.approx(100 * (comp - base) / base)


# --- frontier and pareto ---------------------------------------------------------------------

# (config, density_compressible, ΔNLL %): sweeps of two presses, a dominated fixed method, baseline.
SWEEPS = [
    ("knorm@-3", 0.05, 30.0),
    ("knorm@-2", 0.20, 12.0),
    ("knorm@-1", 0.60, 4.0),
    ("h2o@2", 0.30, 5.0),
    ("h2o@1", 0.50, 3.0),
    ("streaming_llm", 0.40, 8.0),
    ("baseline", 1.0, 0.0),
]


def sweep_rows() -> list[dict]:
    rows = []
    for config, density, delta in SWEEPS:
        threshold = float(config.split("@")[1]) if "@" in config else None
        # 20 protected keys + 100 compressible ones, `density` of them kept.
        rows.append(
            chunk_row(
                "a",
                30,
                config,
                100.0 * (1 + delta / 100),
                kept=20 + round(100 * density),
                protected=20,
                threshold=threshold,
            )
        )
    return rows


@pytest.fixture
def sweep_lake(tmp_path) -> Lake:
    return make_lake(tmp_path / "lake", {"r": sweep_rows()})


def test_frontier_interpolates_within_each_sweep_and_never_extrapolates(sweep_lake):
    targets = [0.1, 0.2, 0.25, 0.5, 0.7]
    table = RunReport(sweep_lake).table("frontier", densities=targets)
    got = {(r["press"], r["density"]): r for r in table.records()}
    assert {press for press, _ in got} == {"knorm", "h2o"}  # only thresholded sweeps
    for press in ("knorm", "h2o"):
        xs = [d for c, d, _ in SWEEPS if c.startswith(press + "@")]
        ys = [v for c, d, v in SWEEPS if c.startswith(press + "@")]
        order = np.argsort(xs)
        for target in targets:
            row = got[(press, target)]
            if min(xs) <= target <= max(xs):
                expected = float(np.interp(target, np.array(xs)[order], np.array(ys)[order]))
                assert row["delta_nll_pct"] == pytest.approx(expected), (press, target)
                assert row["status"] == ("measured" if target in xs else "interpolated")
            else:
                assert row["delta_nll_pct"] is None and row["status"] == "out of range", (press, target)
    assert got[("knorm", 0.1)]["delta_nll_pct"] == pytest.approx(24.0)  # 30 + (12 - 30) * 0.05 / 0.15
    assert (got[("knorm", 0.1)]["lower_density"], got[("knorm", 0.1)]["upper_density"]) == (0.05, 0.2)
    best = {r["density"]: r["press"] for r in table.records() if r["best"]}
    assert best == {0.1: "knorm", 0.2: "knorm", 0.25: "knorm", 0.5: "h2o"}  # at 0.5: h2o 3 < knorm 6


def test_pareto_frontier_marks_undominated_configs(sweep_lake):
    got = {r["config"]: r["on_frontier"] for r in RunReport(sweep_lake).table("pareto").records()}
    # streaming_llm (0.4, 8) is beaten by h2o@2 (0.3, 5); knorm@-1 (0.6, 4) by h2o@1 (0.5, 3).
    assert got == {c: c not in ("streaming_llm", "knorm@-1") for c, _, _ in SWEEPS}


# --- throughput -------------------------------------------------------------------------------


def test_throughput_charges_each_config_its_share_of_a_batched_forward(tmp_path):
    rows = [
        # w0: one batched forward of 2 configs per chunk, 1.0 s each.
        *(chunk_row("a", s, c, 1.0, worker="w0", batch_size=2, forward_seconds=1.0) for s in (0, 10) for c in "xy"),
        # w1: one config alone, 0.25 s per chunk.
        *(chunk_row("b", s, "x", 1.0, worker="w1", batch_size=1, forward_seconds=0.25) for s in (0, 10)),
    ]
    workers = [
        {"worker": "w0", "device": "cuda:0", "device_name": "GPU-A", "compile_seconds": 30.0},
        {"worker": "w1", "device_name": "GPU-B"},  # recorded before compile seconds were
    ]
    lake = make_lake(tmp_path / "lake", {"r": rows}, {"r": {"status": "finished", "rows": 6, "workers": workers}})
    got = {
        (r["per"], r["worker"] or r["method"] or r["device_name"]): r
        for r in RunReport(lake).table("throughput").records()
    }
    assert got[("worker", "w0")]["token_configs_per_s"] == pytest.approx(40 / 2.0)
    assert got[("worker", "w0")]["device_name"] == "GPU-A"
    assert got[("worker", "w1")]["token_configs_per_s"] == pytest.approx(20 / 0.5)
    assert got[("method", "x")]["token_configs_per_s"] == pytest.approx((20 + 20) / (1.0 + 0.5))
    assert got[("method", "y")]["seconds"] == pytest.approx(1.0)
    assert got[("device", "GPU-B")]["rows"] == 2
    assert got[("worker", "w0")]["peak_kv_mib"] is None  # rows without kv_cache_bytes
    # Compile time stays out of the forward seconds: per worker as recorded, once per worker per
    # device however many rows it wrote, and not split over methods.
    assert got[("worker", "w0")]["compile_seconds"] == 30.0 and got[("worker", "w0")]["seconds"] == 2.0
    assert got[("device", "GPU-A")]["compile_seconds"] == 30.0
    assert got[("worker", "w1")]["compile_seconds"] is None and got[("method", "x")]["compile_seconds"] is None


def test_throughput_reports_the_peak_kv_memory(tmp_path):
    mib = 2**20
    rows = [chunk_row("a", s, c, 1.0, kv_cache_bytes=(s + 10) * mib) for s in (0, 10) for c in "xy"]
    rows.append(chunk_row("a", 20, "x", 1.0, kv_cache_bytes=5 * mib))
    got = {
        (r["per"], r["method"]): r for r in RunReport(make_lake(tmp_path, {"r": rows})).table("throughput").records()
    }
    assert got[("method", "x")]["peak_kv_mib"] == 20
    assert got[("method", "y")]["peak_kv_mib"] == 20


# --- runs --------------------------------------------------------------------------------------


def test_runs_lists_and_compares(tmp_path):
    first = [chunk_row("a", 0, "baseline", 10.0), chunk_row("a", 0, "knorm@-2", 12.0, threshold=-2.0)]
    second = [chunk_row("a", 0, "baseline", 10.0), chunk_row("a", 0, "knorm@-2", 11.0, threshold=-2.0)]
    second.append(chunk_row("a", 0, "h2o@1", 13.0, threshold=1.0))
    lake = make_lake(tmp_path / "lake", {"one": first, "two": second}, {"one": {"status": "finished"}})
    listed = json.loads(kvorch("runs", "--lake", lake.uri, "--format", "json").stdout)
    assert [(r["run_id"], r["model"], r["methods"], r["configs"], r["status"]) for r in listed] == [
        ("one", "model-one", "baseline,knorm", 2, "finished"),
        ("two", "model-two", "baseline,h2o,knorm", 3, "running or killed"),
    ]
    diff = {
        r["config"]: r
        for r in json.loads(kvorch("runs", "--lake", lake.uri, "--compare", "one", "two", "--format", "json").stdout)
    }
    assert diff["knorm@-2"]["delta_nll_pct_diff"] == pytest.approx(10 - 20)
    assert diff["knorm@-2"]["ppl_diff"] == pytest.approx(math.exp(1.1) - math.exp(1.2))
    assert diff["h2o@1"]["ppl_a"] is None and diff["h2o@1"]["delta_nll_pct_b"] == pytest.approx(30)
    bad = kvorch("runs", "--lake", lake.uri, "--compare", "one", "three")
    assert bad.exit_code == 1 and bad.output.startswith("Error: run 'three' is not in lake")


# --- schema versions ---------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("version", "message"),
    [
        (str(SCHEMA_VERSION + 1), "newer than this kvorch reads"),
        ("0", "no longer reads"),
        (None, "no kvorch schema version"),
    ],
)
def test_parts_of_another_schema_version_fail_clearly(tmp_path, version, message):
    lake = make_lake(tmp_path / "lake", {"r": three_doc_rows()})
    metadata = {} if version is None else {"kvorch_schema_version": version}
    table = pa.Table.from_pylist(three_doc_rows()[:1], schema=ROW_SCHEMA).drop_columns(["method"])
    foreign = table.cast(CHUNK_SCHEMA.with_metadata(metadata) if metadata else CHUNK_SCHEMA.remove_metadata())
    lake.write_table(lake.part_path("r", "baseline", "old"), foreign)  # committed, checksum and all
    before = snapshot(tmp_path / "lake")
    with pytest.raises(KvorchError, match=message):
        connect(lake)
    result = kvorch("report", "--lake", lake.uri)
    assert result.exit_code == 1 and len(result.output.strip().splitlines()) == 1 and message in result.output
    assert snapshot(tmp_path / "lake") == before


def test_parts_of_schema_version_1_are_still_read(tmp_path):
    """A lake written before kv_cache_bytes existed: its parts stay valid (resume keeps them),
    and the column reads as null, alone or next to version-2 parts of another run."""
    lake = make_lake(tmp_path / "lake", {"new": [chunk_row("a", 0, "baseline", 1.0, kv_cache_bytes=64)]})
    old = pa.Table.from_pylist(three_doc_rows(), schema=ROW_SCHEMA).select(CHUNK_COLUMNS_BY_VERSION[1].names)
    lake.write_spec("old", {"model": "m"})
    lake.write_table(
        lake.part_path("old", "baseline", "t0"), old.replace_schema_metadata({"kvorch_schema_version": "1"})
    )
    found = audit(lake, "old")
    assert (found.sound, found.damaged) == ({("t0", "baseline"): len(old)}, {})
    assert RunReport(lake, "old").table("compare").records()
    con = connect(lake)
    by_run = dict(con.execute("SELECT run_id, max(kv_cache_bytes) FROM chunks GROUP BY run_id").fetchall())
    assert by_run == {"old": None, "new": 64}
    lake.delete(lake.parts("new"))
    assert connect(lake).execute("SELECT count(*), max(kv_cache_bytes) FROM chunks").fetchone() == (len(old), None)


def test_press_is_read_from_its_column_and_derived_from_the_label_only_for_older_parts(tmp_path):
    new = [chunk_row("a", 0, "knorm@-2", 1.0, threshold=-2.0, press="the column, not the label")]
    lake = make_lake(tmp_path / "lake", {"new": new})
    v2 = pa.Table.from_pylist([chunk_row("a", 0, "knorm:k=1@-2", 1.0, threshold=-2.0)], schema=ROW_SCHEMA)
    lake.write_spec("v2", {"model": "m"})
    lake.write_table(
        lake.part_path("v2", "knorm", "t0"),
        v2.select(CHUNK_COLUMNS_BY_VERSION[2].names).replace_schema_metadata({"kvorch_schema_version": "2"}),
    )
    con = connect(lake)
    assert con.execute("SELECT press FROM config_metrics('new')").fetchall() == [("the column, not the label",)]
    assert con.execute("SELECT press FROM config_metrics('v2')").fetchall() == [("knorm:k=1",)]


# --- the report command and its plots -----------------------------------------------------------


def png_size(path: Path) -> tuple[int, int]:
    data = path.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n"
    return struct.unpack(">II", data[16:24])


def test_report_plots_are_real_pngs_and_an_html_page(sweep_lake, tmp_path):
    plots = tmp_path / "plots"
    result = kvorch("report", "--lake", sweep_lake.uri, "--plot", str(plots))
    assert result.exit_code == 0, result.output
    for name in ("frontier.png", "by_position.png"):
        width, height = png_size(plots / name)
        assert width >= 800 and height >= 500
        assert (plots / name).stat().st_size > 15_000  # axes, labels, lines: not a blank canvas
    page = (plots / "index.html").read_text()
    assert 'src="frontier.png"' in page and 'src="by_position.png"' in page and "h2o@1" in page


def test_report_table_selection_and_bad_input(sweep_lake):
    frontier = kvorch("report", "--lake", sweep_lake.uri, "--densities", "0.5", "--format", "json")
    tables = json.loads(frontier.stdout)
    assert set(tables) == {"compare", "frontier"} and [r["density"] for r in tables["frontier"]] == [0.5, 0.5]
    every = json.loads(kvorch("report", "--lake", sweep_lake.uri, "--table", "all", "--format", "json").stdout)
    assert list(every) == ["compare", "paired", "by_position", "frontier", "pareto", "throughput"]  # with content
    asked = json.loads(kvorch("report", "--lake", sweep_lake.uri, "--table", "retrieval", "--format", "json").stdout)
    assert asked == []  # a table asked for by name is printed, empty or not
    markdown = kvorch(
        "report", "--lake", sweep_lake.uri, "--table", "pareto", "--table", "paired", "--format", "markdown"
    )
    assert "## pareto" in markdown.stdout and "## paired" in markdown.stdout
    for args, fragment in [
        (["--densities", "0.1,2"], "outside (0, 1]"),
        (["--densities", "half"], "is not a number"),
        (["--table", "paired", "--reference", "nope"], "not a config of run r"),
        (["--run", "missing"], "not in lake"),
    ]:
        result = kvorch("report", "--lake", sweep_lake.uri, *args)
        lines = result.output.strip().splitlines()
        assert result.exit_code == 1 and len(lines) == 1 and fragment in lines[0], (args, result.output)


def test_parse_densities():
    assert parse_densities("0.5, 0.1,0.25,0.1") == (0.1, 0.25, 0.5)
    with pytest.raises(KvorchError, match="is empty"):
        parse_densities(" , ")
    with pytest.raises(KvorchError, match="outside"):
        parse_densities("0")
