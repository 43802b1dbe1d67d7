"""One failing press never costs the others: per-config isolation in the actor and a real job,
incomplete configs in status.json, ``kvorch status`` and ``kvorch report``, and the preflight
that stops a method that cannot run on the model before anything is written."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner

from orchestrator.cli import main
from orchestrator.corpus import load_corpus
from orchestrator.lake import incomplete
from tests.helpers import FailingPress, chunk_sums, full_forward_nll, tiny_gpt2
from workers.actor import PREFLIGHT_DOC_ID, EvalWorker
from workers.contract.configs import EvalConfig
from workers.contract.models import load_model
from workers.contract.plan import ConfigFailure, Task, TaskDocument, WorkerSettings
from workers.contract.settings import EngineSettings
from workers.engine.core import Engine
from workers.presses import REGISTRY, BaselinePress, KnormPress

REASON = "RuntimeError: failing press: refuses this document"
# Without the agreement columns: a config alone is then a batch of 1 (with them, baseline joins
# it as the reference row; tests/test_agreement.py covers that).
ENGINE = EngineSettings(chunk_size=16, window=8, agreement=False)


@pytest.fixture(scope="module")
def worker(tiny_model_dir) -> EvalWorker:
    """The actor's body without Ray, on the tiny Llama."""
    return EvalWorker("w", WorkerSettings(tiny_model_dir, "float32", "cpu", 1, ENGINE))


def random_doc(doc_id: str, n: int, seed: int, vocab: int) -> TaskDocument:
    ids = torch.randint(0, vocab, (n,), generator=torch.Generator().manual_seed(seed))
    return TaskDocument(doc_id, ids.tolist())


def by_doc_and_config(rows) -> dict[tuple[str, str], list[dict]]:
    out: dict[tuple[str, str], list[dict]] = {}
    for r in sorted(rows.to_pylist(), key=lambda r: r["chunk_index"]):
        out.setdefault((r["doc_id"], r["config"]), []).append(r)
    return out


def test_a_config_that_raises_costs_only_its_own_rows_of_that_document(worker, tiny_model_dir):
    vocab = worker.model.config.vocab_size
    docs = (random_doc("d0", 64, 1, vocab), random_doc("d1", 64, 2, vocab))
    configs = (EvalConfig(BaselinePress()), EvalConfig(FailingPress(doc="d1")), EvalConfig(KnormPress(), -1.0))
    result = worker.run(Task("t", docs, configs))

    assert result.failures == (ConfigFailure("d1", "failing:doc=d1", REASON),)
    got = by_doc_and_config(result.rows)
    assert set(got) == {(d.doc_id, c.label) for d in docs for c in configs} - {("d1", "failing:doc=d1")}
    # The healthy batch ran once (batch of 3); only the document whose batch raised ran config by config.
    assert {r["batch_size"] for (doc, _), rs in got.items() for r in rs if doc == "d0"} == {3}
    assert {r["batch_size"] for (doc, _), rs in got.items() for r in rs if doc == "d1"} == {1}

    fresh = Engine(load_model(tiny_model_dir), ENGINE)  # another model and engine, each config alone
    eager = load_model(tiny_model_dir)
    for doc in docs:
        ids = torch.tensor(doc.token_ids)
        # Baseline sees every key: its chunk NLLs are those of one eager full-sequence forward.
        expected = chunk_sums(full_forward_nll(eager, ids), len(ids), ENGINE.chunk_size)
        assert [r["nll_sum"] for r in got[(doc.doc_id, "baseline")]] == pytest.approx(expected, rel=1e-4)
        knorm = fresh.evaluate(doc.doc_id, ids, [configs[2]]).to_pylist()
        assert [r["keys_kept"] for r in got[(doc.doc_id, "knorm@-1")]] == [r["keys_kept"] for r in knorm]
        assert [r["nll_sum"] for r in got[(doc.doc_id, "knorm@-1")]] == pytest.approx(
            [r["nll_sum"] for r in knorm], rel=1e-5
        )
    assert [r["nll_sum"] for r in got[("d0", "failing:doc=d1")]] == pytest.approx(
        [r["nll_sum"] for r in got[("d0", "baseline")]], rel=1e-5
    )


