"""RULER's synthetic tasks, generated here from a seed, at a target prompt length in tokens.

RULER (Hsieh et al., 2024, "RULER: What's the Real Context Size of Your Long-Context Language
Models?", github.com/NVIDIA/RULER) measures retrieval and aggregation over long inputs with
synthetic families. This module rebuilds the synthetic ones from RULER's own scripts
(``scripts/data/synthetic/niah.py``, ``variable_tracking.py``, ``common_words_extraction.py``,
``freq_words_extraction.py``) with RULER's templates and answer prefixes word for word
(``scripts/data/synthetic/constants.py``) and its task configurations (``scripts/synthetic.yaml``,
the names of :data:`TASKS`), so scores are comparable with published RULER numbers:

- ``niah_*``: needles "One of the special magic numbers for <key> is: <value>." in a haystack of
  the repeated noise sentences ("The grass is green. ..."), of essay text, or of other needles;
  single, multi-key (distractor needles with other keys), multi-value (all values asked) and
  multi-query (several keys asked at once).
- ``variable_tracking``: chains ``VAR X1 = 12345``, ``VAR X2 = VAR X1``, ... in noise, after one
  worked example (RULER's few-shot); the answer is every variable holding the value.
- ``common_words``: a numbered list where 10 words repeat often; the answer is those 10.
- ``frequent_words``: coded words with Zipf frequencies; the answer is the three most frequent
  after the noise word ``...``.

No network and no new dependency. Where RULER reads downloaded data kvorch uses what it embeds:

- essay text is kvorch's embedded corpus (``orchestrator.corpus.load_corpus("pydoc")``: CPython's
  pydoc topics) instead of Paul Graham's essays, whitespace-normalized and cut into words as
  RULER does; sentences are cut by ``orchestrator.probes.haystack.sentences`` instead of nltk.
- words: RULER draws from the ``wonderwords`` package's lists; here the niah keys (RULER's
  "adjective-noun", e.g. ``quiet-lantern``) come from the small built-in :data:`ADJECTIVES` and
  :data:`NOUNS`, and common_words' words are the distinct lowercase words of the pydoc corpus
  (RULER's second list, ``english_words.json``, is replaced by hyphenated pairs of them when
  one list has too few words). So the words depend on the running CPython's pydoc text.

Where this module departs from RULER on purpose:

- ``length`` is the prompt (context + question + answer prefix) as ``count_tokens`` counts it.
  RULER's ``max_seq_length`` also counts the generated tokens: RULER at 4096 is
  ``generate(task, ruler_length(task, 4096), ...)``. Where RULER switches on its sequence length
  (common_words' repeats below 4096) the switch is on ``length + max_new_tokens``, so
  ``ruler_length`` reproduces it.
- the haystack is sized by a search on its units (lines, words; aimed by interpolation, then
  bisected) to the largest prompt <= ``length``; a sample whose prompt at that size is over the
  length or more than 2% under it is sized on its own (RULER shrinks such samples by steps and
  sizes frequent_words in steps of 1/32 of the length, which leaves prompts up to ~10% short).
- the asked needle's depth is spread evenly over the samples (sample i of n at i/(n-1)); the
  other needles take random depths from RULER's 40-point grid. RULER draws every depth at random;
  variable_tracking's chain lines still sit at random places, as in RULER.
- every random draw comes from one ``random.Random`` per sample (RULER reshuffles some lists with
  the same fixed seed for every sample); keys are distinct, distractor needles never reuse an
  asked key or value, values within a sample are distinct, variable_tracking's few-shot example
  is drawn afresh for each sample (RULER renames one example), and common_words' few-shot words
  are disjoint from the list's words, so every answer is unambiguous.
- empty stretches between needles in essay text are not joined (RULER leaves double spaces).

Imports orchestrator.corpus and orchestrator.probes.haystack only.
"""

from __future__ import annotations

import functools
import math
import random
import re
import string
import uuid
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, ClassVar

from orchestrator.corpus import EMBEDDED_CORPUS, load_corpus
from orchestrator.probes.haystack import sentences

CountTokens = Callable[[str], int]

