"""Agreement with the uncompressed model (KL, top-1, top-5 per chunk and config) against a naive
float64 reference, a full forward under the protocol's visibility, and the embedded model."""

from __future__ import annotations

import pyarrow as pa
import pytest
import torch

from tests.helpers import full_forward_logits, window_visible
from workers.contract.configs import EvalConfig
from workers.contract.settings import EngineSettings
from workers.contract.tokenization import resolve
from workers.engine.agreement import TOP_K, agreement_sums
from workers.engine.core import Engine
from workers.presses import parse_method
from workers.presses.baseline import BaselinePress

BASELINE = EvalConfig(BaselinePress())
WINDOW = EvalConfig(parse_method("window"))
KNORM = EvalConfig(parse_method("knorm"), -1.0)
AGREEMENT_COLUMNS = ("kl_sum", "top1_agree", "top5_overlap_sum")


def naive_agreement(reference: torch.Tensor, other: torch.Tensor) -> tuple[float, int, float]:
    """KL(softmax(reference) || softmax(other)), argmax equality and top-k overlap, summed over
    positions, in float64 from the definitions."""
    p = reference.double().log_softmax(-1)
    q = other.double().log_softmax(-1)
    kl = float((p.exp() * (p - q)).sum())
    top1 = int((reference.argmax(-1) == other.argmax(-1)).sum())
    overlap = sum(
        len(set(a.topk(TOP_K).indices.tolist()) & set(b.topk(TOP_K).indices.tolist())) / TOP_K
        for a, b in zip(reference, other, strict=True)
    )
    return kl, top1, overlap


def by_config(rows: pa.Table) -> dict[str, list[dict]]:
    out: dict[str, list[dict]] = {}
    for row in sorted(rows.to_pylist(), key=lambda r: r["chunk_index"]):
        out.setdefault(row["config"], []).append(row)
    return out


def test_agreement_sums_equal_the_definitions():
    generator = torch.Generator().manual_seed(0)
    pred = torch.randn(4, 9, 40, generator=generator) * 3
    pred[1] = pred[0]  # a config that equals the reference
    pred[2] = pred[0] + 0.01 * torch.randn(9, 40, generator=generator)  # one that barely moved
    counted = torch.tensor([True] * 6 + [False] * 3)
    kl, top1, top5 = agreement_sums(pred, torch.logsumexp(pred, -1), 0, counted)
    for r in range(4):
        want_kl, want_top1, want_top5 = naive_agreement(pred[0, :6], pred[r, :6])
        assert float(kl[r]) == pytest.approx(want_kl, rel=1e-4, abs=1e-7)
        assert int(top1[r]) == want_top1 and float(top5[r]) == pytest.approx(want_top5)
    assert float(kl[0]) == float(kl[1]) == 0.0  # exactly: a config equal to baseline
    assert 0 < float(kl[2]) < 1e-2 < float(kl[3])


def test_window_rows_equal_a_full_forward_under_the_protocols_visibility(tiny_model, tokens):
    """Each chunk's agreement sums against two independent full forwards: the causal one
    (baseline) and one masked to what the window press leaves visible."""
    chunk, window = 16, 8
    n = len(tokens)
    rows = by_config(Engine(tiny_model, EngineSettings(chunk, window)).evaluate("d", tokens, [BASELINE, WINDOW]))
    full = full_forward_logits(tiny_model, tokens)
    windowed = full_forward_logits(tiny_model, tokens, window_visible(n, chunk, window))
    for row in rows["window"]:
        s, end = row["chunk_start"], row["chunk_start"] + row["n_tokens"]
        kl, top1, top5 = naive_agreement(full[s:end], windowed[s:end])
        assert row["kl_sum"] == pytest.approx(kl, rel=1e-3, abs=1e-5)
        assert (row["top1_agree"], row["top5_overlap_sum"]) == (top1, pytest.approx(top5))
    for row in rows["baseline"]:
        assert (row["kl_sum"], row["top1_agree"], row["top5_overlap_sum"]) == (0.0, row["n_tokens"], row["n_tokens"])
    assert sum(r["kl_sum"] for r in rows["window"]) > 0


@pytest.mark.parametrize("graph", [False, True])
def test_a_batch_without_baseline_gets_it_as_a_hidden_reference(tiny_model, tokens, graph):
    settings = EngineSettings(16, 8, static=graph)
    with_baseline = by_config(Engine(tiny_model, settings).evaluate("d", tokens, [BASELINE, WINDOW, KNORM]))
    hidden = by_config(Engine(tiny_model, settings).evaluate("d", tokens, [WINDOW, KNORM]))
    assert set(hidden) == {"window", "knorm@-1"}  # the reference row is not written
    for config, rows in hidden.items():
        for got, want in zip(rows, with_baseline[config], strict=True):
            assert got["batch_size"] == want["batch_size"] == 3  # the forward ran three rows
            # float32 within 1e-6, as the held cache against the masked one: the chunks every row
            # shares ran in the first band, here the window's pool, there the baseline's full band
            assert got["nll_sum"] == pytest.approx(want["nll_sum"], rel=1e-6)
            for column in AGREEMENT_COLUMNS:  # KL amplifies that rounding (tests/test_chunk_step.py)
                assert got[column] == pytest.approx(want[column], rel=1e-4, abs=1e-5), (config, column)
    assert any(r["kl_sum"] > 0 for r in hidden["window"])


def test_agreement_off_leaves_the_columns_null_and_the_numbers_alone(tiny_model, tokens):
    on = by_config(Engine(tiny_model, EngineSettings(16, 8)).evaluate("d", tokens, [WINDOW]))
    off = by_config(Engine(tiny_model, EngineSettings(16, 8, agreement=False)).evaluate("d", tokens, [WINDOW]))
    assert [r["nll_sum"] for r in on["window"]] == pytest.approx([r["nll_sum"] for r in off["window"]], rel=1e-9)
    assert {r[c] for r in off["window"] for c in AGREEMENT_COLUMNS} == {None}
    assert {r["batch_size"] for r in off["window"]} == {1}


@pytest.fixture(scope="module")
def embedded_document(smollm2_tokenizer) -> torch.Tensor:
    from orchestrator.corpus import load_corpus

    text = load_corpus("pydoc")[0].text
    return torch.tensor(resolve(smollm2_tokenizer, "auto").ids(text, 512))


def test_on_the_embedded_model_baseline_agrees_with_itself_and_a_smaller_window_diverges_more(
    smollm2, embedded_document
):
    """Done means of the agreement columns: baseline against itself is KL 0 and agreement 1;
    window-only is KL > 0, and more so at a smaller window."""
    kl = {}
    for window in (64, 256):
        rows = by_config(
            Engine(smollm2, EngineSettings(64, window)).evaluate("d", embedded_document, [BASELINE, WINDOW])
        )
        tokens = sum(r["n_tokens"] for r in rows["baseline"])
        base = rows["baseline"]
        assert sum(r["kl_sum"] for r in base) == 0.0
        assert sum(r["top1_agree"] for r in base) == sum(r["top5_overlap_sum"] for r in base) == tokens
        kl[window] = sum(r["kl_sum"] for r in rows["window"]) / tokens
        assert sum(r["top1_agree"] for r in rows["window"]) < tokens
    assert kl[64] > kl[256] > 0
