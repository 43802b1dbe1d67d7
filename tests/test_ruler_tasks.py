"""RULER's synthetic tasks (orchestrator/probes/ruler.py): RULER's own wording, lengths within
bounds, determinism, and answers checked by independent readings of the context: needles parsed
back out of the text, the variable chain walked from the asked value, the words counted.

Most tests count tokens by whitespace or by characters (fast, tokenizer-free); one counts with
the embedded model's tokenizer."""

from __future__ import annotations

import re
from collections import Counter

import pytest

from orchestrator.probes.ruler import (
    ADJECTIVES,
    NOUNS,
    TASKS,
    TaskSample,
    _corpus_words,
    _zeta,
    generate,
    ruler_length,
)
from workers.contract.scorers import SCORERS


def words(text: str) -> int:
    return len(text.split())


def chars(text: str) -> int:
    return (len(text) + 3) // 4


# RULER's scripts/synthetic.yaml, less qa_1 and qa_2 (vt, cwe, fwe under their long names).
RULER_TASKS = [
    "niah_single_1", "niah_single_2", "niah_single_3", "niah_multikey_1", "niah_multikey_2", "niah_multikey_3",
    "niah_multivalue", "niah_multiquery", "variable_tracking", "common_words", "frequent_words",
]  # fmt: skip
NIAH = [task for task in RULER_TASKS if task.startswith("niah")]
# RULER's scripts/data/synthetic/constants.py, copied here by hand: the niah template and answer prefix.
RULER_NIAH = (
    "Some special magic {type_needle_v} are hidden within the following text. Make sure to memorize it. I will "
    "quiz you about the {type_needle_v} afterwards.\n{context}\nWhat are all the special magic {type_needle_v} "
    "for {query} mentioned in the provided text? The special magic {type_needle_v} for {query} mentioned in the "
    "provided text are"
)
NEEDLE = re.compile(r"One of the special magic (numbers|words|uuids) for (\S+) is: (\S+)\.")
UUID = re.compile(r"[0-9a-f]{8}-[0-9a-f]{4}-4[0-9a-f]{3}-[89ab][0-9a-f]{3}-[0-9a-f]{12}")


@pytest.fixture(scope="module")
def samples() -> dict[str, list[TaskSample]]:
    """Five samples of every task at 4000 whitespace tokens (>= RULER's 4096 for common_words)."""
    return {task: generate(task, 4000, 5, 7, words) for task in RULER_TASKS}


def needles(sample: TaskSample) -> list[tuple[str, str, str]]:
    """(type, key, value) of every needle sentence in the context, in order."""
    return NEEDLE.findall(sample.context)


def asked_keys(sample: TaskSample) -> list[str]:
    query = re.fullmatch(r"\nWhat (?:is|are all) the special magic \w+ for (.+) mentioned in the provided text\?",
                         sample.question).group(1)  # fmt: skip
    return re.split(r", and |, ", query)


def test_the_registry_holds_rulers_synthetic_tasks():
    assert list(TASKS) == RULER_TASKS
    assert {task: TASKS[task].max_new_tokens for task in ("niah_single_1", "variable_tracking")} == {
        "niah_single_1": 128,
        "variable_tracking": 30,
    }
    assert TASKS["common_words"].max_new_tokens == 120 and TASKS["frequent_words"].max_new_tokens == 50
    assert ruler_length("niah_single_2", 4096) == 4096 - 128


def test_unknown_task_and_bad_numbers_are_one_line_errors():
    with pytest.raises(ValueError, match="unknown RULER task 'niah'; valid tasks: niah_single_1, ") as error:
        generate("niah", 1000, 1, 0, words)
    assert "\n" not in str(error.value) and "frequent_words" in str(error.value)
    for args in ((0, 1, 0), (1000, 0, 0), (1000, 1, 1.5), (True, 1, 0)):
        with pytest.raises(ValueError, match="use a whole number"):
            generate("niah_single_1", *args, words)


