"""Reports that agreed with themselves (issue 39, point 7): index.html's paired table is the
terminal's (--reference honoured and named), the compare table is sorted by the density to
compare on, ``runs --compare`` fits 120 columns, KL and agreement intervals stay where a KL and
an agreement can be, heatmaps carry a colour bar, and your own probes are named on theirs."""

from __future__ import annotations

import html
import math
import re

import matplotlib
import pyarrow as pa
import pytest
import torch
from click.testing import CliRunner

from orchestrator.cli import main
from orchestrator.errors import KvorchError
from orchestrator.lake.store import Lake
from orchestrator.reports.plots import plot_figures
from orchestrator.reports.tables import RunReport, Table
from orchestrator.scores import draw_heatmaps
from tests.test_lake_and_report import row
from workers.contract.plan import DocumentScores
from workers.contract.schema import ROW_SCHEMA

matplotlib.use("Agg")

# Per document: (nll, kept, protected, kl_sum, top1_agree) of each config's second chunk (10
# tokens, 40 keys before it, 16 of them in the window). knorm@-2 and h2o@1 are ordered one way by
# density_with_window (kept / 40) and the other by density_compressible (kept outside protection).
CONFIGS = {
    "baseline": ("baseline", None, {"a": (20.0, 40, 16, 0.0, 10), "b": (30.0, 40, 16, 0.0, 10)}),
    "knorm@-2": ("knorm", -2.0, {"a": (23.0, 24, 16, 0.2, 8), "b": (30.2, 24, 16, 0.01, 10)}),
    "h2o@1": ("h2o", 1.0, {"a": (21.0, 30, 28, 0.1, 9), "b": (30.5, 30, 28, 0.3, 9)}),
}


@pytest.fixture
def lake(tmp_path) -> Lake:
    lake = Lake(str(tmp_path / "lake"))
    for run_id in ("r1", "r2"):
        lake.write_spec(run_id, {"model": "m", "created_at": f"2026-12-0{run_id[1]}T00:00:00"})
        rows = []
        for config, (method, threshold, docs) in CONFIGS.items():
            for doc, (nll, kept, protected, kl, top1) in docs.items():
                chunks = [(10.0, 0, 0, 0.0, 10), (nll, kept, protected, kl, top1)]  # the first: nothing to evict
                for chunk, (n, k, p, kl_sum, agree) in enumerate(chunks):
                    rows.append({**row(doc, chunk, method, config, n, 10, 5, 40 if chunk else 0, k, 16 if chunk else 0,
                                       p, threshold), "kl_sum": kl_sum, "top1_agree": agree})  # fmt: skip
        lake.write_rows(run_id, "t0", pa.Table.from_pylist(rows, schema=ROW_SCHEMA))
    return lake


def html_table(page: str, name: str) -> list[dict[str, str]]:
    """Table ``name`` of an index.html as records."""
    body = page.split(f"<h2>{name}</h2>", 1)[1].split("</table>", 1)[0]
    lines = re.findall(r"<tr>(.*?)</tr>", body, re.S)
    header = [html.unescape(c) for c in re.findall(r"<th>(.*?)</th>", lines[0])]
    cells = [map(html.unescape, re.findall(r"<td>(.*?)</td>", line)) for line in lines[1:]]
    return [dict(zip(header, row_cells, strict=True)) for row_cells in cells]


def test_index_html_honours_reference_and_both_name_it(lake, tmp_path):
    plots = tmp_path / "plots"
    args = ["report", "--lake", lake.uri, "--table", "paired", "--reference", "h2o", "--plot", str(plots)]
    result = CliRunner().invoke(main, args)
    assert result.exit_code == 0, result.output
    caption = "wins, losses and ties against h2o@1 (--reference)"
    assert caption in result.stdout
    page = (plots / "index.html").read_text()
    assert caption in html.unescape(page)
    shown = {r["config"]: r for r in html_table(page, "paired")}
    terminal = {r["config"]: r for r in RunReport(lake).table("paired", reference="h2o@1").records()}
    for config, record in terminal.items():  # the page's wins and losses are the terminal's
        assert (shown[config]["wins"], shown[config]["losses"]) == (str(record["wins"]), str(record["losses"]))
    # By hand, ΔNLL % of documents a and b: knorm +10 and +0.5, h2o +3.33 and +1.25: knorm loses a, wins b.
    assert (terminal["knorm@-2"]["wins"], terminal["knorm@-2"]["losses"]) == (1, 1)
    assert (terminal["h2o@1"]["ties"], terminal["baseline"]["wins"]) == (2, 2)


def test_compare_is_sorted_by_compressible_density_not_density_with_window(lake):
    records = RunReport(lake).table("compare").records()
    # By hand: compressible = kept outside protection / keys outside it: knorm (24-16)/(40-16) = 1/3,
    # h2o (30-28)/(40-28) = 1/6; with window: knorm 24/40 < h2o 30/40, the order the table had.
    assert [r["config"] for r in records] == ["baseline", "knorm@-2", "h2o@1"]
    assert records[1]["density_with_window"] < records[2]["density_with_window"]


