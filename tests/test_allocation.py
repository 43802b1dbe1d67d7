"""Allocations (workers/contract/allocation.py): a ranked config's keep limit shared between
(layer, kv-head)s by AdaKV, PyramidKV or a user's table, orthogonally to the press that scores.

References are computed here, independently: AdaKV's global top-k with its safeguard from a plain
forward's keys, PyramidKV's schedule written out as kvpress writes it."""

from __future__ import annotations

import json
import math

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch

from orchestrator.errors import KvorchError
from orchestrator.sweep.spec import JobSpec, build_configs
from tests.helpers import tiny_llama
from workers.contract.allocation import UNIFORM, Allocation, parse_allocation
from workers.contract.configs import EvalConfig
from workers.contract.settings import EngineSettings
from workers.engine import capacity, sizing
from workers.engine.core import Engine
from workers.engine.layout import DocumentLayout
from workers.presses import parse_method

N_LAYERS, N_KV = 4, 2


@pytest.fixture(scope="module")
def model():
    return tiny_llama(n_layers=N_LAYERS)


@pytest.fixture(scope="module")
def document() -> torch.Tensor:
    return torch.randint(0, 97, (250,), generator=torch.Generator().manual_seed(5))


def knorm(**setting) -> EvalConfig:
    return EvalConfig(parse_method("knorm"), **setting)


def plain_knorm_scores(model, ids: torch.Tensor) -> torch.Tensor:
    """[layers, kv-heads, n]: -||k|| of the rotated keys of one plain forward (no kvorch)."""
    model.set_attn_implementation("eager")
    with torch.no_grad():
        cache = model(ids[None], use_cache=True).past_key_values
    return torch.stack([-layer.keys[0].float().norm(dim=-1) for layer in cache.layers])


def adakv_reference(scores: torch.Tensor, budget: int, window: int, alpha: float = 0.2) -> torch.Tensor:
    """AdaKV on one layer's [kv-heads, n] scores, as a loop: the last ``window`` keys of every
    head stay; each head first takes its best floor(alpha x budget) - window older keys; then the
    layer's remaining budget, heads x (budget - window) in all, goes to the best older keys of any
    head. Returns the kept mask."""
    heads, n = scores.shape
    older = n - window
    kept = torch.zeros(heads, n, dtype=torch.bool)
    kept[:, older:] = True
    safe = max(0, math.floor(alpha * budget) - window)
    for h in range(heads):
        for p in sorted(range(older), key=lambda p: -float(scores[h, p]))[:safe]:
            kept[h, p] = True
    left = heads * (budget - window) - heads * safe
    rest = [(float(scores[h, p]), h, p) for h in range(heads) for p in range(older) if not kept[h, p]]
    for _, h, p in sorted(rest, key=lambda t: -t[0])[:left]:
        kept[h, p] = True
    return kept


def pyramid_reference(limit: int, seen: int, window: int, layer: int, n_layers: int, beta: float) -> int:
    """kvpress's PyramidKVPress.get_layer_budget, with q_len * (1 - compression_ratio) = limit."""
    max_capacity_prompt = window + limit
    min_num = (max_capacity_prompt - window) / beta
    max_num = (max_capacity_prompt - window) * 2 - min_num
    if max_num >= seen - window:
        max_num = seen - window
        min_num = (max_capacity_prompt - window) * 2 - max_num
    if not (seen >= max_num >= min_num >= window):
        return round(limit)
    steps = (max_num - min_num) / (n_layers - 1)
    return round(max_num - layer * steps)


@pytest.mark.parametrize("static", [False, True])
@pytest.mark.parametrize("budget,window", [(120, 8), (60, 0)])
def test_adakv_keeps_the_global_top_k_with_safeguard_of_a_plain_forwards_scores(
    model, document, static, budget, window
):
    """One chunk (the whole document): the kept sets are exactly the reference's, from knorm's
    scores on a plain forward's keys, per layer; the layer's total is the uniform one."""
    n = document.shape[0]
    engine = Engine(model, EngineSettings(n, window, static=static, agreement=False))
    _, scores = engine.inspect("d", document, [knorm(budget=budget, allocation=Allocation("adakv"))])
    reference_scores = plain_knorm_scores(model, document)
    torch.testing.assert_close(scores.scores[0], reference_scores, rtol=1e-5, atol=1e-5)
    uneven = False
    for layer in range(N_LAYERS):
        expected = adakv_reference(reference_scores[layer], budget, window)
        assert torch.equal(scores.kept[0, layer], expected), layer
        assert int(expected.sum()) == N_KV * budget
        counts = expected.sum(dim=-1)
        assert (counts >= math.floor(0.2 * budget)).all()
        uneven |= bool(counts.min() < counts.max())
    assert uneven  # the test covers budgets that move between heads


