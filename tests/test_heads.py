"""Head analysis: the probe's statistics against eager attention weights, the classifier and its
bootstrap confidence on constructed heads and synthetic statistics, and the CLI on a real Ray."""

from __future__ import annotations

import csv
import io
import json
import math

import pyarrow.parquet as pq
import pytest
import torch
from click.testing import CliRunner
from transformers import LlamaConfig, LlamaForCausalLM

from orchestrator.cli import main
from orchestrator.heads.classify import ClassifierSettings, head_table
from workers.contract.settings import EngineSettings
from workers.engine.core import Engine
from workers.studies.head_stats import (
    N_DISTANCE_BINS,
    SCALAR_FEATURES,
    DocumentHeadStats,
    HeadStatsProbe,
    recommended_window,
)


def kvorch(*args: str):
    return CliRunner().invoke(main, list(args), catch_exceptions=False)


def constructed_heads_model(vocab_size: int) -> LlamaForCausalLM:
    """2 layers x 2 heads whose attention ignores the tokens: head 0 has the same large query and
    key everywhere, so after RoPE it attends to distance 0 (local); head 1 has a zero query, so it
    attends uniformly to every visible key (global)."""
    config = LlamaConfig(
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=2,
        num_key_value_heads=2,
        vocab_size=vocab_size,
        attention_bias=True,
        max_position_embeddings=4096,
    )
    torch.manual_seed(0)
    model = LlamaForCausalLM(config).eval()
    with torch.no_grad():
        for layer in model.model.layers:
            attention = layer.self_attn
            for projection in (attention.q_proj, attention.k_proj):
                projection.weight.zero_()
                projection.bias.zero_()
                projection.bias[:16] = 4.0  # head 0 only
    return model


def test_probe_statistics_equal_a_naive_computation_from_eager_weights(tiny_model, tokens):
    probe = HeadStatsProbe(n_sink=3, recent=20, min_position=100)
    stats = Engine(tiny_model, EngineSettings(64, 64)).observe("d", tokens, probe).units("d")
    tiny_model.set_attn_implementation("eager")
    with torch.no_grad():
        weights = tiny_model(tokens[None], output_attentions=True).attentions  # per layer [1, H, n, n]
    n = len(tokens)
    got = stats.sums.sum(0) / stats.queries.sum()  # [L, H, F]
    assert stats.queries.sum() == n - 100
    for layer in range(2):
        for head in range(4):
            entropy = distance = sink = recent = 0.0
            bins = [0.0] * N_DISTANCE_BINS
            for i in range(100, n):
                for j in range(i + 1):
                    p = float(weights[layer][0, head, i, j])
                    entropy -= p * math.log(p) / math.log(i + 1) if p > 0 else 0.0
                    distance += p * (i - j)
                    if j < 3:
                        sink += p
                    else:
                        recent += p if i - j < 20 else 0.0
                        bins[0 if i == j else int(math.log2(i - j)) + 1] += p
            expected = [entropy, distance, sink, recent, *bins]
            assert got[layer, head].tolist() == pytest.approx([v / (n - 100) for v in expected], rel=1e-4, abs=1e-9)


def test_recommended_window_by_hand():
    mass = torch.zeros(3, N_DISTANCE_BINS, dtype=torch.float64)
    mass[0, 0] = 1.0  # only distance 0: the smallest window, 8
    mass[1, :6] = torch.tensor([0.1, 0.1, 0.1, 0.1, 0.1, 0.5])  # bin 5 = distances 16..31: window 32
    mass[2, 9] = 0.2  # distances 256..511, 20 % of the mass: needs 512 = the longest analysed -> full
    mass[2, 0] = 0.8
    assert recommended_window(mass, 0.05, longest=512).tolist() == [8, 32, -1]
    assert recommended_window(mass, 0.25, longest=512).tolist() == [8, 32, 8]


def synthetic_docs(far_by_unit: list[list[float]], queries: int = 100) -> list[DocumentHeadStats]:
    """One head; each document's units with the given far mass (the rest split sink/recent)."""
    docs = []
    for d, fars in enumerate(far_by_unit):
        sums = torch.zeros(len(fars), 1, 1, len(SCALAR_FEATURES) + N_DISTANCE_BINS, dtype=torch.float64)
        for u, far in enumerate(fars):
            sums[u, 0, 0, 2] = queries * (1 - far) / 2  # sink
            sums[u, 0, 0, 3] = queries * (1 - far) / 2  # recent
            sums[u, 0, 0, 4] = queries * (1 - far)  # distance bin 0
            sums[u, 0, 0, 4 + 10] = queries * far  # far away
        docs.append(DocumentHeadStats(f"d{d}", sums, torch.full((len(fars),), float(queries)), 1))
    return docs


def test_bootstrap_confidence_is_high_only_far_from_a_threshold():
    settings = ClassifierSettings(positional_below=0.05, gathering_above=0.3, bootstrap=2000)
    clear = head_table(synthetic_docs([[0.6, 0.7, 0.65, 0.62]] * 4), settings, "m", 4, 2048).to_pylist()[0]
    assert (clear["head_class"], clear["confidence"], clear["doc_agreement"]) == ("gathering", 1.0, 1.0)
    assert clear["far_mass"] == pytest.approx(0.6425)
    # Units scattered symmetrically around the gathering threshold: a coin flip, and said so.
    edge = head_table(synthetic_docs([[0.2, 0.4, 0.25, 0.35]] * 4), settings, "m", 4, 2048).to_pylist()[0]
    assert edge["far_mass"] == pytest.approx(0.3)
    assert 0.35 < edge["p_gathering"] < 0.65 and 0.35 < edge["p_mixed"] < 0.65
    assert edge["p_positional"] == 0.0
    assert edge["p_mixed"] + edge["p_gathering"] == pytest.approx(1.0)


