"""KVzip (issue 37, point 6) against independent computations: the replay's scores against eager
attention probabilities read one key at a time, the keys a `once` question run keeps against those
scores, and its refusals outside question runs under --protocol once. kvpress's own KVzipPress:
tests_kvpress/test_kvpress_leaderboard.py."""

from __future__ import annotations

import copy

import numpy as np
import pytest
import torch

from orchestrator.errors import KvorchError
from orchestrator.sweep.spec import JobSpec
from tests.families import tiny_decoder
from tests.helpers import tiny_llama
from workers.actor import EvalWorker
from workers.contract.configs import EvalConfig
from workers.contract.plan import WorkerSettings
from workers.contract.settings import EngineSettings, GenerationSettings
from workers.engine import replay
from workers.engine.core import Engine
from workers.presses import parse_method

N_CONTEXT, N_PROMPT = 120, 7


def tokens(n: int, seed: int) -> torch.Tensor:
    return torch.randint(0, 97, (n,), generator=torch.Generator().manual_seed(seed))


def reference_scores(model: torch.nn.Module, context: torch.Tensor, prompt: torch.Tensor) -> np.ndarray:
    """[layers, kv-heads, n_context]: transformers' eager attention over context + prompt + context,
    the largest probability each context key gets from a later query of its group's heads."""
    eager = copy.deepcopy(model)
    eager.set_attn_implementation("eager")
    ids = torch.cat([context, prompt, context])[None]
    with torch.no_grad():
        attentions = eager(ids, output_attentions=True).attentions
    n, heads = context.shape[0], model.config.num_attention_heads
    kv_heads = getattr(model.config, "num_key_value_heads", heads)
    group = heads // kv_heads
    out = np.zeros((len(attentions), kv_heads, n))
    for layer, probs in enumerate(attentions):
        a = probs[0].double().numpy()
        for g in range(kv_heads):
            heads_of_group = range(g * group, (g + 1) * group)
            for i in range(n):
                out[layer, g, i] = max(a[h, t, i] for h in heads_of_group for t in range(n, a.shape[1]))
    return out


@pytest.mark.parametrize("family", ["llama", "mistral", "gemma2", "gpt2"])  # GQA, sliding window, soft-cap, no RoPE
def test_the_replay_scores_each_context_key_by_its_largest_attention_while_the_context_is_repeated(
    monkeypatch, family
):
    monkeypatch.setattr(replay, "QUERY_BLOCK", 50)  # several blocks of replay queries
    model = tiny_decoder(family)
    context, prompt = tokens(N_CONTEXT, 1), tokens(N_PROMPT, 2)
    expected = reference_scores(model, context, prompt)
    engine = Engine(model, EngineSettings(chunk_size=32, window=16))
    got = replay.context_scores(engine.hooked, context, prompt)
    assert got.shape == expected.shape
    np.testing.assert_allclose(got.double().numpy(), expected, rtol=1e-5, atol=1e-7)
    assert not engine.hooked.hidden_states  # nothing of the replay left for the next chunk step


def test_a_once_question_run_keeps_the_sinks_the_window_and_the_context_keys_scoring_over_the_threshold():
    model = tiny_llama()
    context, prompt, question = tokens(N_CONTEXT, 1), tokens(N_PROMPT, 2), tokens(9, 3)
    window = 16
    scores = reference_scores(model, context, prompt)
    threshold = float(np.median(scores))
    engine = Engine(model, EngineSettings(chunk_size=32, window=window))
    [config] = replay.bind_replays(engine.hooked, [EvalConfig(parse_method("kvzip"), threshold)], context, prompt)
    settings = GenerationSettings(max_new_tokens=2, protocol="once", decode_eviction=False)
    engine.generate("d", context, question, [config], settings, [])
    step, _ = engine.last_run
    for layer, keep in enumerate(step.state.keep):
        got = keep[0, :, :N_CONTEXT].numpy()
        positions = np.arange(N_CONTEXT)
        expected = (positions < 4) | (positions >= N_CONTEXT - window) | (scores[layer] >= threshold)
        np.testing.assert_array_equal(got, expected)
        assert keep[0, :, N_CONTEXT : N_CONTEXT + 9].all()  # the question is not compressed
    assert not expected.all()  # something was evicted