# RULER's scripts/data/synthetic/constants.py, verbatim (the base model template is "{task_template}").
NIAH_TEMPLATE = (
    "Some special magic {type_needle_v} are hidden within the following text. Make sure to memorize it. "
    "I will quiz you about the {type_needle_v} afterwards.\n{context}\n"
    "What are all the special magic {type_needle_v} for {query} mentioned in the provided text?"
)
NIAH_ANSWER_PREFIX = " The special magic {type_needle_v} for {query} mentioned in the provided text are"
VT_TEMPLATE = (
    "Memorize and track the chain(s) of variable assignment hidden in the following text.\n\n{context}\n"
    "Question: Find all variables that are assigned the value {query} in the text above."
)
VT_ANSWER_PREFIX = (
    " Answer: According to the chain(s) of variable assignment in the text above, {num_v} variables are "
    "assigned the value {query}, they are: "
)
CWE_TEMPLATE = (
    "Below is a numbered list of words. In these words, some appear more often than others. Memorize the ones "
    "that appear most often.\n{context}\nQuestion: What are the 10 most common words in the above list?"
)
CWE_ANSWER_PREFIX = " Answer: The top 10 words that appear most often in the list are:"
FWE_TEMPLATE = (
    "Read the following coded text and track the frequency of each coded word. Find the three most frequently "
    "appeared coded words. {context}\nQuestion: Do not provide any explanation. Please ignore the dots '....'. "
    "What are the three most frequently appeared words in the above coded text?"
)
FWE_ANSWER_PREFIX = " Answer: According to the coded text above, the three most frequently appeared words are:"

# RULER's haystacks and needle (niah.py, variable_tracking.py).
NOISE = "The grass is green. The sky is blue. The sun is yellow. Here we go. There and back again."
NEEDLE = "One of the special magic {type_needle_v} for {key} is: {value}."
DEPTHS = tuple(round(100 * i / 39) for i in range(40))  # np.round(np.linspace(0, 100, 40)), in percent

HAYSTACKS = ("noise", "essay", "needle")
NEEDLE_TYPES = ("numbers", "words", "uuids")
VT_EXAMPLE_TOKENS = 500  # RULER sizes variable_tracking's few-shot example to 500 tokens
CWE_SHORT_BELOW = 4096  # RULER's common_words: fewer repeats when max_seq_length < 4096
ESSAY_MIN_WORDS = 16
SEARCH_PROBE = 16  # the search's first size: this many units above the smallest haystack
SLACK = 0.02  # a sample this much under the length (at the first sample's size) is sized on its own

# RULER's words are wonderwords' "adjective-noun"; these short built-in lists stand in for them.
ADJECTIVES = (
    "able", "absent", "agile", "ancient", "angry", "anxious", "bitter", "blue", "bold", "brave", "bright", "broad",
    "busy", "calm", "careful", "cheap", "cheerful", "clever", "cloudy", "clumsy", "cold", "colossal", "cool",
    "crisp", "curious", "damp", "dark", "deep", "delicate", "eager", "early", "elegant", "empty", "faint", "fancy",
    "fast", "fierce", "flat", "fluffy", "fragile", "fresh", "friendly", "gentle", "giant", "glossy", "golden",
    "grumpy", "happy", "heavy", "hollow", "honest", "huge", "humble", "icy", "jolly", "kind", "large", "lazy",
    "little", "lively", "loud", "lucky", "mellow", "mighty", "misty", "modern", "narrow", "neat", "nervous",
    "noisy", "odd", "pale", "patient", "plain", "polite", "proud", "quick", "quiet", "rapid", "rare", "rough",
    "round", "rusty", "sharp", "shiny", "silent", "silly", "slow", "smooth", "soft", "solid", "sour", "spicy",
    "steep", "sticky", "strange", "sweet", "tall", "tame", "tender", "tidy", "tiny", "warm", "wild", "wise",
    "witty", "young", "zealous",
)  # fmt: skip
NOUNS = (
    "anchor", "apple", "arrow", "badge", "bakery", "balloon", "banjo", "basket", "beacon", "bicycle", "blanket",
    "bottle", "bridge", "bucket", "butter", "cabin", "camera", "candle", "canyon", "carpet", "castle", "cherry",
    "chimney", "circle", "cloud", "compass", "cookie", "cotton", "crayon", "crystal", "curtain", "desert",
    "diamond", "dolphin", "dragon", "drum", "eagle", "engine", "feather", "fence", "fiddle", "forest", "fountain",
    "garden", "garlic", "glacier", "guitar", "hammer", "harbor", "helmet", "island", "jacket", "jungle", "kettle",
    "kitten", "ladder", "lantern", "lemon", "lizard", "magnet", "meadow", "mirror", "mountain", "napkin",
    "nectar", "ocean", "orchard", "otter", "paddle", "parrot", "pebble", "pencil", "pepper", "piano", "pillow",
    "planet", "pocket", "pumpkin", "puzzle", "rabbit", "ribbon", "river", "rocket", "saddle", "sandal", "shadow",
    "shovel", "spoon", "squirrel", "statue", "stream", "sunset", "teapot", "thunder", "tiger", "tower", "tractor",
    "trumpet", "tunnel", "turtle", "umbrella", "valley", "violin", "wagon", "walnut", "window", "wizard",
    "yogurt", "zebra",
)  # fmt: skip