@pytest.mark.parametrize(
    "beta,ratio,pyramid",
    [(2, 0.5, True), (20, 0.5, True), (20, 0.6, False)],  # capped at seen - floor; falls back to uniform
)
def test_pyramidkv_layer_budgets_follow_kvpress_formula_after_every_chunk(model, document, beta, ratio, pyramid):
    """Chunks of 32: after the last chunk, every (layer, kv-head) keeps exactly kvpress's layer
    budget for the limit ceil((1 - r) e) (beta 20 at r = 0.6 falls back to uniform, as kvpress
    does); every chunk's keys kept are the per-layer budgets of the keys seen before it."""
    chunk, window = 32, 16
    engine = Engine(model, EngineSettings(chunk, window, static=False, agreement=False))
    config = knorm(ratio=ratio, allocation=Allocation("pyramidkv", beta=beta))
    rows, scores = engine.inspect("d", document, [config])
    n = document.shape[0]

    def limit_of(seen: int) -> int:
        return math.ceil((1 - ratio) * seen)

    budgets = [pyramid_reference(limit_of(n), n, window, layer, N_LAYERS, beta) for layer in range(N_LAYERS)]
    assert scores.kept[0].sum(dim=-1).tolist() == [[b] * N_KV for b in budgets]
    assert (len(set(budgets)) > 1) == pyramid
    assert abs(sum(budgets) - N_LAYERS * limit_of(n)) <= N_LAYERS  # same total, within one key per head
    for row in rows.to_pylist()[1:]:
        s = row["chunk_start"]
        per_layer = [min(s, pyramid_reference(limit_of(s), s, window, la, N_LAYERS, beta)) for la in range(N_LAYERS)]
        expected = sum(max(b, min(s, window)) for b in per_layer) * N_KV
        assert row["keys_kept"] == expected, s


def test_a_file_of_shares_gives_each_head_its_share_of_the_same_total(model, document, tmp_path):
    shares = [[1.0, 3.0], [2.0, 2.0], [1.0, 1.0], [0.5, 0.5]]
    (tmp_path / "mine.json").write_text(json.dumps(shares))
    table = pa.table({"layer": [0, 0, 1, 1, 2, 2, 3, 3], "kv_head": [0, 1] * 4, "share": sum(shares, [])})
    pq.write_table(table, tmp_path / "mine.parquet")
    from_json = parse_allocation(f"file={tmp_path / 'mine.json'}")
    assert from_json == parse_allocation(f"file={tmp_path / 'mine.parquet'}")
    assert from_json.label == "file=mine"
    budget, window = 100, 8
    engine = Engine(model, EngineSettings(32, window, static=False, agreement=False))
    _, scores = engine.inspect("d", document, [knorm(budget=budget, allocation=from_json)])
    mean = sum(sum(shares, [])) / 8
    expected = [[max(window, round(budget * s / mean)) for s in row] for row in shares]
    assert scores.kept[0].sum(dim=-1).tolist() == expected
    assert abs(sum(sum(expected, [])) - 8 * budget) <= 8


def test_a_file_of_another_shape_than_the_model_is_refused_naming_both(model, document):
    bad = Allocation("file", shares=((1.0, 1.0, 1.0),), name="wide")
    engine = Engine(model, EngineSettings(32, 8, static=False, agreement=False))
    with pytest.raises(ValueError, match=r"file=wide is 1 layers x 3 kv-heads; the model has 4 x 2"):
        engine.evaluate("d", document, [knorm(budget=64, allocation=bad)])


