"""Greedy generation under compression (workers/engine/generation.py) against independent
references: transformers' own ``generate(do_sample=False)`` for the baseline, and a plain greedy
loop over full forwards whose attention hides exactly what the press evicted, when it evicted it."""

from __future__ import annotations

import pytest
import torch
from transformers import AttentionInterface

from tests.families import tiny_decoder
from tests.helpers import tiny_llama
from workers.contract.configs import EvalConfig
from workers.contract.settings import EngineSettings, GenerationSettings
from workers.engine.core import Engine, prompt_spans
from workers.presses import parse_method

CHUNK, WINDOW, NEW = 8, 8, 24
REFERENCE = "kvorch_test_reference"
NO_QUESTION = torch.zeros(0, dtype=torch.int64)
VISIBLE: dict[int, torch.Tensor] = {}  # layer -> [kv-heads, n, n] bool, read by reference_attention


def reference_attention(module, query, key, value, attention_mask, dropout=0.0, scaling=None, **kwargs):
    """Eager attention over the whole sequence with a per-(layer, kv-head) pattern: the reference."""
    visible = VISIBLE[module.layer_idx]
    n_kv, n = visible.shape[0], query.shape[2]
    groups = query.shape[1] // n_kv
    logits = (query @ key.repeat_interleave(groups, dim=1).transpose(-1, -2)) * scaling
    mask = visible[:, :n, :n].repeat_interleave(groups, dim=0)[None]
    probs = torch.softmax(logits.masked_fill(~mask, float("-inf")), dim=-1)
    return (probs @ value.repeat_interleave(groups, dim=1)).transpose(1, 2), None


AttentionInterface.register(REFERENCE, reference_attention)


def answers(engine: Engine, *args) -> list:
    """Engine.generate's answers alone (its rows are the prompt's, tested with the lake's)."""
    return engine.generate(*args)[1]


def prompt(n: int = 37, seed: int = 1) -> torch.Tensor:
    return torch.randint(3, 97, (n,), generator=torch.Generator().manual_seed(seed))


def decision_points(n: int, spans: list[tuple[int, int, bool]], decode_decides: bool = True) -> torch.Tensor:
    """[n, 1] for each query position, where the keys decided before its chunk end: the end of
    the last chunk before it after which the policy decided (the prompt's spans as given, then one
    position per decoding step). A key left the window unseen by a decision until then."""
    point = torch.zeros(n, dtype=torch.int64)
    decided = 0
    for start, end, decide in spans:
        point[start:end] = decided
        decided = end if decide else decided
    for position in range(spans[-1][1], n):
        point[position] = decided
        decided = position + 1 if decode_decides else decided
    return point[:, None]


def protocol_visible(keep: torch.Tensor, points: torch.Tensor, window: int) -> torch.Tensor:
    """[layers, kv-heads, n, n] what query q saw under the protocol, from a config's final keep
    mask [layers, kv-heads, n] and each query's decision point d (decision_points): the keys from
    d - window on (none decided yet) and, before them, the keys kept (a threshold decides a key
    once, at the first decision after it left the window: its final decision)."""
    n = keep.shape[-1]
    q = torch.arange(n)[:, None]
    j = torch.arange(n)[None, :]
    recent = (j <= q) & (j >= points - window)
    return recent | ((j <= q) & keep[:, :, None, :])


def greedy_reference(model, ids: torch.Tensor, steps: int, visible: torch.Tensor | None, stop: int) -> list[int]:
    """A plain greedy loop: one full forward per token, attention hiding what ``visible`` hides."""
    model.set_attn_implementation("eager" if visible is None else REFERENCE)
    out = []
    for layer in range(model.config.num_hidden_layers):
        if visible is not None:
            VISIBLE[layer] = visible[layer]
    with torch.no_grad():
        for _ in range(steps):
            token = int(model(ids[None]).logits[0, -1].argmax())
            out.append(token)
            if token == stop:
                break
            ids = torch.cat([ids, torch.tensor([token])])
    return out


