"""The wrapper presses' shared part (workers/presses/wrapping.py) against kvpress: ``press=NAME``
wraps the scorer NAME at its defaults, as kvpress's wrappers take a scorer instance at its own.

For every scorer both sides have and ChunkKV can wrap (kvpress's ChunkKV refuses attention
weights, so the attention-reading scorers run under sdpa there: knorm, keydiff, and snapkv and
tova, which compute their own), kvorch's ``chunkkv:press=NAME`` on one chunk covering the
document keeps exactly the chunks kvpress's ``ChunkKVPress(<NAME's press>)`` keeps: the wrapped
scorer, its defaults and the wrapper's reduction all agree.
"""

from __future__ import annotations

import kvpress
import pytest
import torch

from tests.helpers import tiny_llama
from tests_kvpress.capture import kvpress_kept
from workers.contract.configs import EvalConfig
from workers.contract.settings import EngineSettings
from workers.engine.core import Engine
from workers.presses import parse_method
from workers.presses.wrapping import wrapped

N, LENGTH = 192, 16
SCORERS = {
    "knorm": kvpress.KnormPress,
    "keydiff": kvpress.KeyDiffPress,
    "snapkv": kvpress.SnapKVPress,
    "tova": kvpress.TOVAPress,
}


@pytest.fixture(scope="module")
def tokens() -> torch.Tensor:
    return torch.randint(0, 97, (N,), generator=torch.Generator().manual_seed(23))


@pytest.mark.parametrize("scorer", list(SCORERS))
def test_a_wrapper_wraps_the_scorer_kvpress_wraps(tokens, scorer):
    assert wrapped("chunkkv", scorer) == parse_method(scorer)  # the scorer at its defaults
    _, scores = Engine(tiny_llama(), EngineSettings(chunk_size=N, window=N)).inspect(
        "d", tokens, [EvalConfig(parse_method(f"chunkkv:press={scorer},chunk_length={LENGTH}"), 0.0)]
    )
    ours = scores.scores[0].double()
    theirs = kvpress_kept(kvpress.ChunkKVPress(SCORERS[scorer](0.5), chunk_length=LENGTH), tokens)
    starts = range(0, N, LENGTH)
    n_kept = max(1, int(len(starts) * 0.5))
    for layer, kept in enumerate(theirs):
        per_chunk = torch.stack([ours[layer, 0, s] for s in starts])
        best = per_chunk.topk(n_kept).indices.tolist()
        assert {p for c in best for p in range(starts[c], min(starts[c] + LENGTH, N))} == kept, (scorer, layer)
