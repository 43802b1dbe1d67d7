"""The CLI end to end on a real local Ray, real Parquet and DuckDB, and every bad input."""

from __future__ import annotations

import csv
import hashlib
import io
import json
import math
import shutil
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner

from orchestrator.cli import main
from orchestrator.corpus import load_corpus
from orchestrator.sweep.spec import DEFAULT_CHUNK_SIZE, DEFAULT_MAX_DOCS, DEFAULT_MAX_TOKENS
from tests.helpers import full_forward_nll
from workers.contract.tokenization import resolve
from workers.presses import ALL_METHODS


def kvorch(*args: str):
    return CliRunner().invoke(main, list(args), catch_exceptions=False)


def snapshot(root: Path) -> dict[str, str]:
    return {
        str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(root.rglob("*"))
        if p.is_file()
    }


def test_the_default_run_on_the_embedded_model_end_to_end(default_run, smollm2, smollm2_tokenizer):
    """The README's first command's job (``kvorch submit --methods all``: the session's run,
    tests/conftest.py, which the docs' tables are also checked against), read back through the
    CLI: every method, one row per (doc, chunk, config), the run finished, and its baseline equal
    to an uncompressed full-sequence forward of the same document."""
    lake = str(default_run.lake)
    report = kvorch("report", "--lake", lake, "--format", "csv")
    table = list(csv.DictReader(io.StringIO(report.stdout)))
    assert sorted(r["method"] for r in table) == sorted(ALL_METHODS)
    density = {r["method"]: float(r["density_with_window"]) for r in table}
    assert density["baseline"] == 1.0
    assert min(density, key=density.get) in ("streaming_llm", "window")
    assert density["streaming_llm"] < min(v for k, v in density.items() if k not in ("streaming_llm", "window"))

    # One row per (doc, chunk, config), no duplicates; docs and spec recorded.
    expected_rows = DEFAULT_MAX_DOCS * math.ceil(DEFAULT_MAX_TOKENS / DEFAULT_CHUNK_SIZE) * len(ALL_METHODS)
    sql = kvorch(
        "sql",
        "--lake",
        lake,
        "--format",
        "json",
        "SELECT count(*) AS n, count(DISTINCT (doc_id, chunk_index, config)) AS u FROM chunks",
    )
    assert json.loads(sql.stdout) == [{"n": expected_rows, "u": expected_rows}]
    docs = json.loads(kvorch("sql", "--lake", lake, "--format", "json", "SELECT doc_id, n_tokens FROM docs").stdout)
    assert [d["n_tokens"] for d in docs] == [DEFAULT_MAX_TOKENS] * DEFAULT_MAX_DOCS
    (status_path,) = default_run.lake.glob("runs/run_id=*/status.json")
    status = json.loads(status_path.read_text())
    assert status["status"] == "finished" and status["rows"] == expected_rows

    # The lake's baseline equals an uncompressed full-sequence forward of the same document.
    doc = load_corpus("pydoc")[0]
    ids = torch.tensor(resolve(smollm2_tokenizer, "auto").ids(doc.text, DEFAULT_MAX_TOKENS))
    lake_nll = json.loads(
        kvorch(
            "sql",
            "--lake",
            lake,
            "--format",
            "json",
            f"SELECT sum(nll_sum) AS s FROM chunks WHERE method = 'baseline' AND doc_id = '{doc.doc_id}'",
        ).stdout
    )[0]["s"]
    assert lake_nll == pytest.approx(float(full_forward_nll(smollm2, ids).sum()), rel=1e-4)

    markdown = kvorch("report", "--lake", lake, "--format", "markdown")
    assert markdown.exit_code == 0 and len(markdown.stdout.strip().splitlines()) == 2 + len(ALL_METHODS)


