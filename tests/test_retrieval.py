"""Retrieval probes under the protocol: the answer span's sums against a full forward, the
probe documents of a run, the one-line errors, and `kvorch submit --task needle` end to end."""

from __future__ import annotations

import json
from pathlib import Path

import pyarrow.parquet as pq
import pytest
import torch
from click.testing import CliRunner

import kvorch
from orchestrator.cli import main
from orchestrator.sweep.documents import docs_table, run_documents
from orchestrator.sweep.spec import JobSpec
from tests.helpers import full_forward_logits, window_visible
from workers.contract.configs import EvalConfig
from workers.contract.plan import AnswerSpan
from workers.contract.settings import EngineSettings
from workers.contract.tokenization import resolve
from workers.engine.core import Engine
from workers.presses import parse_method
from workers.presses.baseline import BaselinePress


def kvorch_cli(*args: str):
    return CliRunner().invoke(main, list(args))


@pytest.mark.parametrize("graph", [False, True])
def test_answer_columns_equal_a_full_forward_over_the_answer_tokens(tiny_model, tokens, graph):
    """An answer straddling two chunks: its NLL and top-1 hits, summed over the chunks, are the
    full forward's over exactly the answer tokens (baseline: causal; window: its visibility)."""
    chunk, window, n = 16, 8, len(tokens)
    answer = AnswerSpan(start=n - 20, tokens=20)  # targets n-20 .. n-1, predicted at n-21 .. n-2
    configs = [EvalConfig(BaselinePress()), EvalConfig(parse_method("window"))]
    rows = Engine(tiny_model, EngineSettings(chunk, window, static=graph)).evaluate("d", tokens, configs, None, answer)
    visible = {"baseline": None, "window": window_visible(n, chunk, window)}
    for config, mask in visible.items():
        logits = full_forward_logits(tiny_model, tokens, mask)[n - 21 : n - 1]
        targets = tokens[n - 20 :]
        nll = torch.logsumexp(logits, -1) - logits.gather(-1, targets[:, None])[:, 0]
        got = [r for r in rows.to_pylist() if r["config"] == config]
        assert sum(r["answer_tokens"] for r in got) == 20
        assert len([r for r in got if r["answer_tokens"]]) == 2  # the span straddles two chunks
        assert sum(r["answer_nll_sum"] for r in got) == pytest.approx(float(nll.sum()), rel=1e-5)
        assert sum(r["answer_correct"] for r in got) == int((logits.argmax(-1) == targets).sum())


def test_a_corpus_document_has_null_answer_columns(tiny_model, tokens):
    rows = Engine(tiny_model, EngineSettings(16, 8)).evaluate("d", tokens, [EvalConfig(BaselinePress())])
    assert {(r["answer_tokens"], r["answer_nll_sum"], r["answer_correct"]) for r in rows.to_pylist()} == {
        (None, None, None)
    }


def test_probe_documents_carry_their_answer_and_cell(tiny_model_dir, smollm2_tokenizer, tmp_path):
    tokens = resolve(smollm2_tokenizer, "auto")
    spec = JobSpec(model=tiny_model_dir, task="passkey", lengths=(200, 300), depths=(0.0, 1.0), samples=2)
    docs = run_documents(spec, tokens, [])
    assert [len(d.token_ids) for d in docs] == [200] * 4 + [300] * 4
    table = docs_table(docs).to_pylist()
    for doc, row in zip(docs, table, strict=True):
        probe = doc.probe
        assert row["task"] == "passkey" and row["context_length"] == len(doc.token_ids)
        assert smollm2_tokenizer.decode(doc.token_ids[-probe.answer_tokens :]) == row["answer"]
    custom = tmp_path / "mine.jsonl"
    custom.write_text(json.dumps({"context": "The code is 4711. " * 20, "question": "The code is", "answer": " 4711"}))
    (doc,) = run_documents(JobSpec(model=tiny_model_dir, task=str(custom)), tokens, [])
    assert smollm2_tokenizer.decode(doc.token_ids[-doc.probe.answer_tokens :]) == " 4711"
    assert docs_table([doc]).to_pylist()[0]["depth"] is None


