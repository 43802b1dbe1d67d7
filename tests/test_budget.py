"""The token-budget policy: at most B keys per (layer, kv-head), sinks and window included."""

from __future__ import annotations

import pytest
import torch
from click.testing import CliRunner

from orchestrator.cli import main
from orchestrator.errors import KvorchError
from orchestrator.reports.tables import RunReport
from orchestrator.sweep.spec import JobSpec, build_configs
from tests.test_reports import chunk_row, make_lake
from workers.contract.configs import EvalConfig
from workers.contract.settings import EngineSettings
from workers.engine.core import Engine
from workers.presses import parse_method


@pytest.mark.parametrize("graph", [False, True])
def test_budget_keeps_the_window_and_the_best_scored_keys_up_to_b(tiny_model, tokens, graph):
    """knorm's scores never change, so after the last chunk the kept keys are exactly the window
    plus the B - window best-scored older keys: computed here from the final scores alone."""
    chunk, window, budget = 16, 8, 40
    config = EvalConfig(parse_method("knorm"), budget=budget)
    engine = Engine(tiny_model, EngineSettings(chunk, window, static=graph, agreement=False))
    rows, scores = engine.inspect("d", tokens, [config])
    n = len(tokens)
    kept = scores.kept[0]  # [layers, kv-heads, positions]
    assert (kept.sum(dim=-1) == budget).all()
    for layer in range(kept.shape[0]):
        for head in range(kept.shape[1]):
            older = scores.scores[0, layer, head, : n - window]
            best = older.argsort(descending=True, stable=True)[: budget - window]
            expected = set(best.tolist()) | set(range(n - window, n))
            assert set(kept[layer, head].nonzero()[:, 0].tolist()) == expected, (layer, head)
    heads = kept.shape[0] * kept.shape[1]
    for row in rows.to_pylist():
        assert (row["policy"], row["budget"], row["config"]) == ("budget", budget, f"knorm@budget={budget}")
        # What each chunk's queries saw of the keys before it: never more than B per head.
        assert row["keys_kept"] <= budget * heads
    assert max(r["keys_kept"] for r in rows.to_pylist()) == budget * heads


def test_budget_grid_gives_each_scoring_method_every_budget():
    configs = build_configs(("baseline,window,knorm,snapkv",), (), "budget", budgets=(64, 256), window=32)
    assert [c.label for c in configs] == [
        "baseline",
        "window",
        "knorm@budget=64",
        "knorm@budget=256",
        "snapkv@budget=64",
        "snapkv@budget=256",
    ]


@pytest.mark.parametrize(
    "kwargs,fragment",
    [
        ({"budgets": (100,)}, r"--budgets 100 is below knorm's sinks \+ window \(0 \+ 128 = 128\); use budgets >= 128"),
        ({"budgets": (256,), "methods": ("h2o",)}, r"below h2o's sinks \+ window \(0 \+ 512 = 512\).*protected_window"),
        ({"budgets": (130,), "methods": ("streaming_llm,random",)}, r"random's sinks \+ window \(4 \+ 128 = 132\)"),
        ({"budgets": ()}, "--policy budget needs --budgets"),
        ({"budgets": (256,), "policy": "ratio", "ratios": (0.5,)}, "--budgets needs --policy budget"),
        ({"budgets": (256,), "thresholds": ("1",)}, "--thresholds apply to --policy threshold"),
    ],
)
def test_bad_budgets_are_one_line_errors(kwargs, fragment):
    spec = {"methods": ("knorm",), "policy": "budget", **kwargs}
    with pytest.raises(KvorchError, match=fragment):
        JobSpec(**spec)


def test_budgets_on_the_command_line_are_checked_before_anything_runs(tmp_path):
    lake = tmp_path / "lake"
    result = CliRunner().invoke(main, ["submit", "--policy", "budget", "--budgets", "12x", "--lake", str(lake)])
    assert result.exit_code == 1 and "--budgets '12x'" in result.output
    assert len(result.output.strip().splitlines()) == 1 and not lake.exists()


def test_budget_sweeps_are_on_the_frontier_like_threshold_sweeps(tmp_path):
    """The iso-density table interpolates a budget sweep as it does a threshold sweep."""
    rows = [chunk_row("a", 30, "baseline", 100.0, kept=120, protected=20)]
    for budget, density, delta in ((64, 0.1, 20.0), (256, 0.5, 4.0)):
        rows.append(
            chunk_row(
                "a",
                30,
                f"knorm@budget={budget}",
                100.0 * (1 + delta / 100),
                kept=20 + round(100 * density),
                protected=20,
                budget=budget,
                policy="budget",
            )
        )
    report = RunReport(make_lake(tmp_path / "lake", {"r": rows}))
    frontier = {r["density"]: r for r in report.table("frontier", densities=[0.3]).records()}
    assert frontier[0.3]["press"] == "knorm" and frontier[0.3]["status"] == "interpolated"
    assert frontier[0.3]["delta_nll_pct"] == pytest.approx(12.0)  # halfway between 20 % and 4 %
    compare = {r["config"]: r for r in report.table("compare").records()}
    assert compare["knorm@budget=64"]["density_compressible"] == pytest.approx(0.1)


def test_torch_budget_limit_takes_the_smaller_of_ratio_and_budget():
    from workers.engine.decisions import keep_limit

    limit = keep_limit(torch.tensor([0.5, 1.0], dtype=torch.float64), torch.tensor([10**9, 40]), 101)
    assert limit.tolist() == [51, 40]