@pytest.fixture(scope="module")
def first_run(local_ray, tmp_path_factory, tiny_model_dir) -> Path:
    """A lake holding run ``first`` on the tiny local model, submitted once for the module."""
    lake = tmp_path_factory.mktemp("first-run") / "lake"
    result = kvorch(
        "submit",
        "--model",
        tiny_model_dir,
        "--max-docs",
        "2",
        "--max-tokens",
        "128",
        "--chunk-size",
        "64",
        "--window",
        "32",
        "--methods",
        "baseline,window,h2o",
        "--lake",
        str(lake),
        "--run-id",
        "first",
        "--no-progress",
    )
    assert result.exit_code == 0, result.output
    return lake


@pytest.fixture
def populated_lake(first_run, tmp_path) -> Path:
    """A test's own copy of ``first_run``'s lake, free to change."""
    return Path(shutil.copytree(first_run, tmp_path / "lake"))


def write(path: Path, text: str) -> str:
    path.write_text(text)
    return str(path)


def test_bad_input_is_one_line_and_leaves_the_lake_alone(populated_lake, tmp_path, tiny_model_dir):
    long_text = load_corpus("pydoc")[0].text
    before = snapshot(populated_lake)
    blocker = tmp_path / "blocker"
    blocker.write_text("a file where a lake directory should be")
    cases = {
        "valid methods: baseline": ["--methods", "bogus"],
        "not found": ["--corpus", str(tmp_path / "missing.jsonl")],
        "no non-empty documents": ["--corpus", write(tmp_path / "empty.jsonl", "\n")],
        "not valid JSON": ["--corpus", write(tmp_path / "bad.jsonl", json.dumps({"text": long_text}) + "\n{oops\n")],
        "no string field 'text'": ["--corpus", write(tmp_path / "notext.jsonl", '{"body": "x"}\n')],
        "shorter than one chunk": [
            "--corpus",
            write(tmp_path / "short.jsonl", '{"id": "tiny", "text": "too short"}\n'),
        ],
        "is not a number": ["--thresholds", "h2o=high"],
        "cannot write to lake": ["--lake", str(blocker / "lake")],
        "different spec": ["--run-id", "first"],
        "no such run": ["--resume", "nope"],
        "--batch-configs must be auto or a whole number": ["--batch-configs", "lots"],
    }
    for fragment, extra in cases.items():
        args = [
            "submit",
            "--model",
            tiny_model_dir,
            "--max-docs",
            "2",
            "--max-tokens",
            "128",
            "--chunk-size",
            "64",
            "--lake",
            str(populated_lake),
            "--no-progress",
            *extra,
        ]
        result = CliRunner().invoke(main, args)
        assert result.exit_code != 0, fragment
        lines = result.output.strip().splitlines()
        assert len(lines) == 1 and lines[0].startswith("Error: ") and fragment in lines[0], (fragment, result.output)
    assert snapshot(populated_lake) == before
    assert blocker.read_text().startswith("a file")


def test_the_removed_compact_flag_is_one_line_and_writes_nothing(tmp_path):
    lake = tmp_path / "lake"
    result = CliRunner().invoke(main, ["submit", "--methods", "baseline", "--compact", "--lake", str(lake)])
    assert result.exit_code == 2
    lines = result.output.strip().splitlines()
    assert lines[-1] == (
        "Error: --compact was removed: the held cache (--cache held, the default) replaced it; drop the flag"
    )
    assert not lake.exists()


def test_cuda_graphs_reach_the_engine_only_when_compiling_on_cuda_and_never_change_the_fingerprint():
    from orchestrator.errors import KvorchError
    from orchestrator.sweep.resume import SCHEDULING_FIELDS
    from orchestrator.sweep.spec import JobSpec

    spec = JobSpec(methods=("baseline",), cuda_graphs=True)
    assert spec.engine_for("cuda").cuda_graphs and spec.engine_for("cuda").compile
    assert not spec.engine_for("cpu").cuda_graphs  # auto compiles only on CUDA
    assert not JobSpec(methods=("baseline",)).engine_for("cuda").cuda_graphs  # off by default
    assert "cuda_graphs" in SCHEDULING_FIELDS and spec.to_json()["cuda_graphs"] is True
    with pytest.raises(KvorchError, match="--cuda-graphs replays the compiled chunk step; it needs --compile"):
        JobSpec(methods=("baseline",), cuda_graphs=True, compile="off")