@pytest.mark.parametrize(
    "args,fragment",
    [
        (["--task", "nedle"], "--task 'nedle' is unknown; use one of passkey, needle, kv"),
        (["--task", "needle", "--lengths", "8k"], "8192 tokens exceed the model's context of 4096"),
        (["--task", "needle", "--depths", "0,1.5"], "--depths must lie in [0, 1], got"),
        (["--task", "needle", "--lengths", "1x"], "--lengths '1x' is not a length"),
        (["--lengths", "1k"], "--lengths goes with --task"),
        (["--task", "needle", "--max-docs", "2"], "--max-docs chooses corpus documents, not probes"),
        (["--task", "needle", "--samples", "0"], "--samples 0: use 1 or more"),
        (["--policy", "budget", "--budgets", "64", "--methods", "knorm"], "--budgets 64 is below knorm's sinks"),
    ],
)
def test_bad_probe_and_budget_options_are_one_line_before_anything_starts(tiny_model_dir, tmp_path, args, fragment):
    lake = tmp_path / "lake"
    result = kvorch_cli("submit", "--model", tiny_model_dir, "--lake", str(lake), *args)
    assert result.exit_code == 1, result.output
    assert fragment in result.output and len(result.output.strip().splitlines()) == 1, result.output
    assert not lake.exists()


def test_a_jsonl_task_refuses_the_built_in_options(tiny_model_dir, tmp_path):
    custom = tmp_path / "mine.jsonl"
    custom.write_text(json.dumps({"context": "c", "question": "q", "answer": " a"}) + "\n")
    result = kvorch_cli("submit", "--model", tiny_model_dir, "--task", str(custom), "--depths", "0.5")
    assert result.exit_code == 1 and "--depths applies to the built-in tasks" in result.output


def test_submit_task_needle_on_the_embedded_model_prints_the_accuracy_table(local_ray, smollm2_dir, tmp_path):
    """Done means: `kvorch submit --task needle` on the embedded model prints the accuracy table,
    and `kvorch report --plot` draws the heatmap; the notebook API reads the same table. The
    model's weights from a safetensors copy (conftest.smollm2_dir), which its actor loads in a second."""
    lake = tmp_path / "lake"
    result = kvorch_cli(
        "submit", "--task", "needle", "--lengths", "256,384", "--depths", "0,1", "--methods", "baseline,window",
        "--model", smollm2_dir, "--lake", str(lake), "--no-progress", "--format", "json",
    )  # fmt: skip
    assert result.exit_code == 0, result.output
    printed = json.loads(result.stdout)
    cells = {(r["config"], r["context_length"], r["depth"]): r for r in printed["retrieval"]}
    assert set(cells) == {(c, n, d) for c in ("baseline", "window") for n in (256, 384) for d in (0.0, 1.0)}
    assert all(r["probes"] == 1 and r["accuracy"] in (0.0, 1.0) and r["answer_nll"] > 0 for r in cells.values())
    # The fact right before the question is inside every window: the window press still finds it.
    assert cells[("window", 384, 1.0)]["accuracy"] == cells[("baseline", 384, 1.0)]["accuracy"]
    assert {r["config"] for r in printed["compare"]} == {"baseline", "window"}

    (docs_file,) = Path(lake, "docs").rglob("*.parquet")
    docs = pq.read_table(docs_file).to_pylist()
    assert sorted((d["context_length"], d["depth"]) for d in docs) == [(256, 0.0), (256, 1.0), (384, 0.0), (384, 1.0)]
    assert {d["task"] for d in docs} == {"needle"} and all(d["n_tokens"] == d["context_length"] for d in docs)

    plots = tmp_path / "plots"
    report = kvorch_cli("report", "--lake", str(lake), "--table", "retrieval", "--plot", str(plots))
    assert report.exit_code == 0 and (plots / "retrieval.png").stat().st_size > 10_000
    assert (plots / "kl.png").exists()
    with kvorch.open_lake(lake) as opened:
        assert opened.retrieval().num_rows == len(cells)