@dataclass(frozen=True)
class TaskSample:
    """One RULER prompt: ``context + question + answer_prefix`` is RULER's full input; the model
    continues after the answer prefix for up to ``max_new_tokens`` tokens."""

    id: str  # "<task>/<length>/<sample>", e.g. "niah_single_2/4096/0"
    task: str  # the name in TASKS
    context: str  # the template up to and including the long input (few-shot example, instructions, haystack)
    question: str  # the template after the long input, up to the answer prefix
    answer_prefix: str  # RULER's answer prefix, e.g. " The special magic number for X mentioned in ... is"
    answers: tuple[str, ...]  # every one must appear in the output (ruler_all) or any one (ruler_part)
    metric: str  # "ruler_all" (RULER's string_match_all) or "ruler_part" (string_match_part)
    max_new_tokens: int  # RULER's tokens_to_generate for the task
    depth: float | None = None  # niah: the asked needle's depth in the haystack (0 = start, 1 = end)

    @property
    def prompt(self) -> str:
        return self.context + self.question + self.answer_prefix


@dataclass(frozen=True)
class _Prompt:
    """A built prompt before it is numbered: what ``TaskFamily.build`` returns."""

    context: str
    question: str
    answer_prefix: str
    answers: tuple[str, ...]
    depth: float | None = None

    @property
    def text(self) -> str:
        return self.context + self.question + self.answer_prefix


class TaskFamily:
    """A RULER family: ``build`` makes one prompt from a haystack size (in the family's units:
    lines, words) and a sample's RNG; ``samples`` sizes it to a length. Subclasses are frozen
    dataclasses whose fields are the RULER configuration's arguments."""

    max_new_tokens: ClassVar[int]
    metric: ClassVar[str] = "ruler_all"

    def min_size(self, length: int) -> int:
        """The smallest haystack the family builds (RULER needs room for every needle)."""
        raise NotImplementedError

    def prepare(self, task: str, length: int, seed: int, count_tokens: CountTokens) -> Any:
        """What every sample of one ``generate`` call shares (variable_tracking: the example's size)."""
        return None

    def build(self, size: int, rng: random.Random, depth: float, length: int, prepared: Any) -> _Prompt:
        raise NotImplementedError

    def samples(self, task: str, length: int, n: int, seed: int, count_tokens: CountTokens) -> list[TaskSample]:
        """``n`` samples, each prompt <= ``length`` tokens and as close to it as whole units allow."""
        prepared = self.prepare(task, length, seed, count_tokens)

        def prompt(size: int, i: int) -> _Prompt:
            rng = random.Random(f"ruler/{task}/{length}/{seed}/{i}")
            return self.build(size, rng, _depth(i, n), length, prepared)

        def tokens(size: int, i: int) -> int:
            return count_tokens(prompt(size, i).text)

        smallest = self.min_size(length)
        need = max(tokens(smallest, i) for i in range(n))
        if need > length:
            raise ValueError(
                f"{task}: length {length} is too short: its smallest prompt (instructions, needles or words, "
                f"question) takes {need} tokens; use length >= {need}"
            )
        best = _largest_fitting(lambda size: tokens(size, 0), smallest, length)
        out = []
        for i in range(n):
            built = prompt(best, i)
            used = count_tokens(built.text)
            if used > length or used < (1 - SLACK) * length:  # this sample's words tokenize otherwise
                built = prompt(_largest_fitting(lambda size, i=i: tokens(size, i), smallest, length, best), i)
            out.append(
                TaskSample(
                    id=f"{task}/{length}/{i}",
                    task=task,
                    context=built.context,
                    question=built.question,
                    answer_prefix=built.answer_prefix,
                    answers=built.answers,
                    metric=self.metric,
                    max_new_tokens=self.max_new_tokens,
                    depth=built.depth,
                )
            )
        return out


