"""Answers under compression (issue 35): the ``answers`` view (sql/_views.sql) over question
tasks' generated answers, the ``answers`` report table (sql/answers.sql) and answers.png, checked
against an independent computation over synthetic rows: 2 tasks x 2 context lengths x 3 configs
(baseline, a threshold and a ratio config) with a few documents each, a corpus document beside
them, one cell with a single question and questions some config did not answer."""

from __future__ import annotations

import json
import math
import random
import statistics
from pathlib import Path

import matplotlib

matplotlib.use("Agg")

import matplotlib.pyplot as plt  # noqa: E402
import pyarrow as pa  # noqa: E402
import pytest  # noqa: E402

from orchestrator.lake.queries import connect  # noqa: E402
from orchestrator.lake.readonly import connect_sealed  # noqa: E402
from orchestrator.lake.store import Lake  # noqa: E402
from orchestrator.reports.plots import plot_figures  # noqa: E402
from orchestrator.reports.tables import RunReport, left_out  # noqa: E402
from tests.test_reports import chunk_row, kvorch, make_lake, png_size, three_doc_rows  # noqa: E402
from workers.contract.schema import CHUNK_COLUMNS_BY_VERSION, DOC_SCHEMA, ROW_SCHEMA  # noqa: E402

Z975 = statistics.NormalDist().inv_cdf(0.975)
TASKS = ("niah_single_1", "vt")
LENGTHS = (1024, 4096)
# config -> chunk_row's keyword arguments
CONFIGS = {
    "baseline": {},
    "knorm@-2": {"threshold": -2.0},
    "snapkv@0.5": {"policy": "ratio", "ratio": 0.5},
}
STARTS = (0, 10, 20)  # each question's prompt: three chunks of 10 tokens; the last carries the answer
VIEW_COLUMNS = [
    "run_id", "doc_id", "method", "config", "press", "policy", "threshold", "ratio", "budget", "task",
    "context_length", "depth", "metric", "answers", "generated", "n_generated", "stop_reason", "score",
    "generated_density", "prompt_density",
]  # fmt: skip
TABLE_COLUMNS = [
    "method", "config", "task", "context_length", "questions", "score", "delta_score", "ci95_low", "ci95_high",
    "generated_density", "prompt_density",
]  # fmt: skip


def cell_docs(task: str, length: int) -> list[str]:
    """The questions of one (task, length) cell: three, but one for vt at 4096 (an interval of
    one pair is null)."""
    n = 1 if (task, length) == ("vt", 4096) else 3
    return [f"{task}/{length}/{i}" for i in range(n)]


# (doc, config) pairs without an answer: baseline failed on one question, knorm on another.
UNANSWERED = {("niah_single_1/1024/2", "baseline"), ("vt/1024/0", "knorm@-2")}