def test_runs_compare_fits_120_columns_and_names_the_rest(lake):
    result = CliRunner().invoke(main, ["runs", "--lake", lake.uri, "--compare", "r1", "r2"])
    assert result.exit_code == 0, result.output
    lines = result.stdout.splitlines()
    assert max(map(len, lines)) <= 120, result.stdout
    # The same run twice: every _diff column is 0, constant, so it goes first and is named below.
    assert lines[0].split()[:3] == ["config", "delta_nll_pct_a", "delta_nll_pct_b"]
    assert "density_compressible_a" in lines[0]
    assert "--wide shows every column" in result.stdout
    wide = CliRunner().invoke(main, ["runs", "--lake", lake.uri, "--compare", "r1", "r2", "--wide"])
    assert "tokens_b" in wide.stdout.splitlines()[0]


def test_kl_and_agreement_intervals_stay_in_their_range(lake):
    records = {r["config"]: r for r in RunReport(lake).table("paired").records()}
    t = 12.7062047  # t(0.975, 1 degree of freedom)
    for config, (_, _, docs) in CONFIGS.items():
        kls = [kl / 20 for _, _, _, kl, _ in docs.values()]  # per token of the document's 20
        top1 = [(10 + agree) / 20 for *_, agree in docs.values()]
        for low, high, values, top in (("kl_ci95_low", "kl_ci95_high", kls, math.inf), ("top1_ci95_low",
                                       "top1_ci95_high", top1, 1.0)):  # fmt: skip
            mean, stderr = sum(values) / 2, abs(values[0] - values[1]) / 2  # sd of two / sqrt(2)
            assert records[config][low] == pytest.approx(max(mean - t * stderr, 0.0), abs=1e-12)
            assert records[config][high] == pytest.approx(min(mean + t * stderr, top), abs=1e-12)
    assert records["knorm@-2"]["kl_ci95_low"] == 0 and records["knorm@-2"]["top1_ci95_high"] == 1


def test_score_heatmaps_have_a_colour_bar(tmp_path, monkeypatch):
    bars = []
    original = matplotlib.figure.Figure.colorbar
    counted = lambda fig, *a, **k: bars.append(k) or original(fig, *a, **k)  # noqa: E731
    monkeypatch.setattr(matplotlib.figure.Figure, "colorbar", counted)
    scores = torch.randn(2, 3, 2, 20)
    dump = DocumentScores(configs=["knorm@-2", "h2o@1"], scores=scores, kept=scores > 0)
    paths = draw_heatmaps("doc", dump, tmp_path)
    assert len(paths) == 2 and len(bars) == 2 and all("score rank" in b["label"] for b in bars)


def test_custom_probe_heatmap_names_each_probe():
    columns = ["method", "config", "task", "context_length", "depth", "probe", "probes", "accuracy", "answer_nll"]
    rows = [(c.split("@")[0], c, "custom", n, None, probe, 1, ok, 0.1)
            for probe, n in (("colour", 40), ("city", 40), ("year", 55))
            for c, ok in (("baseline", 1.0), ("knorm@-2", float(probe == "year")))]  # fmt: skip
    empty = Table("x", [], [])
    tables = {"pareto": Table("pareto", ["config"], []), "frontier": Table("frontier", ["sweep_points"], []),
              "paired": Table("paired", ["config", "mean_kl"], []), "by_position": empty,
              "retrieval": Table("retrieval", columns, rows)}  # fmt: skip
    figure = plot_figures("r", tables)["retrieval.png"]
    ax = figure.axes[0]
    assert [t.get_text() for t in ax.get_yticklabels()] == ["city", "colour", "year"]
    assert [t.get_text() for t in ax.get_xticklabels()] == ["baseline", "knorm@-2"]
    assert ax.images[0].get_array().tolist() == [[1.0, 0.0], [1.0, 0.0], [1.0, 1.0]]
    assert len(figure.axes) == 2  # the grid and its colour bar


@pytest.mark.parametrize("command", [["report"], ["runs"], ["sql", "SELECT 1"]])
def test_commands_that_read_with_duckdb_refuse_an_object_store_lake_in_one_line(command):
    """Issue 39, point 8: report --help offered lake URIs that report cannot read."""
    result = CliRunner().invoke(main, [*command, "--lake", "s3://bucket/lake"])
    assert result.exit_code == 2
    error = [line for line in result.output.splitlines() if line.startswith("Error:")]
    assert error and "s3://bucket/lake is not a local directory" in error[0] and "aws s3 sync" in error[0]
    assert "a local directory" in CliRunner().invoke(main, [command[0], "--help"]).output


def test_an_object_store_out_of_reach_is_one_line(monkeypatch):
    """No network: pyarrow's 35-line error becomes one line naming the lake and what to check."""

    class Unreachable:
        @staticmethod
        def from_uri(uri):
            raise OSError("When resolving region for bucket 'b': AWS Error NETWORK_CONNECTION\nmore detail\nand more")

    monkeypatch.setattr("orchestrator.lake.store.pafs.FileSystem", Unreachable)
    with pytest.raises(KvorchError) as error:
        Lake("s3://b/lake")
    assert "\n" not in str(error.value)
    assert str(error.value).startswith("cannot open lake s3://b/lake: When resolving region for bucket 'b'")
    result = CliRunner().invoke(main, ["status", "--lake", "s3://b/lake"])
    assert result.exit_code == 1 and result.output.count("\n") == 1, result.output