def test_preflight_names_each_config_that_cannot_run_and_leaves_the_sweep_model_alone(worker):
    hooks = sum(len(m._forward_pre_hooks) for m in worker.model.modules())
    configs = [
        EvalConfig(BaselinePress()),
        EvalConfig(FailingPress()),  # raises on every document, the preflight's too
        EvalConfig(FailingPress(doc="elsewhere")),
        EvalConfig(KnormPress(), -1.0),
    ]
    assert worker.preflight(configs) == [("failing", REASON)]
    on_its_document = FailingPress(doc=PREFLIGHT_DOC_ID)
    assert worker.preflight([EvalConfig(on_its_document)]) == [(on_its_document.label(), REASON)]
    assert sum(len(m._forward_pre_hooks) for m in worker.model.modules()) == hooks


# --- a real job on a local Ray --------------------------------------------------------------


def kvorch(*args: str):
    return CliRunner().invoke(main, list(args), catch_exceptions=False)


def job_args(model: str, lake: Path, methods: str, *extra: str) -> list[str]:
    return [
        "submit",
        "--model",
        model,
        "--max-docs",
        "3",
        "--max-tokens",
        "128",
        "--chunk-size",
        "64",
        "--window",
        "32",
        "--batch-configs",
        "2",
        "--methods",
        methods,
        "--lake",
        str(lake),
        "--no-progress",
        "--format",
        "json",
        *extra,
    ]


def lake_rows(lake: Path, run_id: str) -> dict[tuple[str, int, str], tuple]:
    """(doc, chunk, config) -> (nll_sum, keys_kept, n_correct) of every row of a run."""
    query = "SELECT doc_id, chunk_index, config, nll_sum, keys_kept, n_correct FROM chunks WHERE run_id = ?"
    out = kvorch("sql", "--lake", str(lake), "--format", "json", query.replace("?", f"'{run_id}'"))
    return {(r["doc_id"], r["chunk_index"], r["config"]): r for r in json.loads(out.stdout)}


def status_json(lake: Path, run_id: str) -> dict:
    return json.loads((lake / "runs" / f"run_id={run_id}" / "status.json").read_text())


@pytest.fixture
def failing_registered(monkeypatch):
    monkeypatch.setitem(REGISTRY, "failing", FailingPress)


