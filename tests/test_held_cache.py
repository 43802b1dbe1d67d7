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
    assert again[0]["kv_cache_bytes"] < 0.8 * expected[0]["kv_cache_bytes"]
    _, masked_scores = masked.inspect("d", doc, configs)
    _, held_scores = held.inspect("d", doc, configs)
    kept_scores_equal(masked_scores, held_scores)


def test_a_document_that_needs_more_slots_runs_again_and_loses_no_key(model, doc, capsys):
    """A threshold config told it holds almost nothing overflows its band: the document runs
    again with more slots, and the rows are the masked cache's."""
    configs = [EvalConfig(parse_method("knorm"), -4.0), EvalConfig(parse_method("random"), 0.3)]
    masked = Engine(model, EngineSettings(CHUNK, WINDOW, cache="masked"))
    held = Engine(model, EngineSettings(CHUNK, WINDOW))
    held.densities = {c.label: 0.0 for c in configs}
    expected = masked.evaluate("d", doc, configs).to_pylist()
    assert_same_numbers(expected, held.evaluate("d", doc, configs).to_pylist())
    assert "held more keys than its cache had slots for; running the document again" in capsys.readouterr().err
    assert all(held.densities[c.label] > 0.1 for c in configs)


def test_held_bytes_follow_the_kept_keys(model):
    """Memory on record: a window config's bytes are its window plus a chunk, rounded to whole
    chunks, and ``kv_cache_bytes`` reports them; the baseline holds every position."""
    n = 1000
    tokens = torch.randint(0, 97, (n,), generator=torch.Generator().manual_seed(5))
    engine = Engine(model, EngineSettings(CHUNK, WINDOW, agreement=False))
    for name, slots in (("window", capacity.slots(WINDOW, CHUNK, n)), ("baseline", n)):
        rows = engine.evaluate("d", tokens, [EvalConfig(parse_method(name))]).to_pylist()
        per_slot = 2 * 2 * 2 * 8 * 4  # layers x kv-heads x (keys, values) x head_dim x float32
        assert {r["kv_cache_bytes"] for r in rows} == {slots * per_slot}
    assert capacity.slots(WINDOW, CHUNK, n) <= 1.25 * (WINDOW + CHUNK) + CHUNK


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
    assert capacity.slots(None, 128, 4096) == 4096
    assert capacity.slots(300, 128, 4096) == 448  # 428 rounded up to 7 x 64
    assert capacity.slots(132, 128, 16384) == 320  # streaming_llm at 16k: 260 up to 5 x 64
    assert capacity.slots(5000, 128, 4096) == 4096
    for need in range(5, 5000):
        assert need <= capacity.slots(need - 1, 1, 10**6) <= 1.25 * need
    with pytest.raises(ValueError, match="unknown cache 'dense'; use one of held, masked"):
        EngineSettings(cache="dense")