def question_rows(seed: int) -> tuple[list[dict], list[dict], dict[tuple[str, str], dict]]:
    """Chunk rows, docs rows, and what each (doc, config) answered: score, densities (the
    expected rows of the answers view, computed here from the numbers drawn)."""
    rng = random.Random(seed)
    rows, docs, expected = [], [], {}
    for task in TASKS:
        for length in LENGTHS:
            for i, doc in enumerate(cell_docs(task, length)):
                answers = [f"value-{rng.randint(0, 999)}"]
                metric = "ruler_all" if task == "vt" else "ruler_part"
                depth = [0.0, 0.5, 1.0][i]
                docs.append(
                    {"doc_id": doc, "source": f"ruler/{task}", "n_chars": 100, "n_tokens": 30, "sha256": "0" * 64,
                     "task": task, "context_length": length, "depth": depth, "answers": json.dumps(answers),
                     "metric": metric}
                )  # fmt: skip
                for config, extra in CONFIGS.items():
                    if (doc, config) in UNANSWERED:
                        continue
                    kept_sum = total_sum = 0
                    for start in STARTS:
                        total = start * 4
                        kept = total if config == "baseline" else rng.randint(0, total)
                        kept_sum, total_sum = kept_sum + kept, total_sum + total
                        generation = {}
                        if start == STARTS[-1]:
                            generation = {
                                "generated": f"{config} says {answers[0]}",
                                "n_generated": rng.randint(1, 16),
                                "stop_reason": rng.choice(["eos", "length"]),
                                "answer_score": rng.choice([0.0, 0.25, 0.5, 0.75, 1.0]),
                                "generated_density": 1.0 if config == "baseline" else rng.uniform(0.1, 0.9),
                            }
                            expected[(doc, config)] = {
                                "task": task, "context_length": length, "depth": depth, "metric": metric,
                                "answers": json.dumps(answers), "generated": generation["generated"],
                                "n_generated": generation["n_generated"], "stop_reason": generation["stop_reason"],
                                "score": generation["answer_score"],
                                "generated_density": generation["generated_density"],
                            }  # fmt: skip
                        rows.append(
                            chunk_row(doc, start, config, rng.uniform(10, 30), kept=kept, **extra, **generation)
                        )
                    expected[(doc, config)]["prompt_density"] = kept_sum / total_sum
    # A corpus document beside the questions: no generation, no reference answers.
    rows += [
        chunk_row("corpus-doc", start, config, 20.0, **extra) for start in STARTS for config, extra in CONFIGS.items()
    ]
    docs.append({"doc_id": "corpus-doc", "source": "corpus", "n_chars": 100, "n_tokens": 30, "sha256": "1" * 64})
    return rows, docs, expected


@pytest.fixture(scope="module")
def question_lake(tmp_path_factory) -> tuple[Lake, dict]:
    rows, docs, expected = question_rows(35)
    lake = make_lake(tmp_path_factory.mktemp("answers") / "lake", {"q": rows})
    lake.write_docs("q", pa.Table.from_pylist(docs, schema=DOC_SCHEMA))
    return lake, expected


def expected_table(expected: dict[tuple[str, str], dict]) -> dict[tuple[str, str, int], dict]:
    """The answers table computed naively: per (task, length, config), the mean score, the paired
    differences from baseline on the documents both answered, their mean and mean ± z·sd/sqrt(n)."""
    cells: dict[tuple[str, str, int], list[str]] = {}
    for (doc, config), e in expected.items():
        cells.setdefault((e["task"], config, e["context_length"]), []).append(doc)
    out = {}
    for (task, config, length), docs in cells.items():
        answered = [expected[(d, config)] for d in docs]
        diffs = [expected[(d, config)]["score"] - expected[(d, "baseline")]["score"] for d in docs
                 if (d, "baseline") in expected]  # fmt: skip
        mean = sum(diffs) / len(diffs) if diffs else None
        half = Z975 * statistics.stdev(diffs) / math.sqrt(len(diffs)) if len(diffs) > 1 else None
        out[(task, config, length)] = {
            "questions": len(docs),
            "score": sum(a["score"] for a in answered) / len(answered),
            "delta_score": mean,
            "ci95_low": None if half is None else mean - half,
            "ci95_high": None if half is None else mean + half,
            "generated_density": sum(a["generated_density"] for a in answered) / len(answered),
            "prompt_density": sum(a["prompt_density"] for a in answered) / len(answered),
        }
    return out


def approx_or_none(value):
    return None if value is None else pytest.approx(value, rel=1e-12, abs=1e-12)


# --- the answers view ----------------------------------------------------------------------------