@dataclass(frozen=True)
class Niah(TaskFamily):
    """Needles in a haystack (RULER's niah.py). ``haystack``: "noise" (the repeated noise line),
    "essay" (corpus text cut at sentences) or "needle" (lines of needles with other keys);
    ``keys`` needles' keys, ``values`` values per key, ``queries`` keys asked."""

    haystack: str = "essay"
    key_type: str = "words"
    value_type: str = "numbers"
    keys: int = 1
    values: int = 1
    queries: int = 1

    max_new_tokens: ClassVar[int] = 128

    def __post_init__(self) -> None:
        if self.haystack not in HAYSTACKS:
            raise ValueError(f"haystack {self.haystack!r}: use one of {', '.join(HAYSTACKS)}")
        for what, kind in (("key_type", self.key_type), ("value_type", self.value_type)):
            if kind not in NEEDLE_TYPES:
                raise ValueError(f"{what} {kind!r}: use one of {', '.join(NEEDLE_TYPES)}")
        if min(self.keys, self.values, self.queries) < 1 or max(self.keys, self.queries) * self.values > len(DEPTHS):
            raise ValueError(f"keys, values and queries must be >= 1 with at most {len(DEPTHS)} needles")

    def min_size(self, length: int) -> int:
        return ESSAY_MIN_WORDS if self.haystack == "essay" else 1

    def build(self, size: int, rng: random.Random, depth: float, length: int, prepared: Any) -> _Prompt:
        used: set[str] = set()
        keys = [_draw(rng, self.key_type, used) for _ in range(max(self.keys, self.queries))]
        values = [[_draw(rng, self.value_type, used) for _ in range(self.values)] for _ in keys]
        asked = rng.sample(range(len(keys)), self.queries)
        first = (keys[asked[0]], values[asked[0]][0])
        others = [(key, value) for key, vs in zip(keys, values) for value in vs if (key, value) != first]
        rng.shuffle(others)
        depths = [depth] + [d / 100 for d in rng.sample(DEPTHS, len(others))]
        placed = sorted(zip(depths, [first, *others]), key=lambda pair: pair[0])
        needles = [(d, NEEDLE.format(type_needle_v=self.value_type, key=k, value=v)) for d, (k, v) in placed]
        if self.haystack == "essay":
            haystack = _in_essay(size, needles)
        else:
            lines = [NOISE] * size if self.haystack == "noise" else self._distractors(rng, size, used)
            for d, needle in reversed(needles):
                lines.insert(round(d * size), needle)
            haystack = "\n".join(lines)

        queries = [keys[i] for i in asked]
        query = ", ".join(queries[:-1]) + ", and " + queries[-1] if len(queries) > 1 else queries[0]
        template, prefix, type_needle_v = NIAH_TEMPLATE, NIAH_ANSWER_PREFIX, self.value_type
        if self.queries * self.values == 1:  # RULER's singular wording
            template, prefix = (_singular(text) for text in (template, prefix))
            type_needle_v = type_needle_v[:-1]
        head, tail = template.split("{context}")
        fields = {"type_needle_v": type_needle_v, "query": query}
        return _Prompt(
            context=head.format(**fields) + haystack,
            question=tail.format(**fields),
            answer_prefix=prefix.format(**fields),
            answers=tuple(value for i in asked for value in values[i]),
            depth=depth,
        )

    def _distractors(self, rng: random.Random, size: int, used: set[str]) -> list[str]:
        """Needle lines whose keys and values are none of the real needles' (repeats allowed)."""
        return [
            NEEDLE.format(
                type_needle_v=self.value_type,
                key=_fresh(rng, self.key_type, used),
                value=_fresh(rng, self.value_type, used),
            )
            for _ in range(size)
        ]


