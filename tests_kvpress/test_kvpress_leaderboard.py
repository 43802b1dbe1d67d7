"""The leaderboard's native presses (issue 37) against kvpress's own implementations, on one
prefill, as tests_kvpress/test_kvpress_agreement.py does for the original ones.

kvorch runs one chunk covering the document (a first chunk: no convention differs) with the DMS
window over all of it, so nothing is decided and every key holds the score of that one call;
kvpress's scores are captured from its hooks on a plain eager forward of a separate copy of the
tiny model. Over the positions both score for real, the ranks must agree (Spearman 1.000, to
three decimals) and, where the two compute the same numbers, the values too.
"""

from __future__ import annotations

import kvpress
import pytest
import torch
from transformers import DynamicCache

from tests.helpers import tiny_llama
from tests_kvpress.capture import kvpress_kept, kvpress_scores, spearman
from workers.contract.configs import EvalConfig
from workers.contract.settings import EngineSettings
from workers.engine.core import Engine
from workers.presses import parse_method

N = 192


@pytest.fixture(scope="module")
def tokens() -> torch.Tensor:
    return torch.randint(0, 97, (N,), generator=torch.Generator().manual_seed(17))


def kvorch_scores(method: str, tokens: torch.Tensor) -> torch.Tensor:
    """[layers, kv-heads, N]: the scores of one chunk covering the document."""
    _, scores = Engine(tiny_llama(), EngineSettings(chunk_size=N, window=N)).inspect(
        "d", tokens, [EvalConfig(parse_method(method), 0.0)]
    )
    return scores.scores[0].double()


def assert_same_ranks(ours: torch.Tensor, theirs: torch.Tensor, lo: int, hi: int) -> None:
    assert ours.shape == theirs.shape
    assert torch.isfinite(ours[..., lo:hi]).all()
    rho = [[spearman(o[lo:hi], t[lo:hi]) for o, t in zip(ol, tl)] for ol, tl in zip(ours, theirs)]
    assert min(min(layer) for layer in rho) >= 0.9995, f"Spearman per [layer][kv-head] {rho}"


def test_keydiff_is_kvpress_keydiff(tokens):
    ours, theirs = kvorch_scores("keydiff", tokens), kvpress_scores(kvpress.KeyDiffPress(0.5), tokens)
    assert_same_ranks(ours, theirs, 0, N)
    torch.testing.assert_close(ours, theirs, rtol=1e-4, atol=1e-6)


def test_lagkv_ranks_each_partition_as_kvpress_does(tokens):
    """lag 32 after 4 sinks: partitions [4, 36), ..., [100, 132) have a complete reference;
    kvpress keeps the sinks and the tail [132, N) with score 1, kvorch with +inf."""
    ours = kvorch_scores("lagkv:lag_size=32", tokens)
    theirs = kvpress_scores(kvpress.LagKVPress(0.5, n_sink=4, lag_size=32), tokens)
    assert torch.equal(ours[..., 4:132], theirs[..., 4:132])  # rank / lag_size: exactly the same
    assert torch.isinf(ours[..., :4]).all() and torch.isinf(ours[..., 132:]).all()
    assert (theirs[..., :4] == 1).all() and (theirs[..., 132:] == 1).all()


@pytest.fixture
def exact_cholesky(monkeypatch):
    """kvpress's Cholesky with its jitter (0.01 x I, not negligible against the Gram matrix of
    the tiny model's small keys) switched off: with a sketch of head_dim (8) columns the Gram
    matrix is full rank and kvpress's leverage is then the exact one kvorch computes."""
    factor = kvpress.LeverageScorePress.chol_with_jitter
    monkeypatch.setattr(
        kvpress.LeverageScorePress, "chol_with_jitter", staticmethod(lambda g, jitter, max_tries: factor(g, 0.0, 1))
    )


def test_leverage_ranks_keys_as_kvpress_does(tokens, exact_cholesky):
    torch.manual_seed(0)
    ours = kvorch_scores("leverage", tokens)
    theirs = kvpress_scores(kvpress.LeverageScorePress(0.5, sketch_dimension=8), tokens)
    assert_same_ranks(ours, theirs, 0, N)
    # values: the float32 rounding of kvpress's random sketch (measured up to 0.0075 on z-scores)
    torch.testing.assert_close(ours, theirs, rtol=0, atol=1e-2)


def test_compactor_ranks_keys_as_kvpress_does(tokens, exact_cholesky):
    """kvpress's non-causal attention tiles of chunk_size = the scored span (N - 8 - 4), one tile
    as kvorch's one chunk; blending given on both sides."""
    torch.manual_seed(0)
    ours = kvorch_scores("compactor:sink_size_end=4,blending=0.5", tokens)
    theirs = kvpress_scores(
        kvpress.CompactorPress(0.5, sink_size_end=4, chunk_size=N - 12, sketch_dimension=8, blending=0.5), tokens
    )
    assert_same_ranks(ours, theirs, 8, N - 4)
    assert torch.isinf(ours[..., :8]).all() and torch.isinf(ours[..., N - 4 :]).all()
    torch.testing.assert_close(ours[..., 8 : N - 4], theirs[..., 8 : N - 4], rtol=0, atol=1e-3)  # measured 1.1e-4


@pytest.mark.parametrize(
    ("scorer", "make_scorer", "hi"), [("knorm", kvpress.KnormPress, N), ("snapkv", kvpress.SnapKVPress, N - 64)]
)
def test_criticalkv_reweights_as_kvpress_does(tokens, scorer, make_scorer, hi):
    """kvpress's CriticalKV with first_stage_ratio=0: its second stage, the one kvorch runs
    (SnapKV's observation window, the last 64 keys, is +inf in kvorch and left out)."""
    ours = kvorch_scores(f"criticalkv:press={scorer}", tokens)
    theirs = kvpress_scores(kvpress.CriticalKVPress(make_scorer(0.5), first_stage_ratio=0.0), tokens)
    assert_same_ranks(ours, theirs, 0, hi)
    torch.testing.assert_close(ours[..., :hi], theirs[..., :hi], rtol=1e-4, atol=1e-7)