@pytest.mark.parametrize("task", RULER_TASKS)
def test_a_length_too_short_names_the_minimum_which_then_works(task):
    with pytest.raises(ValueError, match=rf"^{task}: length 20 is too short: .* use length >= (\d+)$") as error:
        generate(task, 20, 3, 0, words)
    assert "\n" not in str(error.value)
    minimum = int(re.search(r">= (\d+)$", str(error.value)).group(1))
    assert all(words(s.prompt) <= minimum for s in generate(task, minimum, 3, 0, words))


@pytest.mark.parametrize("task", RULER_TASKS)
def test_same_arguments_same_samples_other_seed_other_samples(task, samples):
    again = generate(task, 4000, 5, 7, words)
    assert again == samples[task]
    other = generate(task, 4000, 5, 8, words)
    assert [s.answers for s in other] != [s.answers for s in again]
    assert [s.id for s in again] == [f"{task}/4000/{i}" for i in range(5)]
    assert len({s.prompt for s in again}) == 5


@pytest.mark.parametrize("task", RULER_TASKS)
@pytest.mark.parametrize(("count", "length"), [(words, 3000), (chars, 6000), (words, 1500)])
def test_prompts_fit_the_length_and_come_close(task, count, length):
    for sample in generate(task, length, 4, 1, count):
        used = count(sample.prompt)
        assert 0.95 * length <= used <= length, (sample.id, used)
        assert sample.prompt == sample.context + sample.question + sample.answer_prefix
        assert sample.metric == "ruler_all" and sample.max_new_tokens == TASKS[task].max_new_tokens


def test_niah_single_is_rulers_template_word_for_word(samples):
    """The whole prompt, rebuilt from RULER's template with RULER's singular replacements."""
    template = RULER_NIAH
    for plural, single in (("Some", "A"), ("are all", "is"), ("are", "is"), ("answers", "answer")):
        template = template.replace(plural, single)
    for task, type_needle_v in (("niah_single_1", "number"), ("niah_single_3", "uuid")):
        for sample in samples[task]:
            (key,) = asked_keys(sample)
            head = template.split("{context}")[0].format(type_needle_v=type_needle_v)
            assert sample.context.startswith(head)
            expected = template.format(type_needle_v=type_needle_v, context=sample.context[len(head) :], query=key)
            assert sample.prompt == expected
            assert sample.answer_prefix == (
                f" The special magic {type_needle_v} for {key} mentioned in the provided text is"
            )
    first = samples["niah_single_1"][1]  # sample 0 puts the needle first (depth 0)
    assert first.context.startswith(
        "A special magic number is hidden within the following text. Make sure to memorize it. "
        "I will quiz you about the number afterwards.\nThe grass is green. The sky is blue. The sun is yellow. "
        "Here we go. There and back again.\n"
    )


def test_niah_plural_wording_for_several_answers(samples):
    for task in ("niah_multivalue", "niah_multiquery"):
        sample = samples[task][0]
        assert sample.context.startswith(
            "Some special magic numbers are hidden within the following text. Make sure to memorize it. "
            "I will quiz you about the numbers afterwards.\n"
        )
        assert sample.question.startswith("\nWhat are all the special magic numbers for ")
        assert sample.answer_prefix.endswith(" mentioned in the provided text are")
    keys = asked_keys(samples["niah_multiquery"][0])
    assert samples["niah_multiquery"][0].answer_prefix == (
        f" The special magic numbers for {keys[0]}, {keys[1]}, {keys[2]}, and {keys[3]} mentioned in the provided "
        "text are"
    )


