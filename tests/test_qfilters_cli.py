"""`kvorch heads qfilters` (issue 37, point 3): Q-Filters measured over a corpus on Ray, written for
`qfilter:path=`. End to end on a tiny model directory, against the filters measured in this
process from the same token ids (that measurement is held to a numpy SVD of a plain forward's
queries in tests/test_leaderboard_presses.py); its refusals in one line, before Ray starts."""

from __future__ import annotations

import json

import pytest
import torch
from click.testing import CliRunner

from orchestrator.cli import main
from orchestrator.corpus import model_inputs
from tests.helpers import tiny_llama
from workers.contract.settings import EngineSettings
from workers.engine.core import Engine
from workers.presses import StateShape, parse_method
from workers.presses.qfilter import load_qfilters
from workers.studies.qfilters import measure_qfilters, save_qfilters


def kvorch(*args: str):
    return CliRunner().invoke(main, list(args), catch_exceptions=False)


def test_qfilters_of_a_corpus_are_the_ones_measured_from_its_documents_queries(local_ray, tmp_path, tiny_model_dir):
    out = tmp_path / "qf"
    args = ["--model", tiny_model_dir, "--out", str(out), "--skip-docs", "1", "--max-docs", "3", "--max-tokens", "96"]
    result = kvorch("heads", "qfilters", *args, "--chunk-size", "32", "--actors", "2")
    assert result.exit_code == 0, result.output
    assert f"q-filters -> {out}" in result.output and f"qfilter:path={out}" in result.output
    tokens, corpus = model_inputs(tiny_model_dir, "pydoc", "auto")
    documents = [torch.tensor(tokens.ids(d.text, 96)) for d in corpus[1:4]]
    model = tiny_llama(vocab_size=len(tokens.tokenizer))  # the very weights saved in tiny_model_dir
    expected = measure_qfilters(Engine(model, EngineSettings(32, 0)).observe, documents, 2)
    torch.testing.assert_close(load_qfilters(str(out)), expected, rtol=1e-5, atol=1e-6)
    assert json.loads((out / "config.json").read_text()) == {"num_layers": 2, "num_kv_heads": 2, "kv_head_dim": 8}
    state = parse_method(f"qfilter:path={out}").init_state(StateShape(1, 2, 4, 2, 8, 10, torch.device("cpu")))
    torch.testing.assert_close(torch.stack(state), expected, rtol=1e-5, atol=1e-6)  # what the press scores with
    (out / "model.safetensors").write_bytes(b"stale")
    again = kvorch("heads", "qfilters", *args)  # filters written before are rewritten
    assert again.exit_code == 0, again.output
    torch.testing.assert_close(load_qfilters(str(out)), expected, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize(
    ("make", "message"),
    [
        (lambda p: p.write_text("notes"), "is a file; give a directory"),
        (lambda p: (p.mkdir(), (p / "run.parquet").write_text("x")), "holds other files (run.parquet)"),
    ],
)
def test_an_out_that_would_mix_or_lose_files_is_refused_in_one_line(tmp_path, tiny_model_dir, make, message):
    out = tmp_path / "qf"
    make(out)
    result = CliRunner().invoke(main, ["heads", "qfilters", "--model", tiny_model_dir, "--out", str(out)])
    assert result.exit_code != 0 and message in result.output
    assert "Traceback" not in result.output and len(result.output.strip().splitlines()) == 1


def test_bad_document_options_are_refused_in_one_line(tmp_path):
    result = CliRunner().invoke(main, ["heads", "qfilters", "--out", str(tmp_path / "qf"), "--max-docs", "0"])
    assert result.exit_code != 0 and "need --max-docs >= 1" in result.output
    assert not (tmp_path / "qf").exists()


def test_filters_loaded_before_are_neither_changed_nor_served_stale_when_their_file_is_rewritten(tmp_path):
    """The press caches what it loads: a directory measured again gives the new filters, and a
    tensor handed out before keeps its values (safetensors maps the file it reads)."""
    save_qfilters(torch.ones(2, 2, 8), tmp_path)
    first = load_qfilters(str(tmp_path))
    (tmp_path / "model.safetensors").write_bytes(b"stale")
    save_qfilters(torch.full((2, 2, 8), 2.0), tmp_path)
    assert torch.equal(first, torch.ones(2, 2, 8))
    assert torch.equal(load_qfilters(str(tmp_path)), torch.full((2, 2, 8), 2.0))