def test_uniform_is_todays_rule_whatever_else_the_batch_holds(model, document):
    """A uniform config's keep masks and NLL are the same alone, named explicitly, and in a batch
    with every other allocation; its rows say uniform and its label is unchanged."""
    settings = EngineSettings(32, 16, static=False, agreement=False)
    alone_rows, alone = Engine(model, settings).inspect("d", document, [knorm(budget=80)])
    others = [
        knorm(budget=80, allocation=Allocation("adakv")),
        knorm(budget=80, allocation=Allocation("pyramidkv", beta=2)),
        knorm(budget=80, allocation=Allocation("uniform")),
    ]
    rows, mixed = Engine(model, settings).inspect("d", document, [*others[:2], knorm(budget=80)])
    assert others[2] == knorm(budget=80) and others[2].label == "knorm@budget=80"
    at = mixed.configs.index("knorm@budget=80")
    assert torch.equal(mixed.kept[at], alone.kept[0])
    mine = [r for r in rows.to_pylist() if r["config"] == "knorm@budget=80"]
    assert [r["nll_sum"] for r in mine] == [r["nll_sum"] for r in alone_rows.to_pylist()]
    assert {r["allocation"] for r in mine} == {"uniform"} and {r["press"] for r in mine} == {"knorm"}
    assert not torch.equal(mixed.kept[0], alone.kept[0])  # adakv kept other keys


@pytest.mark.slow  # about 18 s: the full suite runs it, the fast loop (under 3 minutes) does not
def test_the_held_cache_fits_what_each_allocation_keeps(model, document):
    """Held and masked caches keep the same keys and give the same NLL under every allocation,
    from the first document on: each pool holds its own budgets, and never overflows into a lost
    key."""
    configs = [
        knorm(budget=60, allocation=Allocation("adakv")),
        knorm(ratio=0.5, allocation=Allocation("pyramidkv", beta=2)),
        knorm(budget=60, allocation=Allocation("file", shares=((1, 3), (2, 2), (1, 1), (1, 1)), name="f")),
    ]
    for static in (False, True):
        masked = Engine(model, EngineSettings(32, 16, static=static, agreement=False, cache="masked"))
        held = Engine(model, EngineSettings(32, 16, static=static, agreement=False))
        expected_rows, expected = masked.inspect("d", document, configs)
        for doc in ("d", "e"):
            rows, got = held.inspect(doc, document, configs)
            assert torch.equal(got.kept, expected.kept)
            assert [r["nll_sum"] for r in rows.to_pylist()] == pytest.approx(
                [r["nll_sum"] for r in expected_rows.to_pylist()], rel=1e-6
            )


def test_each_allocations_pool_holds_its_own_budgets_per_layer(model):
    """The held cache's pool of each row, per layer, has the pages its kv-heads' budgets need
    together: uniform and adakv (which moves a layer's budget between heads, never adds to it)
    the uniform limit per head; pyramidkv each layer's budget of kvpress's formula, the largest
    over every chunk end (here the last: the schedule only grows with the document); a file its
    heads' shares."""
    n, window, write = 400, 16, 32
    configs = [
        knorm(ratio=0.5),
        knorm(ratio=0.5, allocation=Allocation("adakv")),
        knorm(ratio=0.5, allocation=Allocation("pyramidkv", beta=2)),
        knorm(ratio=0.5, allocation=Allocation("file", shares=((1, 3), (2, 2), (1, 1), (1, 1)), name="f")),
    ]
    layout = DocumentLayout(model.config, EngineSettings(write, window), configs, n, False, torch.device("cpu"), "w")
    pools = sizing.group_pools(layout, n, write, {}, static=False, full=False)
    limit = n // 2

    def pages(heads: list[int], page: int) -> int:
        return capacity.pages_for(sum(max(window, h) for h in heads), N_KV, write, page)

    uniform, adakv, pyramid, shared = ([layer[0] for layer in pool.allotted] for pool in pools)
    page = pools[0].page
    assert uniform == adakv == [pages([limit, limit], page)] * N_LAYERS
    budgets = [pyramid_reference(limit, n, window, layer, N_LAYERS, 2) for layer in range(N_LAYERS)]
    assert len(set(budgets)) > 1 and pyramid == [pages([b, b], pools[2].page) for b in budgets]
    shares = ((1, 3), (2, 2), (1, 1), (1, 1))  # average 1.5: (1, 3) is 2/3 and 2 of the limit
    assert shared == [pages([min(n, round(limit * share / 1.5)) for share in row], pools[3].page) for row in shares]
    assert all(pool.pages == tuple(map(sum, pool.allotted)) for pool in pools)  # exact shapes: no rounding