@pytest.mark.parametrize("task", NIAH)
def test_niah_answers_are_the_asked_keys_needles(task, samples):
    family = TASKS[task]
    for sample in samples[task]:
        found = needles(sample)
        keys = asked_keys(sample)
        assert len(keys) == family.queries and len(set(keys)) == len(keys)
        assert all(key in sample.question and key in sample.answer_prefix for key in keys)
        by_key: dict[str, list[str]] = {}
        for kind, key, value in found:
            assert kind == family.value_type
            by_key.setdefault(key, []).append(value)
        # every asked key has exactly its values' needles, and the answers are those values
        assert sorted(sample.answers) == sorted(value for key in keys for value in by_key[key])
        assert all(len(by_key[key]) == family.values for key in keys)
        assert all(sample.context.count(value) == 1 for value in sample.answers)
        distractors = [key for key in by_key if key not in keys]
        if family.haystack == "needle":
            assert len(distractors) > 10
            assert all(sample.answers.count(value) == 0 for key in distractors for value in by_key[key])
        else:
            assert len(found) == max(family.keys, family.queries) * family.values
            assert len(distractors) == family.keys - family.queries if family.keys > 1 else not distractors
        for key in by_key:
            if family.key_type == "uuids":
                assert UUID.fullmatch(key)
            elif family.key_type == "words":
                adjective, noun = key.split("-")
                assert adjective in ADJECTIVES and noun in NOUNS
        for value in sample.answers:
            assert UUID.fullmatch(value) if family.value_type == "uuids" else re.fullmatch(r"[1-9]\d{6}", value)


def test_multikey_has_distractor_needles_with_other_keys(samples):
    for sample in samples["niah_multikey_1"]:
        keys = [key for _, key, _ in needles(sample)]
        (asked,) = asked_keys(sample)
        assert len(keys) == 4 and len(set(keys)) == 4 and keys.count(asked) == 1


@pytest.mark.parametrize("task", ["niah_single_1", "niah_single_2"])
def test_the_asked_needle_moves_evenly_through_the_haystack_over_the_samples(task, samples):
    for sample, depth in zip(samples[task], [0, 0.25, 0.5, 0.75, 1]):
        assert sample.depth == depth
        head_end = sample.context.index("\n") + 1
        haystack = sample.context[head_end:]
        at = haystack.index("One of the special magic")
        rest = len(haystack) - len(NEEDLE.search(haystack).group(0))
        assert abs(at / rest - depth) < (0.02 if task == "niah_single_1" else 0.05), (sample.id, at / rest)


def chain_walk(context: str, value: str) -> set[str]:
    """Every variable that ends up holding ``value``: a naive fixed point over the assignments."""
    direct = re.findall(r"^VAR ([A-Z]+) = (\d+)\s*$", context, flags=re.M)
    copies = re.findall(r"^VAR ([A-Z]+) = VAR ([A-Z]+)\s*$", context, flags=re.M)
    holding = {name for name, number in direct if number == value}
    while True:
        more = {target for target, source in copies if source in holding} - holding
        if not more:
            return holding
        holding |= more


def test_variable_tracking_chain_resolves_to_exactly_the_answers(samples):
    for sample in samples["variable_tracking"]:
        value = re.fullmatch(r"\nQuestion: Find all variables that are assigned the value (\d+) in the text above\.",
                             sample.question).group(1)  # fmt: skip
        assert chain_walk(sample.context, value) == set(sample.answers)
        assert len(sample.answers) == 5 and all(re.fullmatch(r"[A-Z]{5}", name) for name in sample.answers)
        assert sample.answer_prefix == (
            " Answer: According to the chain(s) of variable assignment in the text above, 5 variables are "
            f"assigned the value {value}, they are: "
        )
        # RULER's one worked example comes first, answered, with 3-letter names and its own value
        shot, main = sample.context.split("\n\nMemorize and track", 1)
        assert shot.startswith(
            "Memorize and track the chain(s) of variable assignment hidden in the following text.\n\n"
        )
        example_value = re.search(r"assigned the value (\d+), they are:  ([A-Z ]+)$", shot)
        assert example_value.group(1) != value
        assert chain_walk(shot, example_value.group(1)) == set(example_value.group(2).split())
        assert main.startswith(" the chain(s) of variable assignment hidden in the following text.\n\n")
        assert main.count("The grass is green. The sky is blue. The sun is yellow. Here we go. There and back again.")


def listing_counts(context: str, marker: str) -> Counter:
    """Counts of the words in the last numbered list, which must be numbered 1, 2, 3, ..."""
    listing = context.rsplit(marker, 1)[1]
    entries = re.findall(r"(\d+)\. (\S+)", listing)
    assert [int(number) for number, _ in entries] == list(range(1, len(entries) + 1))
    assert listing == " ".join(f"{number}. {word}" for number, word in entries)
    return Counter(word for _, word in entries)