def test_criticalkv_keeps_what_kvpress_two_stages_keep(tokens):
    """kvpress's CriticalKV at its default first_stage_ratio=0.5, ratio 0.5 on one prefill (window
    0, no sinks, N x 0.5 whole): the top 48 keys by knorm, then 48 more by the reweighted score;
    kvorch's ratio policy keeps the same keys in every (layer, kv-head)."""
    config = EvalConfig(parse_method("criticalkv:press=knorm,n_sink=0,protected_window=0"), ratio=0.5)
    _, ours = Engine(tiny_llama(), EngineSettings(chunk_size=N, window=0)).inspect("d", tokens, [config])
    theirs = kvpress_scores(kvpress.CriticalKVPress(kvpress.KnormPress(0.5)), tokens)
    kept = torch.zeros_like(theirs, dtype=torch.bool).scatter_(-1, theirs.topk(N // 2, dim=-1).indices, True)
    assert torch.equal(ours.kept[0], kept)
    one_stage = kvpress_scores(kvpress.CriticalKVPress(kvpress.KnormPress(0.5), first_stage_ratio=0.0), tokens)
    second_only = torch.zeros_like(kept).scatter_(-1, one_stage.topk(N // 2, dim=-1).indices, True)
    assert not torch.equal(kept, second_only), "the first stage never changed what was kept"


@pytest.mark.parametrize("length", [20, 16])
def test_chunkkv_keeps_kvpress_chunks(tokens, length):
    """kvpress keeps the top int(n_chunks x (1 - 0.5)) chunks by the scorer's summed score; the
    same number of kvorch's best-scoring chunks (each key scores its chunk's mean) are the same."""
    ours = kvorch_scores(f"chunkkv:press=knorm,chunk_length={length}", tokens)
    theirs = kvpress_kept(kvpress.ChunkKVPress(kvpress.KnormPress(0.5), chunk_length=length), tokens)
    starts = range(0, N, length)
    n_kept = max(1, int(len(starts) * 0.5))
    for layer, kept in enumerate(theirs):
        per_chunk = torch.stack([ours[layer, :, s] for s in starts], dim=-1)  # [kv-heads, chunks]
        assert (per_chunk == per_chunk[0]).all()  # one score per chunk, every kv-head alike
        best = per_chunk[0].topk(n_kept).indices.tolist()
        assert {p for c in best for p in range(starts[c], min(starts[c] + length, N))} == kept


def test_qfilter_scores_as_kvpress_does_with_the_same_filters(tokens, tmp_path, monkeypatch):
    """kvorch's measured filters, saved in kvpress's QFilters format, given to kvpress's
    QFilterPress (instead of the ones it downloads by model name): the same scores."""
    from workers.studies.qfilters import measure_qfilters, save_qfilters

    filters = measure_qfilters(Engine(tiny_llama(), EngineSettings(64, 0)).observe, [tokens], 2)
    save_qfilters(filters, tmp_path)
    ours = kvorch_scores(f"qfilter:path={tmp_path}", tokens)
    monkeypatch.setattr(kvpress.QFilterPress, "post_init_from_model", lambda self, model: None)
    press = kvpress.QFilterPress(0.5)
    press.q_filters = filters
    theirs = kvpress_scores(press, tokens)
    assert_same_ranks(ours, theirs, 0, N)
    torch.testing.assert_close(ours, theirs, rtol=1e-4, atol=1e-6)


class CharTokenizer:
    """A tokenizer for the tiny model, for kvpress's KVzipPress (which loads one by model name):
    one id per character, no chat template."""

    chat_template = None

    def encode(self, text: str, return_tensors: str | None = None, add_special_tokens: bool = True):
        ids = [ord(c) % 97 for c in text]
        return torch.tensor([ids]) if return_tensors == "pt" else ids


def test_kvzip_scores_the_context_as_kvpress_does(tokens, monkeypatch):
    """kvpress's KVzipPress replays the context after its repeat prompt through the cache and
    keeps the largest attention each key gets; kvorch's replay, given the prompt ids its
    repeat_prompt_ids builds from the same tokenizer, scores the same (one replay chunk: the
    context is shorter than kvpress's chunk_size)."""
    from kvpress.presses import kvzip_press

    from workers.engine.replay import context_scores
    from workers.presses.kvzip import repeat_prompt_ids

    tokenizer = CharTokenizer()
    monkeypatch.setattr(kvzip_press.AutoTokenizer, "from_pretrained", staticmethod(lambda name: tokenizer))
    press = kvpress.KVzipPress(compression_ratio=0.5)
    captured = []
    compress_post = press.compress_post

    def recording(model):
        captured.append(press.score_val[:, 0].double().clone())  # before the sinks get the top score
        return compress_post(model)

    object.__setattr__(press, "compress_post", recording)
    model = tiny_llama()
    model.set_attn_implementation("sdpa")  # kvpress refuses eager for KVzip
    with press(model), torch.no_grad():
        model(input_ids=tokens[None], past_key_values=DynamicCache(config=model.config))
    [theirs] = captured
    prompt = torch.tensor(repeat_prompt_ids(tokenizer))
    ours = context_scores(Engine(tiny_llama(), EngineSettings(64, 0)).hooked, tokens, prompt).double()
    assert_same_ranks(ours, theirs, 0, N)
    torch.testing.assert_close(ours, theirs, rtol=1e-4, atol=1e-7)