@pytest.mark.parametrize("family", ["llama", "qwen2", "gpt2", "mistral"])
def test_baseline_generates_what_transformers_generate_does(family):
    ids = prompt()
    reference = tiny_decoder(family).eval()
    stop = 5
    with torch.no_grad():
        expected = reference.generate(
            ids[None], max_new_tokens=NEW, do_sample=False, eos_token_id=stop, pad_token_id=stop
        )[0, len(ids) :].tolist()
    engine = Engine(tiny_decoder(family), EngineSettings(CHUNK, WINDOW))
    [got] = answers(
        engine, "d", ids, NO_QUESTION, [EvalConfig(parse_method("baseline"))], GenerationSettings(NEW), [stop]
    )
    assert got.token_ids == expected
    assert got.stop_reason == ("eos" if expected[-1] == stop else "length")
    assert got.density == pytest.approx(1.0)


@pytest.mark.parametrize(
    "method,threshold", [("knorm", -0.3), ("snapkv", 0.03), ("window", None), ("streaming_llm", None)]
)
def test_an_evicting_config_generates_what_a_masked_greedy_loop_does(method, threshold):
    ids = prompt()
    config = EvalConfig(parse_method(method), threshold)
    engine = Engine(tiny_llama(), EngineSettings(CHUNK, WINDOW))
    [got] = answers(engine, "d", ids, NO_QUESTION, [config], GenerationSettings(NEW), [])
    step, layout = engine.last_run
    keep = torch.stack([layer[0] for layer in step.state.keep])[..., : len(ids) + NEW - 1]
    evicted = int((~keep).sum())
    assert evicted > 0, "the config must evict for the test to mean anything"
    window = int(layout.groups[0].windows.protected.max())
    spans = [(s, min(s + CHUNK, len(ids)), True) for s in range(0, len(ids), CHUNK)]
    visible = protocol_visible(keep, decision_points(keep.shape[-1], spans), window)
    assert got.token_ids == greedy_reference(tiny_llama(), ids, NEW, visible, stop=-1)
    assert got.stop_reason == "length" and 0 < got.density < 1


def test_a_config_generates_the_same_alone_and_in_a_batch():
    ids = prompt()
    configs = [EvalConfig(parse_method("knorm"), -0.3), EvalConfig(parse_method("baseline")),
               EvalConfig(parse_method("window")), EvalConfig(parse_method("snapkv"), 0.03)]  # fmt: skip
    engine = Engine(tiny_llama(), EngineSettings(CHUNK, WINDOW))
    together = answers(engine, "d", ids, NO_QUESTION, configs, GenerationSettings(NEW), [])
    alone = [
        answers(
            Engine(tiny_llama(), EngineSettings(CHUNK, WINDOW)), "d", ids, NO_QUESTION, [c], GenerationSettings(NEW), []
        )[0]
        for c in configs
    ]
    assert [g.config for g in together] == configs
    assert [g.token_ids for g in together] == [g.token_ids for g in alone]
    assert [g.keys_kept for g in together] == [g.keys_kept for g in alone]
    assert len({tuple(g.token_ids) for g in together}) > 1, "compression must change some answer"