def test_a_failing_config_leaves_every_other_row_and_is_reported(
    local_ray, tmp_path, tiny_model_dir, failing_registered
):
    d0, d1, d2 = (d.doc_id for d in load_corpus("pydoc")[:3])
    lake = tmp_path / "lake"
    clean = kvorch(*job_args(tiny_model_dir, lake, "baseline,window,h2o", "--run-id", "clean"))
    assert clean.exit_code == 0, clean.output
    # Batches of 2 rows: [baseline, failing on d0], then failing on d1, window and h2o each beside
    # the hidden baseline reference row of the agreement columns (4 groups x 3 documents = 12
    # tasks). Each failure hits a batch and leaves its task's part of method "failing" empty
    # (one document per task); the task of failing-on-d1 alone evaluates no config on d1.
    methods = f"baseline,failing:doc={d0},failing:doc={d1},window,h2o"
    result = kvorch(*job_args(tiny_model_dir, lake, methods, "--run-id", "r"))
    assert result.exit_code == 0, result.output
    warned = [line for line in result.output.splitlines() if "is incomplete" in line]
    assert [re.search(r"(failing:doc=\S+) is incomplete", w).group(1) for w in warned] == [
        f"failing:doc={d0}",
        f"failing:doc={d1}",
    ]

    expected, got = lake_rows(lake, "clean"), lake_rows(lake, "r")
    assert len(expected) == 3 * 2 * 3
    for key, row in expected.items():
        assert got[key]["keys_kept"] == row["keys_kept"] and got[key]["n_correct"] == row["n_correct"]
        assert got[key]["nll_sum"] == pytest.approx(row["nll_sum"], rel=1e-5)
    failing = {key: row for key, row in got.items() if key[2].startswith("failing")}
    bad = {(d0, f"failing:doc={d0}"), (d1, f"failing:doc={d1}")}
    assert {(doc, config) for doc, _, config in failing} == {
        (doc, f"failing:doc={d}") for doc in (d0, d1, d2) for d in (d0, d1)
    } - bad
    for (doc, chunk, _), row in failing.items():  # it keeps every key, as baseline does
        assert row["nll_sum"] == pytest.approx(expected[(doc, chunk, "baseline")]["nll_sum"], rel=1e-5)

    recorded = status_json(lake, "r")
    assert recorded["status"] == "finished" and recorded["failures"] == {}
    records = recorded["config_failures"]
    assert [(r["config"], r["doc_id"], r["reason"]) for r in records] == [
        (f"failing:doc={d0}", d0, REASON),
        (f"failing:doc={d1}", d1, REASON),
    ]

    status = CliRunner().invoke(main, ["status", "--lake", str(lake), "--run", "r", "--format", "json"])
    table = json.loads(status.stdout)[0]
    summary = (table["status"], table["tasks_done"], table["failed"], table["incomplete_configs"])
    assert summary == ("finished", 12, 0, 2)
    lines = [line for line in status.stderr.splitlines() if "incomplete on" in line]
    assert lines == [
        f"r failing:doc={d0} incomplete on {d0} (task {records[0]['task_id']}): {REASON}",
        f"r failing:doc={d1} incomplete on {d1} (task {records[1]['task_id']}): {REASON}",
    ]
    report = CliRunner().invoke(main, ["report", "--lake", str(lake), "--run", "r", "--format", "json"])
    assert report.exit_code == 0
    assert {r["config"] for r in json.loads(report.stdout)} == {"baseline", "window", "h2o@1"} | {
        f"failing:doc={d}" for d in (d0, d1)
    }
    # stderr: the line naming the run shown, then the same warnings as submit printed.
    shown, *report_warnings = report.stderr.splitlines()
    assert shown.startswith("kvorch: report of run r (corpus pydoc, created ") and report_warnings == warned
    assert f"failed on 1 document(s) ({d0}): {REASON}" in warned[0]

    # A resume keeps the failures of tasks that stay done and records those of the task it reruns.
    rerun = records[0]["task_id"]
    (lake / "chunks" / "run_id=r" / "method=baseline" / f"part-{rerun}.parquet").unlink()
    resumed = kvorch(*job_args(tiny_model_dir, lake, methods, "--resume", "r"))
    assert resumed.exit_code == 0, resumed.output
    assert "(11 done, 1 to go)" in resumed.output
    assert status_json(lake, "r")["config_failures"] == records
    assert lake_rows(lake, "r") == got


def test_a_method_that_cannot_run_on_the_model_stops_the_submission(local_ray, tmp_path, smollm2_tokenizer):
    model_dir = tmp_path / "gpt2"
    tiny_gpt2(vocab_size=len(smollm2_tokenizer)).save_pretrained(model_dir)
    smollm2_tokenizer.save_pretrained(model_dir)
    lake = tmp_path / "lake"
    args = job_args(str(model_dir), lake, "baseline,expected_attention")
    result = CliRunner().invoke(main, [*args, "--run-id", "r"])
    assert result.exit_code != 0
    assert result.output.strip().splitlines() == [
        "Error: --methods: expected_attention@0.01 cannot run on gpt2 models: ValueError: it needs RoPE, and gpt2 "
        "models have no rotary embedding"
    ]
    assert not (lake / "runs").exists() and not (lake / "chunks").exists() and not (lake / "docs").exists()
    # The same model runs what it can.
    ok = kvorch(*job_args(str(model_dir), lake, "baseline,window", "--run-id", "ok"))
    assert ok.exit_code == 0, ok.output
    assert status_json(lake, "ok")["status"] == "finished"


def test_a_resume_keeps_the_failures_of_tasks_that_stay_done():
    """Also from a status a killed driver left behind (``running``, written as failures came)."""
    records = [
        {"task_id": "s0000-g000", "doc_id": "a", "config": "x", "reason": "E: 1"},
        {"task_id": "s0001-g000", "doc_id": "b", "config": "x", "reason": "E: 2"},
    ]
    assert incomplete.carried_over({"status": "running", "config_failures": records}, {"s0001-g000"}) == records[1:]
    assert incomplete.carried_over(None, {"s0001-g000"}) == []
    assert incomplete.carried_over({"status": "failed"}, {"s0000-g000"}) == []
