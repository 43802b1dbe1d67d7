"""Generated answers against kvpress's own pipeline, run for real in the kvpress environment.

kvpress's ``KVPressTextGenerationPipeline`` prefills the context under a press (compressing it
once), reads the question on the compressed cache and decodes greedily with no further eviction;
a ``DecodingPress`` instead leaves the prefill alone and compresses the cache to ``target_size``
every ``compression_interval`` decoding forwards. kvorch's ``--protocol once`` (query-agnostic,
``--no-decode-eviction``) and its budget policy while decoding are the same protocols, under
kvpress's conventions: no protected window (``--window 0``) and the press's own sinks.

The pipeline's ``_forward`` and ``generate_answer`` run as they are, on token ids: the only
stand-in is a tokenizer whose ``decode`` spells the ids out, so kvorch's ids are compared with
kvpress's, not two decodings of them. Both sides run separate copies of the same random-weight
tiny Llama; kvpress through plain transformers attention over its pruned DynamicCache.

Where kvorch departs from kvpress on purpose, a test names the difference and shows its effect:
kvorch's StreamingLLM keeps sinks + its protected window (kvpress: sinks + the last n_kept - n_sink),
and kvorch's ratio keeps ceil((1 - r) n) keys where kvpress keeps int((1 - r) n).
"""

from __future__ import annotations

import kvpress
import pytest
import torch
from kvpress.pipeline import KVPressTextGenerationPipeline

from tests.helpers import tiny_llama
from workers.contract.configs import EvalConfig
from workers.contract.settings import EngineSettings, GenerationSettings
from workers.engine.core import Engine
from workers.presses import parse_method

CONTEXT, QUESTION, NEW = 64, 8, 24
SNAP_WINDOW = 16


class IdsTokenizer:
    """What the pipeline's ``generate_answer`` needs of a tokenizer: ``decode``, here the ids as text."""

    def decode(self, ids: torch.Tensor, skip_special_tokens: bool = True) -> str:
        return " ".join(str(int(i)) for i in ids)


def kvpress_answer(press, context: torch.Tensor, question: torch.Tensor) -> list[int]:
    """kvpress's pipeline on ids: ``_forward`` as kvpress runs it, stop tokens none (NEW tokens)."""
    pipe = object.__new__(KVPressTextGenerationPipeline)  # no hub tokenizer: ids in, ids out
    pipe.model, pipe.tokenizer = tiny_llama(), IdsTokenizer()
    pipe.model.generation_config.eos_token_id = [-1]
    with torch.no_grad():
        [answer] = pipe._forward(
            {"context_ids": context[None], "questions_ids": [question[None]]}, max_new_tokens=NEW, press=press
        )
    return [int(t) for t in answer.split()]


def kvorch_answer(
    config: EvalConfig, context: torch.Tensor, question: torch.Tensor, window: int = 0, **generation
) -> list[int]:
    """kvorch's answer under ``--protocol once``, the question read after the compressed context."""
    settings = GenerationSettings(NEW, protocol="once", **generation)
    engine = Engine(tiny_llama(), EngineSettings(chunk_size=CONTEXT, window=window))
    [got] = engine.generate("d", context, question, [config], settings, [])[1]
    return got.token_ids


@pytest.fixture(scope="module")
def prompt() -> tuple[torch.Tensor, torch.Tensor]:
    generator = torch.Generator().manual_seed(11)
    return torch.randint(3, 97, (CONTEXT,), generator=generator), torch.randint(3, 97, (QUESTION,), generator=generator)


# kvorch method, kvpress press, at ratios where (1 - r) * CONTEXT is whole (no rounding difference).
PRESSES = {
    "knorm": ("knorm", lambda r: kvpress.KnormPress(r)),
    "snapkv": (f"snapkv:window_size={SNAP_WINDOW}", lambda r: kvpress.SnapKVPress(r, window_size=SNAP_WINDOW)),
    # stats=running over the context read at once: every query but the first n_sink, as kvpress's
    # statistics over its prefill call (tests_kvpress/test_kvpress_agreement.py).
    "expected_attention": ("expected_attention:stats=running", lambda r: kvpress.ExpectedAttentionPress(r)),
}