@dataclass(frozen=True)
class VariableTracking(TaskFamily):
    """Chains of variable assignments in noise (RULER's variable_tracking.py), after one worked
    example of ``VT_EXAMPLE_TOKENS`` tokens with 3-letter names (RULER's few-shot). The answer is
    the first chain's variables."""

    chains: int = 1
    hops: int = 4

    max_new_tokens: ClassVar[int] = 30

    def __post_init__(self) -> None:
        if self.chains < 1 or self.hops < 1:
            raise ValueError("chains and hops must be >= 1")

    def min_size(self, length: int) -> int:
        return self.hops + 1  # RULER draws the first chain's lines among as many noise lines

    def prepare(self, task: str, length: int, seed: int, count_tokens: CountTokens) -> int:
        """The example's noise lines: the most whose example prompt is <= VT_EXAMPLE_TOKENS."""
        hops = min(10, self.hops)

        def tokens(noises: int) -> int:
            rng = random.Random(f"ruler/{task}/{length}/{seed}/example")
            names, value, lines = _chains(rng, 3, hops, 1, set(), set())
            return count_tokens(self._prompt(_noise(rng, noises, lines), value, hops).text)

        if tokens(hops + 1) > VT_EXAMPLE_TOKENS:
            return hops + 1
        return _largest_fitting(tokens, hops + 1, VT_EXAMPLE_TOKENS)

    def build(self, size: int, rng: random.Random, depth: float, length: int, prepared: Any) -> _Prompt:
        names: set[str] = {"VAR"}
        values: set[str] = set()
        chain_names, value, chain_lines = _chains(rng, 5, self.hops, self.chains, names, values)
        hops = min(10, self.hops)
        example_names, example_value, example_lines = _chains(rng, 3, hops, 1, names, values)
        example = self._prompt(_noise(rng, prepared, example_lines), example_value, hops)
        shot = example.text + " " + " ".join(example_names) + "\n"  # RULER: input + " " + answers + "\n"
        main = self._prompt(_noise(rng, size, chain_lines), value, self.hops)
        return _Prompt(shot + "\n" + main.context, main.question, main.answer_prefix, tuple(chain_names))

    def _prompt(self, haystack: str, value: str, hops: int) -> _Prompt:
        head, tail = VT_TEMPLATE.split("{context}")
        fields = {"query": value, "num_v": hops + 1}
        return _Prompt(head + haystack, tail.format(**fields), VT_ANSWER_PREFIX.format(**fields), ())


@dataclass(frozen=True)
class CommonWords(TaskFamily):
    """A numbered list of words where 10 repeat ``freq_cw`` times and the rest ``freq_ucw``
    times (RULER's common_words_extraction.py), after one worked example. Below RULER's 4096
    the repeats are 6 and 1 and the example shorter, as RULER does. The size is the number of
    distinct words."""

    freq_cw: int = 30
    freq_ucw: int = 3
    num_fewshot: int = 1

    max_new_tokens: ClassVar[int] = 120
    num_cw: ClassVar[int] = 10  # RULER's template says "10" in words

    def __post_init__(self) -> None:
        if not self.freq_cw > self.freq_ucw >= 1 or self.num_fewshot < 0:
            raise ValueError("freq_cw must exceed freq_ucw >= 1, and num_fewshot must be >= 0")

    def min_size(self, length: int) -> int:
        return self.num_cw + 1

    def build(self, size: int, rng: random.Random, depth: float, length: int, prepared: Any) -> _Prompt:
        short = length + self.max_new_tokens < CWE_SHORT_BELOW
        head, tail = CWE_TEMPLATE.split("{context}")
        pool = list(_corpus_words())
        shots = []
        for _ in range(self.num_fewshot):
            words = rng.sample(pool, 20 if short else 40)
            taken = set(words)
            pool = [word for word in pool if word not in taken]
            listing, common = self._listing(rng, words, *((3, 1) if short else (10, 3)))
            shots.append(head + listing + tail + CWE_ANSWER_PREFIX + " " + _numbered(common))
        repeats = (6, 1) if short else (self.freq_cw, self.freq_ucw)
        listing, common = self._listing(rng, _draw_words(rng, pool, size), *repeats)
        context = "".join(shot + "\n" for shot in shots) + head + listing
        return _Prompt(context, tail, CWE_ANSWER_PREFIX, tuple(common))

    def _listing(self, rng: random.Random, words: list[str], common: int, uncommon: int) -> tuple[str, list[str]]:
        """RULER's get_example: the first 10 words repeated ``common`` times, the others
        ``uncommon`` times, shuffled and numbered "1. w 2. w ..."."""
        top = words[: self.num_cw]
        listed = top * common + words[self.num_cw :] * uncommon
        rng.shuffle(listed)
        return _numbered(listed), top