def test_compile_cache_reaches_the_workers_and_never_changes_the_fingerprint(tmp_path, monkeypatch):
    from orchestrator.errors import KvorchError
    from orchestrator.sweep.resume import spec_hash
    from orchestrator.sweep.spec import JobSpec
    from workers.contract.defaults import COMPILE_CACHE

    assert JobSpec(methods=("baseline",)).compile_cache == COMPILE_CACHE == "~/.cache/kvorch/compile"
    import pyarrow as pa

    docs = pa.table({"doc_id": ["d"], "sha256": ["x"]})
    elsewhere = JobSpec(methods=("baseline",), compile_cache=str(tmp_path)).to_json()
    assert spec_hash(elsewhere, docs) == spec_hash(JobSpec(methods=("baseline",)).to_json(), docs)
    with pytest.raises(KvorchError, match=r"^--compile-cache is empty; give a directory"):
        JobSpec(methods=("baseline",), compile_cache=" ")
    # The option and its environment variable, as the CLI parses them into the spec.
    from orchestrator.cli import main

    monkeypatch.setenv("KVORCH_COMPILE_CACHE", str(tmp_path / "from-env"))
    ctx = main.make_context("kvorch", ["submit", "--methods", "baseline"], resilient_parsing=True)
    sub = main.get_command(ctx, "submit")
    assert sub.make_context("submit", ["--methods", "baseline"]).params["compile_cache"] == str(tmp_path / "from-env")
    given = sub.make_context("submit", ["--compile-cache", "/x/y"]).params["compile_cache"]
    assert given == "/x/y"


def test_spec_records_the_tokenization_and_compare_notes_a_difference(
    populated_lake, tiny_model_dir, smollm2_tokenizer
):
    """spec.json holds --bos, what it resolved to and a hash of the ids (checked against the
    tokenizer's own ids of each document, with BOS prepended or not); runs --compare says in
    one line on stderr when two runs' ids differ, and keeps stdout a clean table."""
    texts = [d.text for d in load_corpus("pydoc")[:2]]

    def ids_sha256(prefix: list[int]) -> str:
        ids = [(prefix + smollm2_tokenizer.convert_tokens_to_ids(smollm2_tokenizer.tokenize(t)))[:128] for t in texts]
        return hashlib.sha256(json.dumps(ids, separators=(",", ":")).encode()).hexdigest()

    args = ["--model", tiny_model_dir, "--max-docs", "2", "--max-tokens", "128", "--chunk-size", "64"]
    args += ["--window", "32", "--methods", "baseline,window,h2o", "--lake", str(populated_lake)]
    result = kvorch("submit", *args, "--bos", "off", "--run-id", "nobos", "--no-progress")
    assert result.exit_code == 0, result.output
    recorded = {}
    for run_id in ("first", "nobos"):
        spec = json.loads((populated_lake / "runs" / f"run_id={run_id}" / "spec.json").read_text())
        recorded[run_id] = (spec["bos"], spec["tokenization"])
    common = {"tokenizer": type(smollm2_tokenizer).__name__, "vocab_size": len(smollm2_tokenizer)}
    bos = smollm2_tokenizer.bos_token_id
    assert recorded["first"] == (
        "auto",
        {**common, "bos_resolved": True, "bos_token_id": bos, "token_ids_sha256": ids_sha256([bos])},
    )
    assert recorded["nobos"] == (
        "off",
        {**common, "bos_resolved": False, "bos_token_id": None, "token_ids_sha256": ids_sha256([])},
    )

    lake = str(populated_lake)
    compare = CliRunner().invoke(main, ["runs", "--lake", lake, "--compare", "first", "nobos", "--format", "csv"])
    assert compare.exit_code == 0, compare.output
    assert {r["config"] for r in csv.DictReader(io.StringIO(compare.stdout))} == {"baseline", "window", "h2o@1"}
    note = compare.stderr.strip().splitlines()
    assert len(note) == 1 and note[0].startswith("note: runs first and nobos were tokenized differently"), note
    assert f"bos on (id {bos}) vs off; token ids sha256" in note[0]
    same = CliRunner().invoke(main, ["runs", "--lake", lake, "--compare", "first", "first"])
    assert same.exit_code == 0 and same.stderr == ""
    # A run from before --bos has no record: its ids are unknown, and the note says so.
    spec_path = populated_lake / "runs" / "run_id=nobos" / "spec.json"
    spec_path.write_text(
        json.dumps({k: v for k, v in json.loads(spec_path.read_text()).items() if k != "tokenization"})
    )
    legacy = CliRunner().invoke(main, ["runs", "--lake", lake, "--compare", "first", "nobos"])
    assert legacy.stderr.strip() == (
        "note: run nobos records no tokenization (made before --bos); its token ids may differ from first's"
    )