@pytest.mark.parametrize("ratio", [0.5, 0.75])
@pytest.mark.parametrize("name", list(PRESSES))
def test_a_prefill_press_answers_as_kvpress_pipeline_does(name, ratio, prompt):
    method, make_press = PRESSES[name]
    context, question = prompt
    config = EvalConfig(parse_method(method), ratio=ratio)
    theirs = kvpress_answer(make_press(ratio), context, question)
    ours = kvorch_answer(config, context, question, decode_eviction=False)
    assert ours == theirs
    assert theirs != kvpress_answer(None, context, question), "compression must change the answer to mean anything"


def test_streaming_llm_answers_as_kvpress_when_its_window_is_what_kvpress_keeps(prompt):
    """kvpress's StreamingLLM keeps n_sink + the last int((1 - r) n) - n_sink keys; kvorch's keeps
    n_sink + its protected window. The same keys, so the same answer, at --window 28 for r = 0.5;
    the default window of the test (0) keeps the sinks alone, and answers otherwise."""
    context, question = prompt
    config = EvalConfig(parse_method("streaming_llm"))
    theirs = kvpress_answer(kvpress.StreamingLLMPress(0.5, n_sink=4), context, question)
    assert kvorch_answer(config, context, question, window=CONTEXT // 2 - 4, decode_eviction=False) == theirs
    assert kvorch_answer(config, context, question, window=0, decode_eviction=False) != theirs


def test_a_decoding_config_answers_as_kvpress_decoding_press(prompt):
    """kvpress's DecodingPress compresses to ``target_size`` every ``compression_interval`` decoding
    forwards and never in the prefill; kvorch's budget policy while decoding, every
    --decode-interval tokens. With the budget above the context plus the question, neither
    evicts before the answer starts (kvpress counts the question's forward as its first decoding
    step; at interval 1 that forward's compression is a no-op below the target), then both keep
    the budget's best keys after every generated token."""
    context, question = prompt
    budget = CONTEXT + QUESTION
    press = kvpress.DecodingPress(base_press=kvpress.KnormPress(), compression_interval=1, target_size=budget)
    theirs = kvpress_answer(press, context, question)
    config = EvalConfig(parse_method("knorm"), budget=budget)
    assert kvorch_answer(config, context, question, decode_interval=1) == theirs
    assert theirs != kvpress_answer(None, context, question), "eviction while decoding must change the answer"


def test_kvorchs_ratio_rounds_up_where_kvpress_rounds_down(prompt):
    """At r = 0.3 of 64 keys kvorch keeps ceil(44.8) = 45 per head, kvpress int(44.8) = 44:
    kvorch at the ratio that keeps 44 (r = 20 / 64) answers exactly as kvpress at 0.3."""
    context, question = prompt
    theirs = kvpress_answer(kvpress.KnormPress(0.3), context, question)
    kept_44 = EvalConfig(parse_method("knorm"), ratio=20 / CONTEXT)
    assert kvorch_answer(kept_44, context, question, decode_eviction=False) == theirs
    for ratio, kept in [(0.3, 45), (20 / CONTEXT, 44)]:
        engine = Engine(tiny_llama(), EngineSettings(chunk_size=CONTEXT, window=0))
        settings = GenerationSettings(1, protocol="once", decode_eviction=False)
        engine.generate("d", context, question, [EvalConfig(parse_method("knorm"), ratio=ratio)], settings, [])
        keep = torch.stack([layer[0] for layer in engine.last_run[0].state.keep])[..., :CONTEXT]
        assert keep.sum(-1).eq(kept).all(), (ratio, keep.sum(-1))
