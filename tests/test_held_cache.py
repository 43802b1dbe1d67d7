"""The held cache (workers/engine/cache.py) against the masked one, its independent reference:
the masked cache keeps every position and masks what a config evicted, the held one keeps only
what the config still holds. Same keys kept, same NLL (float32, relative 1e-6), for every
built-in press and policy, on both execution paths and on every family; and the held cache
really holds less, and never drops a key when a document needs more slots than it was given."""

from __future__ import annotations

import pytest
import torch

from tests.families import FAMILIES, NEEDS_ROPE, PRESSES, document, tiny_decoder
from tests.helpers import tiny_llama
from tests.test_chunk_step import CHUNK, WINDOW, assert_same_numbers, every_builtin_config, surrogate_dir  # noqa: F401
from workers.contract.allocation import Allocation
from workers.contract.configs import EvalConfig
from workers.contract.settings import EngineSettings
from workers.engine import capacity
from workers.engine.core import Engine
from workers.presses import parse_method


@pytest.fixture(scope="module")
def model():
    return tiny_llama()


@pytest.fixture(scope="module")
def doc() -> torch.Tensor:
    return torch.randint(0, 97, (250,), generator=torch.Generator().manual_seed(2))


def kept_scores_equal(a, b) -> None:
    """Keep masks equal; scores equal where the key is still held (an evicted key's later
    rescoring reads a key the held cache no longer has, and no rule reads that score)."""
    assert a.configs == b.configs
    assert torch.equal(a.kept, b.kept)
    torch.testing.assert_close(
        torch.where(a.kept, a.scores, 0.0), torch.where(b.kept, b.scores, 0.0), rtol=1e-6, atol=1e-6, equal_nan=True
    )


@pytest.mark.parametrize("static", [False, True], ids=["exact", "static"])
def test_every_press_and_policy_keeps_the_masked_caches_keys_and_nll(model, doc, surrogate_dir, static):  # noqa: F811
    """The held engine runs the document once to learn what its threshold configs hold, then
    again with held bands for every config but the baseline: rows, keep masks and scores as the
    masked cache's."""
    configs = every_builtin_config(surrogate_dir)
    masked = Engine(model, EngineSettings(CHUNK, WINDOW, cache="masked", static=static))
    held = Engine(model, EngineSettings(CHUNK, WINDOW, cache="held", static=static))
    expected = masked.evaluate("d", doc, configs).to_pylist()
    first = held.evaluate("d", doc, configs).to_pylist()  # ranked and structural configs held already
    assert_same_numbers(expected, first)
    again = held.evaluate("d", doc, configs).to_pylist()
    assert_same_numbers(expected, again)
    step, _ = held.step_for(configs, doc, agreement=True)
    assert sum(band.size for band in step.bands if not band.full) >= len(configs) // 3
    # whole pages of 64 slots per (row, layer, kv-head) on a 250-token document: still less
    assert again[0]["kv_cache_bytes"] < 0.9 * expected[0]["kv_cache_bytes"]
    _, masked_scores = masked.inspect("d", doc, configs)
    _, held_scores = held.inspect("d", doc, configs)
    kept_scores_equal(masked_scores, held_scores)


@pytest.mark.parametrize("static", [False, True], ids=["exact", "static"])
def test_a_document_that_needs_more_slots_loses_no_key(model, doc, capsys, static):
    """Threshold configs told they hold almost nothing: at exact shapes their pool grows between
    chunks (no rerun); at static shapes it overflows and the document runs again with more pages.
    Either way the rows are the masked cache's."""
    configs = [EvalConfig(parse_method("knorm"), -4.0), EvalConfig(parse_method("random"), 0.3)]
    masked = Engine(model, EngineSettings(CHUNK, WINDOW, cache="masked", static=static))
    held = Engine(model, EngineSettings(CHUNK, WINDOW, static=static))
    held.densities = {c.label: [0.0, 0.0] for c in configs}  # per layer
    expected = masked.evaluate("d", doc, configs).to_pylist()
    assert_same_numbers(expected, held.evaluate("d", doc, configs).to_pylist())
    rerun = "held more keys than its cache had slots for; running the document again" in capsys.readouterr().err
    assert rerun == static
    assert all(min(held.densities[c.label]) > 0.1 for c in configs)
    step, _ = held.last_run
    assert any(band.grows for band in step.bands if not band.full) == (not static)


def test_held_bytes_follow_the_kept_keys(model):
    """Memory on record: a window config's pool holds, per layer, its window plus a chunk per
    kv-head in whole pages, and ``kv_cache_bytes`` reports them; the baseline holds every position."""
    n = 1000
    tokens = torch.randint(0, 97, (n,), generator=torch.Generator().manual_seed(5))
    engine = Engine(model, EngineSettings(CHUNK, WINDOW, agreement=False))
    page = capacity.page_size(2 * WINDOW, 2, CHUNK)
    window_slots = capacity.pages_for(2 * WINDOW, 2, CHUNK, page) * page  # per layer, both kv-heads
    for name, slots in (("window", window_slots), ("baseline", 2 * n)):
        rows = engine.evaluate("d", tokens, [EvalConfig(parse_method(name))]).to_pylist()
        per_slot = 2 * 2 * 8 * 4  # layers x (keys, values) x head_dim x float32
        assert {r["kv_cache_bytes"] for r in rows} == {slots * per_slot}
    assert window_slots <= 2 * (WINDOW + CHUNK + page)