def test_allocations_are_a_sweep_dimension_of_the_ranked_policies():
    configs = build_configs(("baseline,knorm,snapkv",), (), "ratio", ratios=(0.5,), allocations=("uniform", "adakv"))
    assert [c.label for c in configs] == [
        "baseline",
        "knorm@ratio=0.5",
        "knorm@ratio=0.5+adakv",
        "snapkv@ratio=0.5",
        "snapkv@ratio=0.5+adakv",
    ]
    assert [c.sweep for c in configs[1:3]] == ["knorm", "knorm+adakv"]
    spec = JobSpec(methods=("knorm",), policy="budget", budgets=(256,), allocations=("pyramidkv:beta=4",))
    assert [c.label for c in spec.configs] == ["baseline", "knorm@budget=256+pyramidkv:beta=4"]
    assert spec.to_json()["allocations"] == ["pyramidkv:beta=4"]
    assert "allocations" not in JobSpec(methods=("knorm",)).to_json()  # old runs keep their fingerprint
    assert "allocation" not in JobSpec(methods=("knorm",), policy="ratio", ratios=(0.5,)).to_json()["configs"][1]


def test_a_files_shares_are_part_of_the_runs_spec(tmp_path):
    """A table changed under the same path is another run: its shares, not only its name, are in spec.json."""
    path = tmp_path / "mine.json"
    specs = []
    for shares in ([[1, 2]], [[2, 1]]):
        path.write_text(json.dumps(shares))
        spec = JobSpec(methods=("knorm",), policy="ratio", ratios=(0.5,), allocations=(f"file={path}",))
        specs.append(spec.to_json()["configs"][1])
    assert specs[0]["config"] == specs[1]["config"] == "knorm@ratio=0.5+file=mine"
    assert specs[0]["shares"] == ((1.0, 2.0),) and specs[0] != specs[1]


@pytest.mark.parametrize(
    "kwargs,fragment",
    [
        ({"allocations": ("adakv",)}, r"--allocation adakv shares a ratio or budget: use --policy ratio or budget"),
        ({"policy": "budget", "budgets": (256,), "allocations": ("even",)}, r"allocation 'even' is unknown"),
        ({"policy": "budget", "budgets": (256,), "allocations": ("adakv:beta=2",)}, r"adakv has no parameter 'beta'"),
        ({"policy": "budget", "budgets": (256,), "allocations": ("file=/nope.json",)}, r"/nope.json does not exist"),
        ({"policy": "budget", "budgets": (256,), "allocations": ("adakv", "adakv")}, r"lists adakv twice"),
    ],
)
def test_bad_allocations_are_one_line_errors(kwargs, fragment):
    with pytest.raises(KvorchError, match=fragment):
        JobSpec(methods=("knorm",), **kwargs)


def test_a_file_share_that_puts_a_head_below_its_floor_is_refused_up_front(tmp_path):
    """knorm's floor is its 128-key window: a budget of 256 at a share of 0.25 (of a mean of 1)
    would give one head 64 keys."""
    path = tmp_path / "steep.json"
    path.write_text(json.dumps([[0.25, 1.75]]))
    with pytest.raises(KvorchError, match=r"--budgets 256 under file=steep gives a head 64 keys, below knorm's "
                                          r"sinks \+ window \(0 \+ 128 = 128\)"):  # fmt: skip
        JobSpec(methods=("knorm",), policy="budget", budgets=(256,), allocations=(f"file={path}",))
    JobSpec(methods=("knorm",), policy="budget", budgets=(512,), allocations=(f"file={path}",))


def test_an_allocation_needs_a_ranked_policy():
    with pytest.raises(ValueError, match="needs a ratio or a budget"):
        knorm(threshold=-16, allocation=Allocation("adakv"))
    assert knorm().allocation == UNIFORM