def test_a_frozen_cache_evicts_nothing_while_decoding():
    ids = prompt()
    engine = Engine(tiny_llama(), EngineSettings(CHUNK, WINDOW))
    [got] = answers(
        engine,
        "d",
        ids,
        NO_QUESTION,
        [EvalConfig(parse_method("knorm"), -0.3)],
        GenerationSettings(NEW, decode_eviction=False),
        [],
    )
    keep = torch.stack([layer[0] for layer in engine.last_run[0].state.keep])[..., : len(ids) + NEW - 1]
    assert bool(keep[..., len(ids) - WINDOW :].all())  # the prompt's window and every new key stay
    n = keep.shape[-1]
    q, j = torch.arange(n)[:, None], torch.arange(n)[None, :]
    start = torch.where(q < len(ids), (q // CHUNK) * CHUNK, len(ids))  # decisions stop after the prompt
    visible = (j <= q) & ((j >= start - WINDOW) | keep[:, :, None, :])
    assert got.token_ids == greedy_reference(tiny_llama(), ids, NEW, visible, stop=-1)


def test_generation_stops_at_a_stop_token_and_says_why():
    ids = prompt()
    engine = Engine(tiny_llama(), EngineSettings(CHUNK, WINDOW))
    free = answers(engine, "d", ids, NO_QUESTION, [EvalConfig(parse_method("baseline"))], GenerationSettings(NEW), [])[
        0
    ].token_ids
    stop = free[5]
    [got] = answers(
        engine, "d", ids, NO_QUESTION, [EvalConfig(parse_method("baseline"))], GenerationSettings(NEW), [stop]
    )
    assert got.token_ids == free[: free.index(stop) + 1] and got.stop_reason == "eos"


@pytest.mark.parametrize("interval", [1, 4])
@pytest.mark.parametrize(
    "config",
    [EvalConfig(parse_method("knorm"), ratio=0.5), EvalConfig(parse_method("tova"), budget=20)],
    ids=["knorm-ratio", "tova-budget"],
)
def test_a_ranked_policy_evicts_every_interval_and_hides_exactly_that(config, interval, monkeypatch):
    """Under ratio and budget a kept key can be evicted at any later step, so the reference
    records the keep masks before every chunk and decoding step (the prompt's chunks, then one
    per token): query q of a chunk starting at s sees the keys kept before it, and the chunk.
    With --decode-interval k the limit is re-applied after every k-th generated token only."""
    from workers.engine import generation
    from workers.engine.step import ChunkStep

    before: dict[int, torch.Tensor] = {}  # chunk start -> [layers, kv-heads, n] keep

    def snapshot(step, start):
        before[start] = torch.stack([layer[0] for layer in step.state.keep]).clone()

    exact_step, decode_step = ChunkStep._exact_step, generation._decode_step
    monkeypatch.setattr(
        ChunkStep, "_exact_step", lambda s, k, a, *rest: (snapshot(s, a), exact_step(s, k, a, *rest))[1]
    )
    monkeypatch.setattr(
        generation, "_decode_step", lambda s, k, p, *rest: (snapshot(s, p), decode_step(s, k, p, *rest))[1]
    )
    ids = prompt()
    engine = Engine(tiny_llama(), EngineSettings(CHUNK, WINDOW))
    [got] = answers(engine, "d", ids, NO_QUESTION, [config], GenerationSettings(NEW, decode_interval=interval), [])
    n = len(ids) + NEW - 1
    starts = sorted(before)
    decoding = [p for p in starts if p >= len(ids)]  # the step at position p generated token p - len(ids) + 1
    changed = [p for p, q in zip(decoding, decoding[1:]) if not before[p].equal(before[q])]
    assert changed and all((p - len(ids) + 1) % interval == 0 for p in changed), changed
    visible = torch.zeros(2, 2, n, n, dtype=torch.bool)
    for q in range(n):
        s = max(start for start in starts if start <= q)
        visible[:, :, q, : q + 1] = torch.cat([before[s][..., :s], torch.ones(2, 2, q + 1 - s, dtype=torch.bool)], -1)
    final = torch.stack([layer[0] for layer in engine.last_run[0].state.keep])[..., :n]
    assert not bool(before[starts[-1]][..., : len(ids)].equal(before[len(ids)][..., : len(ids)])), (
        "keys of the prompt must be evicted while decoding for the test to mean anything"
    )
    assert int((~final).sum()) > 0
    assert got.token_ids == greedy_reference(tiny_llama(), ids, NEW, visible, stop=-1)


@pytest.mark.parametrize("query_aware", [False, True])
@pytest.mark.parametrize("protocol", ["once", "chunked"])
def test_the_protocols_run_the_prompt_as_said_and_generate_what_a_masked_loop_does(protocol, query_aware):
    """``once``: the context in one chunk, compressed once; ``chunked``: in chunks. The question
    after the compressed part (decided nothing) or, query-aware, inside it."""
    context, question = prompt(37), prompt(9, seed=2)
    settings = GenerationSettings(NEW, protocol=protocol, query_aware=query_aware)
    spans = prompt_spans(37, 46, CHUNK, settings)
    compressed = 46 if query_aware else 37
    if protocol == "once":
        assert [tuple(s) for s in spans] == [(0, compressed, True)] + ([] if query_aware else [(37, 46, False)])
    else:
        assert all(s.decide for s in spans) == query_aware and spans[-1].end == 46
    engine = Engine(tiny_llama(), EngineSettings(CHUNK, WINDOW))
    config = EvalConfig(parse_method("knorm"), -0.3)
    [got] = answers(engine, "d", context, question, [config], settings, [])
    n = 46 + NEW - 1
    keep = torch.stack([layer[0] for layer in engine.last_run[0].state.keep])[..., :n]
    assert int((~keep[..., :37]).sum()) > 0
    visible = protocol_visible(keep, decision_points(n, [tuple(s) for s in spans]), WINDOW)
    assert got.token_ids == greedy_reference(tiny_llama(), torch.cat([context, question]), NEW, visible, stop=-1)


def test_bad_generation_settings_are_one_line_errors():
    for kwargs, fragment in [
        (dict(max_new_tokens=0), "max new tokens must be >= 1"),
        (dict(max_new_tokens=1.5), "must be a whole number"),
        (dict(protocol="twice"), "unknown protocol 'twice'; use one of chunked, once"),
    ]:
        with pytest.raises(ValueError, match=fragment) as excinfo:
            GenerationSettings(**kwargs)
        assert "\n" not in str(excinfo.value)


def test_the_prompts_rows_are_the_rows_evaluate_gives_the_same_document():
    """Under ``chunked`` with no question the prompt runs as any document does: the same rows."""
    ids = prompt()
    configs = [EvalConfig(parse_method("knorm"), -0.3), EvalConfig(parse_method("baseline"))]
    rows, _ = Engine(tiny_llama(), EngineSettings(CHUNK, WINDOW)).generate(
        "d", ids, NO_QUESTION, configs, GenerationSettings(NEW), []
    )
    expected = Engine(tiny_llama(), EngineSettings(CHUNK, WINDOW, agreement=False)).evaluate("d", ids, configs)
    columns = ["config", "chunk_index", "chunk_start", "chunk_end", "n_tokens", "n_correct", "keys_total", "keys_kept"]
    assert rows.select(columns).to_pylist() == expected.select(columns).to_pylist()
    # float32 within 1e-6: the first document of a threshold config runs in a pool that grows
    # between chunks, a question run's in every position (held against masked: 1e-6 too)
    assert rows.column("nll_sum").to_pylist() == pytest.approx(expected.column("nll_sum").to_pylist(), rel=1e-6)
    assert set(rows.column("generated").to_pylist()) == {None}  # the actor writes the answers


def test_a_worker_answers_a_question_and_scores_it(tiny_model_dir, smollm2_tokenizer):
    """The actor's question path: the prompt's rows, and on each config's last one the decoded
    answer, its length, why it stopped, its score under the document's metric and its density."""
    from workers.actor import EvalWorker
    from workers.contract import scorers
    from workers.contract.plan import Task, TaskDocument, WorkerSettings

    context = smollm2_tokenizer("The special magic number is 42. " * 6)["input_ids"]
    question = smollm2_tokenizer(" What is the special magic number?")["input_ids"]
    settings = WorkerSettings(
        tiny_model_dir, "float32", "cpu", 1, EngineSettings(CHUNK, WINDOW), generation=GenerationSettings(6)
    )
    configs = (EvalConfig(parse_method("baseline")), EvalConfig(parse_method("knorm"), -0.3))
    doc = TaskDocument("q0", [*context, *question], question_tokens=len(question), answers=("42",), metric="ruler_all")
    result = EvalWorker("w", settings).run(Task("t0", (doc,), configs))
    assert result.failures == ()
    rows = result.rows.to_pylist()
    answered = [r for r in rows if r["generated"] is not None]
    assert sorted(r["config"] for r in answered) == sorted(c.label for c in configs)
    for row in answered:
        assert row["chunk_end"] == len(doc.token_ids)  # the prompt's last chunk
        assert 1 <= row["n_generated"] <= 6 and row["stop_reason"] in ("eos", "length")
        assert row["answer_score"] == scorers.score("ruler_all", row["generated"], ["42"])
        assert 0 < row["generated_density"] <= 1
    baseline = next(r for r in answered if r["config"] == "baseline")
    assert baseline["generated_density"] == 1.0
    assert {r["stop_reason"] for r in rows if r["generated"] is None} == {None}
    assert all(r["kl_sum"] is not None for r in rows)  # the prompt's agreement with the baseline row


@pytest.mark.parametrize("decode_eviction", [True, False])
@pytest.mark.parametrize("protocol", ["once", "chunked"])
def test_the_held_cache_answers_as_the_masked_one_without_running_again(protocol, decode_eviction, capsys):
    """The held cache is sized for what a row takes between two decisions while answering (the
    context read at once, the question, every generated key when frozen): the same answers and
    densities as the masked cache, with no overflow rerun for a bound the policy fixes."""
    context, question = prompt(37), prompt(9, seed=2)
    configs = [EvalConfig(parse_method("window")), EvalConfig(parse_method("streaming_llm")),
               EvalConfig(parse_method("knorm"), ratio=0.5), EvalConfig(parse_method("tova"), budget=20),
               EvalConfig(parse_method("knorm"), -0.3), EvalConfig(parse_method("baseline"))]  # fmt: skip
    settings = GenerationSettings(NEW, protocol=protocol, decode_eviction=decode_eviction)
    got = {}
    for cache in ("held", "masked"):
        engine = Engine(tiny_llama(), EngineSettings(CHUNK, WINDOW, cache=cache))
        got[cache] = [
            (g.token_ids, g.keys_kept) for g in answers(engine, "d", context, question, configs, settings, [])
        ]
    assert got["held"] == got["masked"]
    assert "held more keys than its cache had slots" not in capsys.readouterr().err


def test_the_embedded_models_baseline_generates_what_transformers_generate_does(smollm2, smollm2_tokenizer):
    """SmolLM2-135M (the GGUF the README runs): kvorch's baseline answer equals transformers' greedy
    ``generate`` on a second, unhooked copy of the model: built from the config with transformers'
    own attention and given the loaded weights (seconds, where a second GGUF load takes 15 s)."""
    import copy

    from transformers import AutoModelForCausalLM

    ids = torch.tensor(smollm2_tokenizer("The capital of France is Paris. The capital of Italy is")["input_ids"])
    # A deep copy of the config: an engine on the session's model set kvorch's attention in it.
    reference = AutoModelForCausalLM.from_config(copy.deepcopy(smollm2.config), attn_implementation="sdpa").eval()
    reference.load_state_dict(smollm2.state_dict())
    assert reference.config._attn_implementation == "sdpa"
    assert not reference.model.layers[0].self_attn._forward_pre_hooks
    eos = smollm2_tokenizer.eos_token_id
    with torch.no_grad():
        expected = reference.generate(ids[None], max_new_tokens=12, do_sample=False, eos_token_id=eos, pad_token_id=eos)
    engine = Engine(smollm2, EngineSettings(CHUNK, WINDOW))
    [got] = answers(
        engine, "d", ids, NO_QUESTION, [EvalConfig(parse_method("baseline"))], GenerationSettings(12), [eos]
    )
    assert got.token_ids == expected[0, len(ids) :].tolist()


def test_a_prompt_shorter_than_a_chunk_in_more_spans_than_chunks_answers():
    """``once`` with a question: two spans in a prompt shorter than one chunk (the results hold a
    row per span, not per chunk of the chunk size)."""
    context, question = prompt(20), prompt(5, seed=2)
    engine = Engine(tiny_llama(), EngineSettings(64, WINDOW))
    rows, [got] = engine.generate(
        "d", context, question, [EvalConfig(parse_method("knorm"), -0.3)], GenerationSettings(4, protocol="once"), []
    )
    assert rows.column("chunk_end").to_pylist() == [20, 25] and len(got.token_ids) == 4


def test_an_answer_cut_at_a_stop_string_keeps_the_density_of_its_own_steps():
    """A stop string ends the answer after the fact: the tokens and density of that prefix alone."""
    ids = prompt()
    engine = Engine(tiny_llama(), EngineSettings(CHUNK, WINDOW))
    config = EvalConfig(parse_method("knorm"), ratio=0.5)
    [full] = answers(engine, "d", ids, NO_QUESTION, [config], GenerationSettings(NEW), [])
    cut = full.cut(6, "stop")
    assert cut.token_ids == full.token_ids[:6] and cut.stop_reason == "stop"
    assert cut.keys_kept == sum(full.kept_by_step[:5]) and cut.keys_total == sum(full.total_by_step[:5])
    [short] = answers(engine, "d", ids, NO_QUESTION, [config], GenerationSettings(6), [])
    assert (short.token_ids, short.density) == (cut.token_ids, pytest.approx(cut.density))
    assert cut.density != full.density  # the density follows the ratio as the answer grows


def test_a_worker_cuts_each_answer_at_its_first_stop_string(tiny_model_dir, smollm2_tokenizer):
    """--stop on the actor's path: the answer decoded, cut before the stop string's first
    appearance, its tokens counted to the one that completed it, ``stop`` as the reason."""
    from workers.actor import EvalWorker
    from workers.contract.plan import Task, TaskDocument, WorkerSettings

    context = smollm2_tokenizer("The special magic number is 42. " * 6)["input_ids"]
    question = smollm2_tokenizer(" What is the special magic number?")["input_ids"]
    doc = TaskDocument("q0", [*context, *question], question_tokens=len(question), answers=("42",), metric="ruler_all")
    configs = (EvalConfig(parse_method("baseline")), EvalConfig(parse_method("knorm"), ratio=0.5))

    def answered(generation: GenerationSettings) -> dict[str, dict]:
        settings = WorkerSettings(
            tiny_model_dir, "float32", "cpu", 1, EngineSettings(CHUNK, WINDOW), generation=generation
        )
        rows = EvalWorker("w", settings).run(Task("t0", (doc,), configs)).rows.to_pylist()
        return {r["config"]: r for r in rows if r["generated"] is not None}

    free = answered(GenerationSettings(8))["baseline"]
    ids = smollm2_tokenizer(free["generated"], add_special_tokens=False)["input_ids"]
    stop = smollm2_tokenizer.decode(ids[2:3])  # text the baseline produces third
    assert stop and free["stop_reason"] == "length"
    got = answered(GenerationSettings(8, stop=(stop,)))
    baseline = got["baseline"]
    assert (
        baseline["stop_reason"] == "stop" and baseline["generated"] == free["generated"][: free["generated"].find(stop)]
    )
    assert baseline["n_generated"] < 8
    assert len(got) == 2 and all(stop not in r["generated"] for r in got.values())


def test_a_question_run_says_once_that_it_runs_uncompiled():
    """--compile with a question task: the prompt and the answer run at exact shapes, said in one line."""
    from orchestrator.sweep import compile_check

    configs = [EvalConfig(parse_method("knorm"), -0.3)]
    note = compile_check.eager_note(EngineSettings(CHUNK, WINDOW, compile=True), configs, answering=True)
    assert note.startswith("question tasks run uncompiled") and "\n" not in note
    assert compile_check.eager_note(EngineSettings(CHUNK, WINDOW, compile=False), configs, answering=True) is None
    assert compile_check.eager_note(EngineSettings(CHUNK, WINDOW, compile=True), configs) is None