def test_constructed_local_and_global_heads_are_classified_end_to_end(local_ray, tmp_path, smollm2_tokenizer):
    model_dir = tmp_path / "model"
    constructed_heads_model(len(smollm2_tokenizer)).save_pretrained(model_dir)
    smollm2_tokenizer.save_pretrained(model_dir)
    lake = str(tmp_path / "lake")
    args = ["--model", str(model_dir), "--lake", lake, "--max-docs", "4", "--max-tokens", "384"]
    result = kvorch("heads", "analyze", *args, "--recent", "32", "--min-position", "128", "--chunk-size", "64")
    assert result.exit_code == 0, result.output
    path = result.output.split("head table -> ")[1].split()[0]
    rows = pq.read_table(path).to_pylist()
    assert [(r["layer"], r["head"], r["head_class"]) for r in rows] == [
        (0, 0, "positional"),
        (0, 1, "gathering"),
        (1, 0, "positional"),
        (1, 1, "gathering"),
    ]
    assert all(r["confidence"] >= 0.95 and r["doc_agreement"] == 1.0 and r["n_docs"] == 4 for r in rows)
    assert [r["recommended_context"] for r in rows] == [12, -1, 12, -1]  # 8-key window + 4 sinks; full
    assert "layer   0  P G" in result.output
    # Stored, queryable in SQL, and shown again.
    query = "SELECT head_class, count(*) AS n FROM heads GROUP BY ALL ORDER BY 1"
    result = kvorch("sql", "--lake", lake, "--format", "csv", query)
    assert list(csv.DictReader(io.StringIO(result.output))) == [
        {"head_class": "gathering", "n": "2"},
        {"head_class": "positional", "n": "2"},
    ]
    shown = kvorch("heads", "show", "--lake", lake)
    assert shown.exit_code == 0 and "positional" in shown.output and "layer   1  P G" in shown.output
    analysis = json.loads((tmp_path / "lake" / path.split("/lake/")[1]).parent.joinpath("analysis.json").read_text())
    assert analysis["probe"]["recent"] == 32 and len(analysis["documents"]) == 4
    assert analysis["bos"] == "auto" and analysis["tokenization"]["bos_token_id"] == smollm2_tokenizer.bos_token_id


def test_head_ablation_preset_on_the_embedded_model(local_ray, tmp_path, smollm2_dir):
    """The study's grid on SmolLM2, heads analysed on held-out documents first; small sizes.
    Its weights from a safetensors copy (conftest.smollm2_dir): both phases' actors load them."""
    lake = str(tmp_path / "lake")
    result = kvorch(
        "submit",
        "--preset",
        "head-ablation",
        "--model",
        smollm2_dir,
        "--max-docs",
        "1",
        "--max-tokens",
        "192",
        "--lake",
        lake,
        "--no-progress",
        "--format",
        "csv",
    )
    assert result.exit_code == 0, result.output
    table = {r["name"]: r for r in csv.DictReader(io.StringIO(result.stdout))}
    assert set(table) == {
        "baseline_full_cache",
        "B_streaming_64",
        "B_streaming_128",
        "B_streaming_256",
        "B_streaming_512",
        "A_window_128",
        "C_ha_pos64_mix128_g512",
        "E_ha_no_sink",
        "F_ha_default",
        "G1_conf0.6_base128",
        "H3_base128_g256",
    }
    assert float(table["B_streaming_128"]["ppl_vs_b128_pct"]) == 0.0
    ctx = {name: float(r["effective_context"]) for name, r in table.items()}
    # 192 tokens: a 256- or 512-key context keeps everything, and so sees what the baseline sees.
    assert ctx["B_streaming_256"] == ctx["B_streaming_512"] == ctx["baseline_full_cache"]
    assert float(table["B_streaming_512"]["ppl"]) == pytest.approx(float(table["baseline_full_cache"]["ppl"]), 1e-5)
    assert ctx["B_streaming_64"] < ctx["B_streaming_128"] == ctx["A_window_128"] < ctx["baseline_full_cache"]
    assert float(table["A_window_128"]["ppl"]) > float(table["B_streaming_128"]["ppl"])  # sinks matter
    heads = kvorch("sql", "--lake", lake, "--format", "csv", "SELECT count(*) AS n, any_value(n_docs) AS d FROM heads")
    assert list(csv.DictReader(io.StringIO(heads.output))) == [{"n": str(30 * 9), "d": "4"}]


def test_heads_bad_input_says_the_fix(tmp_path):
    result = CliRunner().invoke(main, ["heads", "analyze", "--lake", str(tmp_path), "--min-position", "10"])
    assert result.exit_code == 1 and "--min-position >= --recent + --n-sink" in result.output
    result = CliRunner().invoke(main, ["heads", "show", "--lake", str(tmp_path / "empty")])
    assert result.exit_code == 1 and "run kvorch heads analyze" in result.output
    result = CliRunner().invoke(main, ["submit", "--preset", "head-ablation", "--methods", "knorm"])
    assert result.exit_code == 1 and "--preset head-ablation sets the methods" in result.output