@pytest.mark.parametrize("family", FAMILIES)
def test_every_family_keeps_the_masked_caches_keys_and_nll(family):
    """Each family's windows, soft-caps and RoPE, held against masked, ratio policy included."""
    model, tokens = tiny_decoder(family), document()
    has_rope = getattr(model.base_model, "rotary_emb", None) is not None
    presses = [p for p in PRESSES if has_rope or p not in NEEDS_ROPE]
    configs = [EvalConfig(press, press.default_thresholds[0]) for press in map(parse_method, presses)]
    configs += [EvalConfig(parse_method("knorm"), ratio=0.5), EvalConfig(parse_method("random"), budget=40)]
    masked = Engine(model, EngineSettings(16, 8, cache="masked")).evaluate("d", tokens, configs).to_pylist()
    held = Engine(model, EngineSettings(16, 8))
    held.evaluate("d", tokens, configs)  # learns what the threshold configs hold
    for a, b in zip(masked, held.evaluate("d", tokens, configs).to_pylist(), strict=True):
        assert (b["config"], b["keys_kept"], b["n_correct"]) == (a["config"], a["keys_kept"], a["n_correct"])
        assert b["nll_sum"] == pytest.approx(a["nll_sum"], rel=1e-6, abs=1e-9)


def test_policy_bounds():
    """The bound each policy fixes (the rule of workers/engine/decisions.py at the last chunk)."""
    assert capacity.policy_bound("ratio", 0.25, None, None, None, 20, 1000) == 250
    assert capacity.policy_bound("ratio", 0.01, None, None, None, 20, 1000) == 20  # floor: sinks + window
    assert capacity.policy_bound("budget", 1.0, 64, None, None, 20, 1000) == 64
    assert capacity.policy_bound("threshold", 1.0, None, None, float("-inf"), 20, 1000) == 20
    assert capacity.policy_bound("threshold", 1.0, None, None, float("inf"), 20, 1000) == 1000
    assert capacity.policy_bound("threshold", 1.0, None, float("-inf"), None, 20, 1000) == 1000
    assert capacity.policy_bound("threshold", 1.0, None, 0.5, None, 20, 1000) is None
    # pages of a row's pool in one layer: every head's keys and one write, each head on its own pages
    assert capacity.pages_for(3 * 100, 3, 128, 64) == 13  # (300 + 3 x (128 + 63)) // 64: each head needs 4
    assert capacity.pages_for(0, 1, 1, 32) == 1
    for page in (32, 64):
        for held in range(0, 400, 7):
            for split in range(held + 1):  # any split between two heads fits
                need = -(-(split + 16) // page) + -(-(held - split + 16) // page)
                assert need <= capacity.pages_for(held, 2, 16, page)
    # page size: the largest power of two from 32 to 256 at most a quarter of an owner's mean need
    assert capacity.page_size(0, 4, 1) == 32 and capacity.page_size(4 * 10**6, 4, 128) == 256
    for mean in range(0, 3000, 13):
        page = capacity.page_size(3 * mean, 3, 0)
        assert page in (32, 64, 128, 256) and (page == 32 or 4 * page <= mean) and (page == 256 or 8 * page > mean)
    for need in range(1, 5000):
        assert need <= capacity.rounded(need) <= 1.125 * need
    with pytest.raises(ValueError, match="unknown cache 'dense'; use one of held, masked"):
        EngineSettings(cache="dense")


@pytest.mark.parametrize("static", [False, True], ids=["exact", "static"])
def test_each_config_holds_at_most_a_quarter_more_than_it_needs(model, static):
    """Memory, read from the allocated tensors: per config, the slots of its pool are at most
    1.25 x what it needed, summed over (layer, kv-head): the most its kv-heads held before a chunk
    (kept, sinks and window included) plus the chunk each writes. For a threshold config (whose
    first document, at exact shapes, grows its pool from empty) and a ratio config under adakv
    (whose heads' budgets move), on each document. Static shapes hold more for a threshold config:
    its first document holds every position (its step is then rebuilt once for what it keeps),
    later ones 1.25 x what the scores kept before (room for denser documents, where a rerun costs
    a compile) rounded to few pool sizes (at most 1.125x: each size is a compiled graph)."""
    chunk, window, n = 64, 64, 2000
    tokens = torch.randint(0, 97, (n,), generator=torch.Generator().manual_seed(9))
    knorm = parse_method("knorm")
    configs = [EvalConfig(knorm, -0.3), EvalConfig(knorm, ratio=0.6, allocation=Allocation("adakv"))]
    for config in configs:
        engine = Engine(model, EngineSettings(chunk, window, static=static, agreement=False))
        for doc in ("d", "e", "f"):
            engine.evaluate(doc, tokens, [config])
            step, _ = engine.last_run
            if static and doc == "d" and config.policy == "threshold":
                assert step.bands[0].full  # not run before: every position
                continue
            [band] = step.bands
            slots = sum(layer[0].positions.numel() for layer in step.state.cache)
            peaks, _ = step.held_back()
            need = sum(peaks[0]) + step.n_layers * step.n_kv_heads * chunk
            assert need < n * step.n_layers * step.n_kv_heads / 2  # the config evicts
            bound = 1.25 * 1.125 if static and config.policy == "threshold" else 1.25
            assert slots <= bound * need, (config.label, doc, slots / need)