def test_head_budgets_is_the_mean_kept_share_of_each_head_at_each_documents_end(model, tmp_path):
    """Two documents through the engine into a lake: the view's share per (config, layer,
    kv-head) is the mean over documents of kept / tokens, counted here from the final keep masks."""
    import kvorch
    from tests.test_reports import make_lake

    configs = [knorm(budget=60), knorm(budget=60, allocation=Allocation("adakv"))]
    engine = Engine(model, EngineSettings(32, 16, static=False, agreement=False))
    docs = {"a": torch.randint(0, 97, (200,)), "b": torch.randint(0, 97, (130,))}
    rows, expected = [], {}
    for doc_id, ids in docs.items():
        table, scores = engine.inspect(doc_id, ids, configs)
        rows += table.to_pylist()
        for i, label in enumerate(scores.configs):
            share = scores.kept[i].sum(dim=-1).double() / len(ids)  # [layers, kv-heads]
            expected[label] = expected.get(label, 0) + share / len(docs)
    assert sum(r["head_kept"] is not None for r in rows) == 2 * len(configs)  # each config's last chunk
    lake = make_lake(tmp_path / "lake", {"r": rows})
    with kvorch.open_lake(lake.uri) as nb:
        got = nb.sql("SELECT * FROM head_budgets ORDER BY config, layer, kv_head").to_pylist()
    assert len(got) == len(configs) * N_LAYERS * N_KV
    for row in got:
        assert row["docs"] == 2 and row["allocation"] == ("adakv" if "adakv" in row["config"] else "uniform")
        assert row["press"] == ("knorm+adakv" if row["allocation"] == "adakv" else "knorm")
        assert row["kept_share"] == pytest.approx(float(expected[row["config"]][row["layer"], row["kv_head"]]))
    uniform = [r["kept_share"] for r in got if r["allocation"] == "uniform"]
    adakv = [r["kept_share"] for r in got if r["allocation"] == "adakv"]
    assert len(set(uniform)) == 1 and len(set(adakv)) > 1


def test_report_plots_head_budgets_as_a_heatmap_per_config(model, tmp_path):
    """The cells --plot draws equal the final keep masks per head, the report table sums them up
    per config, and --plot writes the heatmap."""
    import matplotlib.image

    from orchestrator.reports.head_budget_plot import head_budget_cells
    from orchestrator.reports.tables import RunReport
    from tests.test_reports import kvorch, make_lake

    configs = [
        EvalConfig(parse_method("baseline")),
        knorm(ratio=0.5),
        knorm(ratio=0.5, allocation=Allocation("pyramidkv", beta=2)),
    ]
    table, scores = Engine(model, EngineSettings(32, 16, static=False, agreement=False)).inspect(
        "a", torch.randint(0, 97, (200,)), configs
    )
    lake = make_lake(tmp_path / "lake", {"r": table.to_pylist()})
    cells = head_budget_cells(RunReport(lake, "r")).records()
    assert [(r["config"], r["layer"], r["kv_head"]) for r in cells] == [
        (c, la, h) for c in sorted(scores.configs) for la in range(N_LAYERS) for h in range(N_KV)
    ]
    for r in cells:
        i = scores.configs.index(r["config"])
        assert r["mean_kept"] == int(scores.kept[i, r["layer"], r["kv_head"]].sum())
    summary = {r["config"]: r for r in RunReport(lake, "r").table("head_budgets").records()}
    for i, config in enumerate(scores.configs):
        shares = scores.kept[i].sum(dim=-1).double() / 200
        got = summary[config]
        assert (got["heads"], got["docs"]) == (N_LAYERS * N_KV, 1)
        assert got["min_share"] == pytest.approx(float(shares.min()))
        assert got["max_share"] == pytest.approx(float(shares.max()))
        assert got["mean_share"] == pytest.approx(float(shares.mean()))
    assert summary["knorm@ratio=0.5+pyramidkv:beta=2"]["max_over_min"] > 2
    result = kvorch("report", "--lake", lake.uri, "--run", "r", "--plot", str(tmp_path / "plots"))
    assert result.exit_code == 0, result.output
    image = matplotlib.image.imread(tmp_path / "plots" / "head_budgets.png")
    assert image.shape[0] > 100 and image.shape[1] > 100


def test_a_bad_allocation_on_the_command_line_is_one_line_before_anything_runs(tmp_path):
    from tests.test_reports import kvorch

    lake = tmp_path / "lake"
    args = ["submit", "--methods", "knorm", "--policy", "budget", "--budgets", "256", "--lake", str(lake)]
    result = kvorch(*args, "--allocation", "uniform,skewed")
    assert result.exit_code == 1 and "allocation 'skewed' is unknown" in result.output
    assert len(result.output.strip().splitlines()) == 1 and not lake.exists()
    result = kvorch("submit", "--methods", "knorm", "--allocation", "adakv", "--lake", str(lake))
    assert result.exit_code == 1 and "use --policy ratio or budget" in result.output and not lake.exists()
