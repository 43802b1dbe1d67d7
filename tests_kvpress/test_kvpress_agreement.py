"""kvorch's native scorers against their kvpress counterparts on one prefill.

kvpress scores the keys of one prefill call; kvorch with a chunk covering the whole document
(a first chunk starting at position 0) scores the same keys with the same queries. kvpress's
scores are captured from its own hooks (``with press(model)``) on a plain eager transformers
forward of a separate copy of the tiny model, so nothing of kvorch's attention, RoPE or cache
takes part in them. The two must rank every layer's and kv-head's keys the same way (Spearman
>= 0.99) over the positions where both define a real score: the positions a press protects are
+inf in kvorch and ``max + 1`` in kvpress, so they are checked to be the top of both instead.
"""

from __future__ import annotations

from functools import partial

import kvpress
import pytest
import torch

from tests.helpers import tiny_llama
from tests_kvpress.capture import kvpress_scores, spearman
from workers.contract.configs import EvalConfig
from workers.contract.settings import EngineSettings
from workers.engine.core import Engine
from workers.presses import parse_method

N = 192
SNAP_WINDOW = 32

# kvorch method, a fresh kvpress press (a nonzero ratio, else kvpress never calls score), and the
# first and one-past-last positions both score for real. Outside them: SnapKV's observation window
# (the last SNAP_WINDOW keys), TOVA's last key, Expected Attention's 4 sinks.
PAIRS = {
    "knorm": ("knorm", partial(kvpress.KnormPress, 0.5), 0, N),
    "snapkv": (
        f"snapkv:window_size={SNAP_WINDOW}",
        partial(kvpress.SnapKVPress, 0.5, window_size=SNAP_WINDOW),
        0,
        N - SNAP_WINDOW,
    ),
    "tova": ("tova", partial(kvpress.TOVAPress, 0.5), 0, N - 1),
    "observed_attention": ("observed_attention", partial(kvpress.ObservedAttentionPress, 0.5), 0, N),
    # stats=running over one chunk is every query but the document's first n_sink, as kvpress's
    # statistics over the call; kvorch's future positions start at the chunk's end, kvpress's at
    # q_len: the same for a first chunk.
    "expected_attention": ("expected_attention:stats=running", partial(kvpress.ExpectedAttentionPress, 0.5), 4, N),
}


@pytest.fixture(scope="module")
def tokens():
    return torch.randint(0, 97, (N,), generator=torch.Generator().manual_seed(17))


@pytest.fixture(scope="module")
def kvorch_scores(tokens):
    """{name: [layers, kv-heads, N]} from one Engine.inspect with every method as a config."""
    configs = [EvalConfig(parse_method(method), 0.0) for method, *_ in PAIRS.values()]
    _, scores = Engine(tiny_llama(), EngineSettings(chunk_size=N, window=N)).inspect("d", tokens, configs)
    return {name: scores.scores[i].double() for i, name in enumerate(PAIRS)}


@pytest.mark.parametrize("name", list(PAIRS))
def test_native_press_ranks_keys_as_kvpress_does(name, tokens, kvorch_scores):
    _, make_press, lo, hi = PAIRS[name]
    ours, theirs = kvorch_scores[name], kvpress_scores(make_press(), tokens)
    assert ours.shape == theirs.shape
    assert torch.isfinite(ours[..., lo:hi]).all()
    # Protected positions: +inf in kvorch, above every real score in kvpress.
    outside = torch.ones(N, dtype=torch.bool)
    outside[lo:hi] = False
    assert torch.isinf(ours[..., outside]).all()
    if outside.any():
        assert theirs[..., outside].amin(dim=-1).gt(theirs[..., lo:hi].amax(dim=-1)).all()
    rho = [[spearman(o[lo:hi], t[lo:hi]) for o, t in zip(ours_l, theirs_l)] for ours_l, theirs_l in zip(ours, theirs)]
    assert min(min(layer) for layer in rho) >= 0.99, f"{name}: Spearman per [layer][kv-head] {rho}"
    # For a first chunk no convention differs, so the values agree too (measured: float32 rounding,
    # relative differences < 1e-6); ranks alone would let a uniform rescaling through.
    torch.testing.assert_close(ours[..., lo:hi], theirs[..., lo:hi], rtol=1e-4, atol=1e-7)