def test_the_view_has_one_row_per_answered_question_and_config(question_lake):
    lake, expected = question_lake
    con = connect(lake)
    result = con.execute("SELECT * FROM answers ORDER BY doc_id, config")
    columns = [d[0] for d in result.description]
    assert columns == VIEW_COLUMNS
    rows = [dict(zip(columns, row, strict=True)) for row in result.fetchall()]
    assert len(rows) == len(expected) == len(CONFIGS) * (3 + 3 + 3 + 1) - len(UNANSWERED)
    for row in rows:
        want = expected[(row["doc_id"], row["config"])]
        assert row["run_id"] == "q"
        assert row["method"] == row["config"].split("@")[0] and row["press"] == row["method"]
        assert (row["policy"], row["threshold"], row["ratio"], row["budget"]) == (
            CONFIGS[row["config"]].get("policy", "threshold"),
            CONFIGS[row["config"]].get("threshold"),
            CONFIGS[row["config"]].get("ratio"),
            None,
        )
        for key, value in want.items():
            assert row[key] == (pytest.approx(value, rel=1e-12) if isinstance(value, float) else value), key
    assert "corpus-doc" not in {row["doc_id"] for row in rows}
    # The column and the view may share a name.
    assert con.execute("SELECT count(answers) FROM answers").fetchone() == (len(expected),)


def test_the_sealed_connection_and_kvorch_sql_have_the_same_view(question_lake):
    lake, expected = question_lake
    query = "SELECT * FROM answers ORDER BY ALL"
    native, sealed = connect(lake), connect_sealed(lake)
    assert native.execute("DESCRIBE answers").fetchall() == sealed.execute("DESCRIBE answers").fetchall()
    assert native.execute(query).fetchall() == sealed.execute(query).fetchall()
    result = kvorch(
        "sql", "--lake", lake.uri, "--format", "json",
        "SELECT task, config, count(*) AS n, avg(score) AS score FROM answers GROUP BY ALL ORDER BY ALL",
    )  # fmt: skip
    assert result.exit_code == 0, result.output
    got = {(r["task"], r["config"]): (r["n"], r["score"]) for r in json.loads(result.stdout)}
    for (task, config), (n, score) in got.items():
        mine = [e["score"] for (_, c), e in expected.items() if c == config and e["task"] == task]
        assert n == len(mine) and score == pytest.approx(sum(mine) / len(mine))
    assert len(got) == len(TASKS) * len(CONFIGS)


def test_no_question_tasks_and_older_parts_give_an_empty_view(tmp_path):
    """A corpus run (no docs table at all) and a run of schema version 4 parts and docs (no
    generation columns, no answers, no metric): the view exists, with no rows, on both connections."""
    lake = make_lake(tmp_path / "lake", {"corpus": three_doc_rows()})
    old = pa.Table.from_pylist(three_doc_rows(), schema=ROW_SCHEMA).select(CHUNK_COLUMNS_BY_VERSION[4].names)
    lake.write_spec("v4", {"model": "m"})
    lake.write_table(
        lake.part_path("v4", "baseline", "t0"), old.replace_schema_metadata({"kvorch_schema_version": "4"})
    )
    docs = pa.Table.from_pylist(
        [
            {"doc_id": d, "source": "s", "n_chars": 1, "n_tokens": 1, "sha256": "0" * 64, "task": "needle"}
            for d in "abc"
        ],
        schema=DOC_SCHEMA,
    ).drop_columns(["answers", "metric"])
    lake.write_table(
        lake.path("docs", "run_id=v4", "docs.parquet"), docs.replace_schema_metadata({"kvorch_schema_version": "4"})
    )
    for con in (connect(lake), connect_sealed(lake)):
        assert [d[0] for d in con.execute("DESCRIBE answers").fetchall()] == VIEW_COLUMNS
        assert con.execute("SELECT count(*) FROM answers").fetchone() == (0,)
    for run in ("corpus", "v4"):
        table = RunReport(lake, run).table("answers")
        assert table.columns == TABLE_COLUMNS and table.rows == []
        assert left_out(table).startswith("answers: no question tasks")
    result = kvorch("report", "--lake", lake.uri, "--run", "corpus", "--table", "answers", "--format", "json")
    assert result.exit_code == 0 and json.loads(result.stdout) == [], result.output
    assert "kvorch: empty answers: no question tasks" in result.stderr


# --- the answers table ---------------------------------------------------------------------------