@dataclass(frozen=True)
class FrequentWords(TaskFamily):
    """Coded words of ``coded_wordlen`` letters drawn with Zipf frequencies (exponent ``alpha``),
    the most frequent replaced by the noise word ``...`` (RULER's freq_words_extraction.py); the
    answer is the next three. The vocabulary has length // 50 words (at least 5), as RULER's.
    The size is RULER's ``num_words``: word k appears int(size * k**-alpha / zeta(alpha)) times."""

    alpha: float = 2.0
    coded_wordlen: int = 6

    max_new_tokens: ClassVar[int] = 50

    def __post_init__(self) -> None:
        if self.alpha <= 1 or self.coded_wordlen < 2:
            raise ValueError("alpha must exceed 1 and coded_wordlen must be >= 2")

    def min_size(self, length: int) -> int:
        """The fewest words at which the three answers are each present and strictly more
        frequent than every other coded word."""
        vocab = _vocab_size(length)
        size = 1
        while True:
            counts = _zipf_counts(size, min(vocab, 5), self.alpha)
            if counts[3] >= 1 and (len(counts) < 5 or counts[3] > counts[4]):
                return size
            size += 1

    def build(self, size: int, rng: random.Random, depth: float, length: int, prepared: Any) -> _Prompt:
        vocab_size = _vocab_size(length)
        vocab: set[str] = set()
        while len(vocab) < vocab_size:
            vocab.add("".join(rng.choices(string.ascii_lowercase, k=self.coded_wordlen)))
        ranked = sorted(vocab)
        rng.shuffle(ranked)
        ranked[0] = "..."  # RULER: the top-ranked word is noise
        words = [word for word, count in zip(ranked, _zipf_counts(size, vocab_size, self.alpha)) for _ in range(count)]
        rng.shuffle(words)
        head, tail = FWE_TEMPLATE.split("{context}")
        return _Prompt(head + " ".join(words), tail, FWE_ANSWER_PREFIX, tuple(ranked[1:4]))


# RULER's scripts/synthetic.yaml: the 13 synthetic tasks less qa_1 and qa_2 (which read SQuAD and
# HotpotQA); vt, cwe and fwe under their long names.
TASKS: dict[str, TaskFamily] = {
    "niah_single_1": Niah(haystack="noise", key_type="words", value_type="numbers"),
    "niah_single_2": Niah(haystack="essay", key_type="words", value_type="numbers"),
    "niah_single_3": Niah(haystack="essay", key_type="words", value_type="uuids"),
    "niah_multikey_1": Niah(haystack="essay", key_type="words", value_type="numbers", keys=4),
    "niah_multikey_2": Niah(haystack="needle", key_type="words", value_type="numbers"),
    "niah_multikey_3": Niah(haystack="needle", key_type="uuids", value_type="uuids"),
    "niah_multivalue": Niah(haystack="essay", key_type="words", value_type="numbers", values=4),
    "niah_multiquery": Niah(haystack="essay", key_type="words", value_type="numbers", queries=4),
    "variable_tracking": VariableTracking(chains=1, hops=4),
    "common_words": CommonWords(freq_cw=30, freq_ucw=3),
    "frequent_words": FrequentWords(alpha=2.0),
}


