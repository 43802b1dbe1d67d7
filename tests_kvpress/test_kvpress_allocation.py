"""kvorch's adakv allocation against kvpress's AdaKVPress on one prefill.

kvpress's AdaKVPress wraps a scorer, keeps the top ``alpha_safeguard`` share of each head's budget,
then the global top-k over the layer's heads, and records what it evicts in each attention module's
``masked_key_indices`` (its head-wise masking); kvorch with one chunk covering the document, no
window and the same compression ratio must keep exactly the keys kvpress does not mask, in every
layer and kv-head. kvpress runs on a plain transformers forward of a separate copy of the tiny model.
"""

from __future__ import annotations

from functools import partial

import kvpress
import pytest
import torch
from transformers import DynamicCache

from tests.helpers import tiny_llama
from workers.contract.allocation import Allocation
from workers.contract.configs import EvalConfig
from workers.contract.settings import EngineSettings
from workers.engine.core import Engine
from workers.presses import parse_method

N, RATIO, SNAP_WINDOW = 192, 0.5, 32

SCORERS = {
    "knorm": ("knorm", partial(kvpress.KnormPress, RATIO)),
    "snapkv": (f"snapkv:window_size={SNAP_WINDOW}", partial(kvpress.SnapKVPress, RATIO, window_size=SNAP_WINDOW)),
}


@pytest.fixture(scope="module")
def tokens():
    return torch.randint(0, 97, (N,), generator=torch.Generator().manual_seed(23))


def kvpress_kept(press: kvpress.AdaKVPress, tokens: torch.Tensor) -> torch.Tensor:
    """[layers, kv-heads, N] bool: the keys AdaKVPress left unmasked after one prefill."""
    model = tiny_llama()
    model.set_attn_implementation("sdpa")  # AdaKVPress refuses eager
    with press(model), torch.no_grad():
        model(tokens[None], past_key_values=DynamicCache(config=model.config))
    kept = torch.ones(model.config.num_hidden_layers, model.config.num_key_value_heads, N, dtype=torch.bool)
    for i, layer in enumerate(model.model.layers):
        batch, heads, positions = layer.self_attn.masked_key_indices
        assert (batch == 0).all()
        kept[i, heads, positions] = False
    return kept


@pytest.mark.parametrize("name", list(SCORERS))
def test_adakv_keeps_what_kvpress_adakv_keeps(name, tokens):
    method, make_scorer = SCORERS[name]
    config = EvalConfig(parse_method(method), ratio=RATIO, allocation=Allocation("adakv"))
    _, ours = Engine(tiny_llama(), EngineSettings(chunk_size=N, window=0)).inspect("d", tokens, [config])
    theirs = kvpress_kept(kvpress.AdaKVPress(make_scorer(), alpha_safeguard=0.2), tokens)
    kept = ours.kept[0]
    assert kept.sum().item() == theirs.sum().item() == round(N * (1 - RATIO)) * kept.shape[0] * kept.shape[1]
    counts = kept.sum(dim=-1)
    assert (counts.amin(dim=-1) < counts.amax(dim=-1)).any(), "the budgets never moved between heads"
    assert torch.equal(kept, theirs)