def assert_top(counts: Counter, answers: tuple[str, ...], k: int) -> None:
    ranked = counts.most_common()
    assert {word for word, _ in ranked[:k]} == set(answers) and len(answers) == k
    assert ranked[k - 1][1] > (ranked[k][1] if len(ranked) > k else 0)


def test_common_words_answers_are_the_ten_most_common(samples):
    marker = "Memorize the ones that appear most often.\n"
    for sample in samples["common_words"]:
        counts = listing_counts(sample.context, marker)
        assert_top(counts, sample.answers, 10)
        assert {counts[word] for word in sample.answers} == {30} and set(counts.values()) == {30, 3}
        assert sample.question == "\nQuestion: What are the 10 most common words in the above list?"
        assert sample.answer_prefix == " Answer: The top 10 words that appear most often in the list are:"
        # the worked example before it, answered, shares no word with the list
        shot = sample.context.split("\n" + "Below is a numbered list", 1)[0]
        example = re.search(r"are: (1\. .*)$", shot).group(1)
        example_counts = listing_counts(shot.split("\nQuestion:")[0], marker)
        assert_top(example_counts, tuple(re.findall(r"\d+\. (\S+)", example)), 10)
        assert not set(example_counts) & set(counts)


def test_common_words_below_rulers_4096_repeats_less_and_past_the_word_list_pairs_words():
    short = generate("common_words", 1500, 1, 0, words)[0]
    counts = listing_counts(short.context, "Memorize the ones that appear most often.\n")
    assert {counts[word] for word in short.answers} == {6} and set(counts.values()) == {6, 1}
    assert ruler_length("common_words", 4096) + 120 == 4096
    at_4k = generate("common_words", ruler_length("common_words", 4096), 1, 0, words)[0]
    assert set(listing_counts(at_4k.context, "most often.\n").values()) == {30, 3}
    vocabulary = len(_corpus_words())
    long = generate("common_words", 9 * vocabulary, 1, 0, words)[0]
    counts = listing_counts(long.context, "Memorize the ones that appear most often.\n")
    assert_top(counts, long.answers, 10)
    assert len(counts) > vocabulary and sum("-" in word for word in counts) == len(counts) - (vocabulary - 40)


def test_frequent_words_answers_are_the_three_most_frequent_after_the_dots(samples):
    head = (
        "Read the following coded text and track the frequency of each coded word. Find the three most frequently "
        "appeared coded words. "
    )
    for sample in samples["frequent_words"]:
        assert sample.context.startswith(head)
        coded = Counter(sample.context[len(head) :].split(" "))
        assert coded.most_common(1)[0][0] == "..."
        del coded["..."]
        assert_top(coded, sample.answers, 3)
        assert all(re.fullmatch(r"[a-z]{6}", word) for word in coded)
        assert sample.question == (
            "\nQuestion: Do not provide any explanation. Please ignore the dots '....'. What are the three most "
            "frequently appeared words in the above coded text?"
        )
        assert sample.answer_prefix == (
            " Answer: According to the coded text above, the three most frequently appeared words are:"
        )


def test_zeta():
    assert _zeta(2.0) == pytest.approx(3.141592653589793**2 / 6, rel=1e-12)
    assert _zeta(3.0) == pytest.approx(1.2020569031595942, rel=1e-12)


def test_every_task_names_a_registered_scorer():
    """RULER's scorers are workers/contract/scorers.py's (tests/test_scorers.py holds them to RULER)."""
    assert {family.metric for family in TASKS.values()} <= set(SCORERS)


@pytest.mark.slow  # loading the tokenizer alone takes ~7-10 s; the fast loop counts words and characters
def test_the_embedded_tokenizer_sizes_prompts_too(smollm2_tokenizer):
    def count(text: str) -> int:
        return len(smollm2_tokenizer(text, add_special_tokens=False)["input_ids"])

    for task in ("niah_single_2", "niah_multikey_3", "variable_tracking", "common_words", "frequent_words"):
        for sample in generate(task, 2048, 2, 0, count):
            assert 0.95 * 2048 <= count(sample.prompt) <= 2048, sample.id
            assert all(answer in sample.context for answer in sample.answers)