def generate(task: str, length: int, n: int, seed: int, count_tokens: CountTokens) -> list[TaskSample]:
    """``n`` samples of ``task`` whose prompts (context + question + answer prefix) are at most
    ``length`` tokens by ``count_tokens`` and close to it. The same arguments give the same
    samples in any process. ValueError (one line) for an unknown task or a length too short."""
    family = TASKS.get(task)
    if family is None:
        raise ValueError(f"unknown RULER task {task!r}; valid tasks: {', '.join(TASKS)}")
    for name, value, least in (("length", length, 1), ("n", n, 1), ("seed", seed, None)):
        if isinstance(value, bool) or not isinstance(value, int) or (least is not None and value < least):
            raise ValueError(f"{name} {value!r}: use a whole number" + (f" >= {least}" if least is not None else ""))
    return family.samples(task, length, n, seed, count_tokens)


def ruler_length(task: str, max_seq_length: int) -> int:
    """The ``length`` that matches RULER's ``max_seq_length``, which also counts the generated tokens."""
    if task not in TASKS:
        raise ValueError(f"unknown RULER task {task!r}; valid tasks: {', '.join(TASKS)}")
    return max_seq_length - TASKS[task].max_new_tokens


def _depth(i: int, n: int) -> float:
    """Sample i of n puts the asked needle at i/(n-1) of the haystack (one sample: the middle)."""
    return i / (n - 1) if n > 1 else 0.5


def _largest_fitting(tokens: Callable[[int], int], smallest: int, length: int, guess: int | None = None) -> int:
    """The largest size >= ``smallest`` with tokens(size) <= length, given tokens(smallest) <= length
    and tokens growing with size (near linearly): sizes aimed by the line through the nearest
    sizes counted, from ``guess`` (default: ``SEARCH_PROBE`` above the smallest), bisecting
    whenever an aim fails to halve the bracket; a few counts where RULER bisects ~20 times."""
    counted = {smallest: tokens(smallest)}
    good, bad = smallest, None
    aim = guess if guess is not None else smallest + SEARCH_PROBE
    jump = 1
    while bad is None or bad - good > 1:
        width = None if bad is None else bad - good
        size = max(good + 1, aim) if bad is None else min(max(good + 1, aim), bad - 1)
        counted[size] = tokens(size)
        if counted[size] <= length:
            good = size
        else:
            bad = size
        room = length - counted[good]
        if bad is None:  # extrapolate from the two largest sizes counted; grow faster while all fit
            below = max(k for k in counted if k < good)
            per_unit = max((counted[good] - counted[below]) / (good - below), 1e-6)
            aim = good + max(jump, int(room / per_unit))
            jump *= 2
        elif width is not None and 2 * (bad - good) > width:
            aim = (good + bad) // 2
        else:
            per_unit = max((counted[bad] - counted[good]) / (bad - good), 1e-6)
            aim = good + int(room / per_unit)
    return good


def _singular(text: str) -> str:
    """RULER's wording for one asked value: its replacements, in its order."""
    for plural, single in (("Some", "A"), ("are all", "is"), ("are", "is"), ("answers", "answer")):
        text = text.replace(plural, single)
    return text


def _random(rng: random.Random, kind: str) -> str:
    """RULER's generate_random: a 7-digit number, an adjective-noun, or a version-4 uuid."""
    if kind == "numbers":
        return str(rng.randint(1_000_000, 9_999_999))
    if kind == "words":
        return f"{rng.choice(ADJECTIVES)}-{rng.choice(NOUNS)}"
    return str(uuid.UUID(int=rng.getrandbits(128), version=4))


def _draw(rng: random.Random, kind: str, used: set[str]) -> str:
    """A random ``kind`` not in ``used``, added to it."""
    text = _fresh(rng, kind, used)
    used.add(text)
    return text


def _fresh(rng: random.Random, kind: str, used: set[str]) -> str:
    text = _random(rng, kind)
    while text in used:
        text = _random(rng, kind)
    return text