def test_kvzip_without_its_replay_is_refused_in_one_line():
    engine = Engine(tiny_llama(), EngineSettings(chunk_size=32, window=16))
    with pytest.raises(ValueError, match="--protocol once") as caught:
        engine.evaluate("d", tokens(50, 1), [EvalConfig(parse_method("kvzip"), 0.1)])
    assert "\n" not in str(caught.value)
    with pytest.raises(ValueError, match="not a scorer it can wrap"):
        parse_method("chunkkv:press=kvzip")


@pytest.mark.parametrize(
    "options, message",
    [
        ({}, "run it on a question task with --protocol once"),
        ({"task": "passkey"}, "run it on a question task with --protocol once"),
        ({"task": "ruler"}, "add --protocol once (--protocol chunked"),
        ({"task": "ruler", "protocol": "once", "densities": (0.5,)}, "--densities calibrates on corpus text"),
    ],
)
def test_a_job_with_kvzip_outside_a_once_question_run_is_refused_before_it_starts(options, message):
    with pytest.raises(KvorchError, match=message.replace("(", r"\(")):
        JobSpec(corpus="pydoc", methods=("knorm", "kvzip"), **options)


def test_a_once_question_run_with_kvzip_is_accepted():
    spec = JobSpec(corpus="pydoc", methods=("kvzip",), task="ruler", protocol="once", policy="ratio", ratios=(0.5,))
    assert [(c.method, c.ratio) for c in spec.configs] == [("baseline", None), ("kvzip", 0.5)]  # baseline: agreement


def test_the_preflight_runs_kvzip_on_a_replay_of_its_tiny_document(tmp_path):
    tiny_llama().save_pretrained(tmp_path / "llama")
    settings = WorkerSettings(str(tmp_path / "llama"), "float32", "cpu", 1, EngineSettings(chunk_size=16, window=8))
    worker = EvalWorker("w", settings)
    kvzip = parse_method("kvzip")
    assert worker.preflight([EvalConfig(kvzip, 0.1), EvalConfig(kvzip, ratio=0.5)]) == []


def test_the_actor_replays_each_question_context_after_the_tokenizers_repeat_prompt(
    tiny_model_dir, smollm2_tokenizer, monkeypatch
):
    """A question under --protocol once: kvzip is bound to a replay of exactly the context, after
    the prompt repeat_prompt_ids makes of the model's tokenizer, and answers from a compressed cache."""
    from workers.contract.plan import Task, TaskDocument
    from workers.presses.kvzip import repeat_prompt_ids

    replayed = []
    context_scores = replay.context_scores

    def spying(hooked, context_ids, prompt_ids):
        replayed.append((context_ids.tolist(), prompt_ids.tolist()))
        return context_scores(hooked, context_ids, prompt_ids)

    monkeypatch.setattr(replay, "context_scores", spying)
    context = smollm2_tokenizer("The special magic number is 42. " * 6)["input_ids"]
    question = smollm2_tokenizer(" What is the special magic number?")["input_ids"]
    generation = GenerationSettings(4, protocol="once")
    settings = WorkerSettings(tiny_model_dir, "float32", "cpu", 1, EngineSettings(16, 8), generation=generation)
    configs = (EvalConfig(parse_method("baseline")), EvalConfig(parse_method("kvzip"), ratio=0.5))
    doc = TaskDocument("q0", [*context, *question], question_tokens=len(question), answers=("42",), metric="ruler_all")
    result = EvalWorker("w", settings).run(Task("t0", (doc,), configs))
    assert result.failures == ()
    assert replayed == [(context, repeat_prompt_ids(smollm2_tokenizer))]
    answered = {r["config"]: r for r in result.rows.to_pylist() if r["generated"] is not None}
    assert answered[configs[1].label]["generated_density"] < 0.9 < answered["baseline"]["generated_density"]