def test_bos_on_without_a_bos_token_is_one_line(tmp_path, tiny_model_dir):
    from transformers import AutoTokenizer

    model_dir = tmp_path / "no-bos"
    tokenizer = AutoTokenizer.from_pretrained(tiny_model_dir)
    tokenizer.bos_token = None
    tokenizer.save_pretrained(model_dir)
    for name in ("config.json", "model.safetensors"):
        (model_dir / name).write_bytes((Path(tiny_model_dir) / name).read_bytes())
    lake = tmp_path / "lake"
    result = CliRunner().invoke(main, ["submit", "--model", str(model_dir), "--bos", "on", "--lake", str(lake)])
    lines = result.output.strip().splitlines()
    assert result.exit_code == 1 and len(lines) == 1, result.output
    assert "--bos on, but this model's tokenizer" in lines[0] and "pass --bos auto or --bos off" in lines[0]
    assert not lake.exists()


def test_local_model_dir_runs_and_report_reads_it(populated_lake):
    result = kvorch("report", "--lake", str(populated_lake), "--run", "first", "--format", "json")
    rows = {r["config"]: r for r in json.loads(result.stdout)}
    assert set(rows) == {"baseline", "window", "h2o@1"}
    assert rows["window"]["density_without_window"] == 0
    assert rows["baseline"]["tokens"] == 2 * 127


def test_scores_command_writes_the_table_and_heatmaps(tmp_path, tiny_model_dir):
    lake, out = tmp_path / "lake", tmp_path / "png"
    result = kvorch("scores", "--model", tiny_model_dir, "--methods", "streaming_llm,knorm", "--max-tokens", "128",
                    "--chunk-size", "32", "--window", "16", "--lake", str(lake), "--out", str(out))  # fmt: skip
    assert result.exit_code == 0, result.output
    kept = json.loads(
        kvorch("sql", "--lake", str(lake), "--format", "json",
               "SELECT layer, kv_head, list(position ORDER BY position) AS kept, count(*) AS n FROM scores "
               "WHERE config = 'streaming_llm' AND kept GROUP BY ALL ORDER BY ALL").stdout
    )  # fmt: skip
    assert len(kept) == 2 * 2  # layers x kv-heads
    assert all(k["kept"] == [0, 1, 2, 3, *range(128 - 16, 128)] for k in kept)
    total = json.loads(
        kvorch("sql", "--lake", str(lake), "--format", "json", "SELECT count(*) AS n FROM scores").stdout
    )
    assert total == [{"n": 2 * 2 * 2 * 128}]
    pngs = sorted(out.glob("*.png"))
    assert [p.name for p in pngs] == ["scores-knorm@-16.png", "scores-streaming_llm.png"]
    assert all(p.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and p.stat().st_size > 10_000 for p in pngs)
    bad = CliRunner().invoke(main, ["scores", "--model", tiny_model_dir, "--doc", "nope", "--lake", str(lake)])
    assert bad.exit_code != 0 and "no document 'nope'" in bad.output