def _in_essay(words: int, needles: list[tuple[float, str]]) -> str:
    """RULER's essay haystack: the first ``words`` words of the essay text (repeated when it is
    shorter), cut at sentences, each needle after int(sentences * depth) of them."""
    essay = _essay_words()
    text = " ".join((essay * (words // len(essay) + 1))[:words])
    sents = [s.strip() for s in sentences(text) if s.strip()]
    parts, last = [], 0
    for depth, needle in needles:
        at = int(len(sents) * depth)
        parts += [" ".join(sents[last:at]), needle]
        last = at
    parts.append(" ".join(sents[last:]))
    return " ".join(part for part in parts if part)


def _chains(
    rng: random.Random, letters: int, hops: int, count: int, names: set[str], values: set[str]
) -> tuple[list[str], str, list[list[str]]]:
    """RULER's generate_chains: ``count`` chains of ``hops + 1`` distinct names of ``letters``
    capitals, each "VAR A = 12345" then "VAR B = VAR A " ... (RULER's trailing space kept).
    Returns the first chain's names, its value, and every chain's lines."""
    chains, first_names, first_value = [], [], ""
    for c in range(count):
        chain_names = [_fresh_name(rng, letters, names) for _ in range(hops + 1)]
        value = str(rng.randint(10_000, 99_998))  # np.random.randint(10000, 99999)
        while value in values:
            value = str(rng.randint(10_000, 99_998))
        values.add(value)
        lines = [f"VAR {chain_names[0]} = {value}"]
        lines += [f"VAR {chain_names[j + 1]} = VAR {chain_names[j]} " for j in range(hops)]
        chains.append(lines)
        if c == 0:
            first_names, first_value = chain_names, value
    return first_names, first_value, chains


def _fresh_name(rng: random.Random, letters: int, names: set[str]) -> str:
    name = "".join(rng.choices(string.ascii_uppercase, k=letters))
    while name in names:
        name = "".join(rng.choices(string.ascii_uppercase, k=letters))
    names.add(name)
    return name


def _noise(rng: random.Random, noises: int, chains: list[list[str]]) -> str:
    """RULER's noise haystack for variable tracking: each chain's lines at sorted random places."""
    lines = [NOISE] * noises
    for chain in chains:
        for j, at in enumerate(sorted(rng.sample(range(len(lines)), len(chain)))):
            lines.insert(at + j, chain[j])
    return "\n".join(lines).replace(". \n", ".\n")


def _numbered(words: list[str]) -> str:
    return " ".join(f"{i + 1}. {word}" for i, word in enumerate(words))


def _draw_words(rng: random.Random, pool: list[str], size: int) -> list[str]:
    """``size`` distinct words: from ``pool`` while it has enough; beyond, all of it plus
    hyphenated pairs of its words (RULER then turns to a larger word list), shuffled."""
    if size <= len(pool):
        return rng.sample(pool, size)
    count = len(pool)
    pairs = []
    for index in rng.sample(range(count * (count - 1)), size - count):
        a, b = divmod(index, count - 1)
        pairs.append(f"{pool[a]}-{pool[b + (b >= a)]}")
    words = pool + pairs
    rng.shuffle(words)
    return words


def _vocab_size(length: int) -> int:
    return max(length // 50, 5)


def _zipf_counts(size: int, vocab: int, alpha: float) -> list[int]:
    return [int(size * k**-alpha / _zeta(alpha)) for k in range(1, vocab + 1)]


@functools.cache
def _zeta(alpha: float) -> float:
    """Riemann zeta(alpha) for alpha > 1 (scipy.special.zeta in RULER): a partial sum and the
    Euler-Maclaurin tail, exact to ~1e-12."""
    m = 1000
    head = math.fsum(k**-alpha for k in range(1, m))
    return head + m ** (1 - alpha) / (alpha - 1) + m**-alpha / 2 + alpha * m ** (-alpha - 1) / 12


@functools.cache
def _essay_words() -> tuple[str, ...]:
    """The embedded corpus as RULER reads its essays: whitespace runs made one space, cut at spaces."""
    text = " ".join(document.text for document in load_corpus(EMBEDDED_CORPUS))
    return tuple(re.sub(r"\s+", " ", text).strip().split(" "))


@functools.cache
def _corpus_words() -> tuple[str, ...]:
    """common_words' word list: the embedded corpus's distinct words of 4 to 12 lowercase letters
    (punctuation around them dropped; identifiers such as ``str.join`` or ``didn't`` are not
    words), sorted (RULER: wonderwords' nouns, adjectives and verbs)."""
    words = (word.strip(".,;:!?()\"'") for word in _essay_words())
    return tuple(sorted({word for word in words if re.fullmatch(r"[a-z]{4,12}", word)}))
