"""The head_aware press and per-head windows in the engine, against independent references:
StreamingLLM, an eager full-sequence forward with one explicit mask per head, and hand counts."""

from __future__ import annotations

import pytest
import torch

from orchestrator.lake.queries import metrics_of
from tests.helpers import chunk_sums, full_forward_nll, write_head_table
from workers.contract.configs import EvalConfig
from workers.contract.settings import EngineSettings
from workers.engine.core import Engine
from workers.presses import parse_method

# tiny_llama: 2 layers x 4 query heads over 2 kv-heads (heads 0,1 -> kv 0; 2,3 -> kv 1)
CLASSES = [["positional", "positional", "gathering", "mixed"], ["mixed", "gathering", "positional", "positional"]]
CONFIDENCE = [[0.9, 0.5, 0.95, 0.7], [0.55, 0.8, 1.0, 0.61]]
RECOMMENDED = [[12, 20, -1, 36], [8, 24, 16, 12]]


@pytest.fixture
def head_table(tmp_path) -> str:
    return write_head_table(tmp_path / "heads.parquet", CLASSES, CONFIDENCE, RECOMMENDED)


def rows_of(model, tokens, press_text: str, chunk: int, window: int) -> list[dict]:
    engine = Engine(model, EngineSettings(chunk, window))
    return engine.evaluate("d", tokens, [EvalConfig(parse_method(press_text))]).to_pylist()


@pytest.mark.parametrize("chunk", [16, 50])
def test_uniform_windows_equal_streaming_llm(tiny_model, tokens, head_table, chunk):
    """A context of 40 is 4 sinks + a 36-key window, whatever the engine's DMS window."""
    reference = rows_of(tiny_model, tokens, "streaming_llm", chunk, 36)
    for text in (
        "head_aware:base=40",
        f"head_aware:policy=class,heads={head_table},positional=40,mixed=40,gathering=40",
    ):
        got = rows_of(tiny_model, tokens, text, chunk, 128)
        assert [r["nll_sum"] for r in got] == pytest.approx([r["nll_sum"] for r in reference], rel=1e-6)
        for a, b in zip(got, reference, strict=True):
            for key in ("n_correct", "keys_kept", "keys_in_window", "keys_protected", "window"):
                assert a[key] == b[key], key


def test_policies_give_the_study_contexts(head_table):
    def contexts(text: str) -> list[list[int]]:
        return parse_method(text).contexts(2, 4).tolist()

    t = f"head_aware:heads={head_table},positional=16,mixed=64,gathering=512,base=128,policy="
    assert contexts(t + "uniform") == [[128] * 4] * 2
    assert contexts(t + "class") == [[16, 16, 512, 64], [64, 512, 16, 16]]
    assert contexts(t + "recommended") == RECOMMENDED
    assert contexts(t + "gated,confidence=0.6") == [[16, 128, 512, 64], [128, 512, 16, 16]]
    assert contexts(t + "inverse,confidence=0.6,gathering=256") == [[128, 128, 256, 128], [128, 256, 128, 128]]
    # A kv-head takes the widest window of its query heads; -1 (full context) wins.
    windows = parse_method(t + "recommended").head_windows(2, 4, 2)
    assert windows[0, 0] == 20 - 4 and windows[0, 1] > 10**9
    assert windows[1].tolist() == [24 - 4, 16 - 4]


def test_per_head_windows_equal_a_full_forward_with_per_head_masks(tiny_model, tokens, tmp_path):
    """Each kv-head's queries see the sinks, the keys inside its own window before the chunk and
    the chunk causally: one eager forward with that mask per query head is the reference (whose
    mask is shared by layers, so both layers get layer 0's classes here)."""
    chunk, n = 32, len(tokens)
    table = write_head_table(tmp_path / "h.parquet", [CLASSES[0]] * 2, [CONFIDENCE[0]] * 2, [RECOMMENDED[0]] * 2)
    press = parse_method(f"head_aware:policy=recommended,heads={table},n_sink=2")
    windows = press.head_windows(2, 4, 2)[0].clamp(max=n)  # per kv-head: 18, full
    i, j = torch.arange(n)[:, None], torch.arange(n)[None, :]
    chunk_start = (i // chunk) * chunk
    masks = torch.stack([(j <= i) & ((j >= chunk_start - int(windows[h // 2])) | (j < 2)) for h in range(4)])
    reference = chunk_sums(full_forward_nll(tiny_model, tokens, masks), n, chunk)
    got = rows_of(tiny_model, tokens, f"head_aware:policy=recommended,heads={table},n_sink=2", chunk, 128)
    assert [r["nll_sum"] for r in got] == pytest.approx(reference, rel=1e-4)
    assert any(r["keys_kept"] < r["keys_total"] for r in got)  # something was evicted


def test_density_and_effective_context_by_hand(tiny_model, tokens, head_table):
    """Per (layer, kv-head) window w: before chunk [s, e) the head holds min(s, sinks ∪ [s - w, s));
    effective context = mean over targets and heads of that plus the causal keys in the chunk."""
    chunk, n, n_sink = 40, len(tokens), 4
    config = EvalConfig(parse_method(f"head_aware:policy=class,heads={head_table},positional=8,mixed=24,gathering=-1"))
    windows = config.press.head_windows(2, 4, 2).clamp(max=n).flatten().tolist()
    rows = Engine(tiny_model, EngineSettings(chunk, 16)).evaluate("d", tokens, [config])
    seen = []
    for r in rows.to_pylist():
        s = r["chunk_start"]
        held = [len(set(range(min(n_sink, s))) | set(range(max(0, s - w), s))) for w in windows]
        assert r["keys_kept"] == r["keys_protected"] == sum(held)
        assert r["keys_in_window"] == sum(min(w, s) for w in windows)
        assert r["keys_total"] == s * len(windows)
        seen += [h + (i - s + 1) for i in range(s, s + r["n_tokens"]) for h in held]
    [metrics] = metrics_of(rows)
    assert metrics["effective_context"] == pytest.approx(sum(seen) / len(seen))
    assert metrics["density_compressible"] == 0


def test_bad_head_aware_parameters_say_the_fix(tiny_model, tokens, tmp_path, head_table):
    with pytest.raises(ValueError, match="needs heads=<table>.*kvorch heads analyze"):
        parse_method("head_aware:policy=class")
    with pytest.raises(ValueError, match="not found"):
        parse_method(f"head_aware:policy=class,heads={tmp_path / 'missing.parquet'}")
    with pytest.raises(ValueError, match="policy 'sideways' is unknown"):
        parse_method("head_aware:policy=sideways")
    with pytest.raises(ValueError, match="this model has"):
        parse_method(f"head_aware:policy=class,heads={head_table}").head_windows(3, 4, 2)
    with pytest.raises(ValueError, match="threshold policy"):
        Engine(tiny_model, EngineSettings(16, 16)).evaluate(
            "d",
            tokens,
            [EvalConfig(parse_method(f"head_aware:policy=class,heads={head_table}"), ratio=0.5)],
        )