def test_the_table_is_the_mean_score_and_the_paired_difference_from_baseline(question_lake):
    lake, expected = question_lake
    table = RunReport(lake, "q").table("answers")
    assert table.columns == TABLE_COLUMNS
    want = expected_table(expected)
    got = {(r["task"], r["config"], r["context_length"]): r for r in table.records()}
    assert set(got) == set(want) and len(got) == len(TASKS) * len(LENGTHS) * len(CONFIGS)
    for key, w in want.items():
        row = got[key]
        assert row["method"] == key[1].split("@")[0]
        assert row["questions"] == w["questions"], key
        for column in ("score", "delta_score", "ci95_low", "ci95_high", "generated_density", "prompt_density"):
            assert row[column] == approx_or_none(w[column]), (key, column)
    # The cases the fixture was built for, spelled out.
    assert got[("vt", "knorm@-2", 4096)]["ci95_low"] is None  # one question: no interval
    assert got[("vt", "knorm@-2", 4096)]["delta_score"] is not None
    assert got[("niah_single_1", "knorm@-2", 1024)]["questions"] == 3  # 2 paired: baseline missed one
    assert got[("vt", "knorm@-2", 1024)]["questions"] == 2
    baseline = got[("niah_single_1", "baseline", 4096)]
    assert (baseline["delta_score"], baseline["ci95_low"], baseline["ci95_high"]) == (0, 0, 0)
    # Ordered by task, length, baseline first.
    order = [(r["task"], r["context_length"], r["config"]) for r in table.records()]
    assert order == [(t, n, c) for t in TASKS for n in LENGTHS for c in sorted(CONFIGS, key=lambda c: c != "baseline")]


def test_report_table_answers_and_all_through_the_cli(question_lake):
    lake, _ = question_lake
    result = kvorch("report", "--lake", lake.uri, "--table", "answers", "--format", "json")
    assert result.exit_code == 0, result.output
    printed, direct = json.loads(result.stdout), RunReport(lake, "q").table("answers").records()
    assert [list(r) for r in printed] == [list(r) for r in direct]
    for a, b in zip(printed, direct, strict=True):  # DuckDB's parallel sums may differ in the last bit
        assert a == {k: v if isinstance(v, str) else approx_or_none(v) for k, v in b.items()}
    every = kvorch("report", "--lake", lake.uri, "--table", "all", "--format", "json")
    assert "answers" in json.loads(every.stdout) and "answers" not in every.stderr


# --- answers.png ---------------------------------------------------------------------------------


def test_the_plot_draws_each_tasks_scores_against_generated_density(question_lake, tmp_path):
    lake, _ = question_lake
    table = RunReport(lake, "q").table("answers")
    empty = {name: RunReport(lake, "q").table(name) for name in ("pareto", "paired", "by_position", "retrieval")}
    figures = plot_figures("q", {**empty, "frontier": RunReport(lake, "q").table("frontier"), "answers": table})
    try:
        fig = figures["answers.png"]
        panels = {ax.get_title(): ax for ax in fig.axes if ax.get_title()}
        assert set(panels) == set(TASKS)
        for task, ax in panels.items():
            drawn = sorted((float(x), float(y)) for line in ax.get_lines() for x, y in line.get_xydata())
            want = sorted((r["generated_density"], r["score"]) for r in table.records() if r["task"] == task)
            assert [v for point in drawn for v in point] == pytest.approx([v for point in want for v in point])
    finally:
        for fig in figures.values():
            plt.close(fig)
    plots = tmp_path / "plots"
    result = kvorch("report", "--lake", lake.uri, "--plot", str(plots))
    assert result.exit_code == 0, result.output
    width, height = png_size(plots / "answers.png")
    assert width >= 800 and height >= 400
    assert 'src="answers.png"' in (plots / "index.html").read_text()


def test_a_run_without_questions_draws_no_answers_plot(tmp_path):
    lake = make_lake(tmp_path / "lake", {"r": three_doc_rows()})
    plots = tmp_path / "plots"
    result = kvorch("report", "--lake", lake.uri, "--plot", str(plots))
    assert result.exit_code == 0, result.output
    assert not (plots / "answers.png").exists()
    assert "left out answers: no question tasks" in Path(plots / "index.html").read_text()
