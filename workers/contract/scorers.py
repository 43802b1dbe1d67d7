"""The scorers the field uses for generated answers: one function per metric, each a
re-implementation of its reference (named in its docstring, with every place it differs), on a
0..1 scale (the references multiply by 100 when they average; kvorch keeps 0..1 per document).

Every scorer takes the prediction (the generated text) and the document's reference answers and
returns a float; where a benchmark gives several answers, the reference's rule for them is kept
(all of them for ``ruler_all``, the best one elsewhere). ``score`` checks the answers first;
``scorer`` resolves a metric name (the driver checks ``--metric`` at submit with it, the actors
score with it). Standard library only: the driver imports this without torch.
"""

from __future__ import annotations

import re
import string
from collections import Counter
from collections.abc import Callable

# ---------------------------------------------------------------- RULER (NVIDIA/RULER)

# RULER's postprocess_pred (scripts/eval/evaluate.py): control characters become newlines.
_CONTROL = re.compile(r"[\x00-\x1f]")


def _ruler_prediction(prediction: str) -> str:
    return _CONTROL.sub("\n", prediction.strip()).strip().lower()


def ruler_all(prediction: str, answers: list[str]) -> float:
    """RULER's ``string_match_all`` for one document: the fraction of the answers found in the
    prediction as substrings, case-insensitive (NVIDIA/RULER scripts/eval/synthetic/constants.py,
    with the prediction cleaned as its ``postprocess_pred`` does: stripped, control characters
    made newlines). RULER uses it for niah, variable tracking and the word-extraction tasks.
    Difference: 0..1, unrounded (RULER averages over documents, times 100, rounded to 2 places).
    kvpress's copy (evaluation/benchmarks/ruler) deletes control characters instead of making them
    newlines, which differs only when an answer would span one."""
    pred = _ruler_prediction(prediction)
    return sum(1.0 if answer.lower() in pred else 0.0 for answer in answers) / len(answers)


def ruler_part(prediction: str, answers: list[str]) -> float:
    """RULER's ``string_match_part`` for one document: 1.0 when any answer is a substring of the
    prediction, case-insensitive, else 0.0 (NVIDIA/RULER scripts/eval/synthetic/constants.py;
    RULER's qa tasks). Same cleaning and scale as ``ruler_all``."""
    pred = _ruler_prediction(prediction)
    return max(1.0 if answer.lower() in pred else 0.0 for answer in answers)


# ------------------------------------------------- SQuAD / LongBench (THUDM/LongBench metrics.py)

_ARTICLES = re.compile(r"\b(a|an|the)\b")
_PUNCTUATION = frozenset(string.punctuation)


def normalize_answer(text: str) -> str:
    """SQuAD's and LongBench's ``normalize_answer``: lowercase, drop ASCII punctuation, replace
    the words a/an/the by a space, collapse whitespace (in that order)."""
    text = "".join(ch for ch in text.lower() if ch not in _PUNCTUATION)
    return " ".join(_ARTICLES.sub(" ", text).split())


def exact_match(prediction: str, answers: list[str]) -> float:
    """Normalized exact match, best over the answers: SQuAD v1.1's ``exact_match_score`` under
    ``metric_max_over_ground_truths`` (evaluate-v1.1.py), with ``normalize_answer`` as LongBench's
    metrics.py has it. As there, a prediction and an answer that both normalize to "" (say "The."
    and "a") match."""
    pred = normalize_answer(prediction)
    return max(1.0 if pred == normalize_answer(answer) else 0.0 for answer in answers)


def _token_f1(prediction: str, answer: str) -> float:
    pred, gold = normalize_answer(prediction).split(), normalize_answer(answer).split()
    same = sum((Counter(pred) & Counter(gold)).values())
    if same == 0:  # also when either side has no tokens left
        return 0.0
    precision, recall = same / len(pred), same / len(gold)
    return 2 * precision * recall / (precision + recall)


def qa_f1(prediction: str, answers: list[str]) -> float:
    """LongBench's ``qa_f1_score`` (THUDM/LongBench metrics.py; narrativeqa, qasper, multifieldqa_en,
    hotpotqa, 2wikimqa, musique, triviaqa): the F1 of the bags of whitespace tokens of the two
    normalized strings, 0 when they share no token (even when both are empty: SQuAD v2's script
    scores that 1, LongBench 0, and this follows LongBench); best over the answers, as LongBench's
    ``scorer`` takes it. Difference: LongBench's scorer keeps only the first line of the prediction
    for triviaqa (and trec, samsum, lsht); that is the caller's choice of prediction here."""
    return max(_token_f1(prediction, answer) for answer in answers)


# --------------------------------------------- MATH-500 / AIME (hendrycks/math, lm-eval hendrycks_math)


def last_boxed(text: str) -> str | None:
    """The content of the last ``\\boxed{...}`` of ``text``, braces balanced, or of the last
    ``\\fbox{...}`` when there is no ``\\boxed`` at all; None when there is neither, or the box is
    not closed. Follows ``last_boxed_only_string`` + ``remove_boxed`` of hendrycks/math
    (modeling/eval_math_gpt.py) and lm-eval's hendrycks_math/utils.py, including lm-eval's
    ``\\boxed 5`` form (the text up to the next ``$``). Differences: the references' remove_boxed
    rejects the ``\\fbox`` they find (kvorch unwraps it); lm-eval takes the ``\\boxed `` form whenever
    one occurs anywhere, kvorch only when the last ``\\boxed`` is one."""
    command = "\\boxed"
    start = text.rfind(command)
    if start < 0:
        command = "\\fbox"
        start = text.rfind(command)
        if start < 0:
            return None
    rest = text[start + len(command) :]
    if command == "\\boxed" and rest.startswith(" "):
        return rest[1:].split("$")[0]
    if not rest.startswith("{"):
        return None
    depth = 0
    for i, ch in enumerate(rest):
        if ch == "{":
            depth += 1
        elif ch == "}":
            depth -= 1
            if depth == 0:
                return rest[1:i]
    return None


def _fix_sqrt(s: str) -> str:
    # \sqrt3 -> \sqrt{3}: the first character after \sqrt is braced
    head, *parts = s.split("\\sqrt")
    return head + "".join("\\sqrt" + (p if not p or p[0] == "{" else "{" + p[0] + "}" + p[1:]) for p in parts)


def _fix_fracs(s: str) -> str:
    # \frac12 -> \frac{1}{2}, \frac1{72} -> \frac{1}{72}; a \frac with under two characters after it: unchanged
    head, *parts = s.split("\\frac")
    out = head
    for p in parts:
        if p[:1] == "{":
            out += "\\frac" + p
        elif len(p) < 2:
            return s
        elif p[1] == "{":
            out += "\\frac{" + p[0] + "}" + p[1:]
        else:
            out += "\\frac{" + p[0] + "}{" + p[1] + "}" + p[2:]
    return out


def _fix_a_slash_b(s: str) -> str:
    # 3/4 -> \frac{3}{4}, integers written plainly only
    parts = s.split("/")
    if len(parts) != 2:
        return s
    try:
        a, b = int(parts[0]), int(parts[1])
    except ValueError:
        return s
    return f"\\frac{{{a}}}{{{b}}}" if s == f"{a}/{b}" else s


_TEXT = re.compile(r"\\text\{([^{}]*)\}")


def strip_math(s: str) -> str:
    """A math answer in a canonical form, for string equality: hendrycks/math's ``_strip_string``
    (modeling/math_equivalence.py; lm-eval's ``strip_string``), step for step: no newlines, no
    ``\\!``, ``\\\\`` -> ``\\``, tfrac/dfrac -> frac, no ``\\left``/``\\right``, no degrees (``^\\circ``),
    no ``\\$``, units dropped (everything from ``\\text{ `` on), no ``\\%``, ``.5`` -> ``0.5``, a
    short ``k = `` prefix dropped, ``\\sqrt3`` -> ``\\sqrt{3}``, no spaces, ``\\frac12`` ->
    ``\\frac{1}{2}``, exactly ``0.5`` -> ``\\frac{1}{2}``, ``3/4`` -> ``\\frac{3}{4}``.

    Added (the reference has none of these): surrounding ``$`` and one trailing ``.`` are removed
    first, and ``\\text{...}`` is unwrapped after the units step. Where the reference raises (two
    ``\\text{ ``, a ``\\sqrt`` at the end, a non-integer ``a/b`` in lm-eval's copy) its ``is_equiv``
    falls back to comparing the raw strings; kvorch normalizes those too (keeping what precedes the
    first ``\\text{ ``, leaving a bare ``\\sqrt``)."""
    s = s.strip()
    while len(s) >= 2 and s[0] == "$" and s[-1] == "$" and s[-2] != "\\":
        s = s[1:-1].strip()
    s = s.removesuffix(".")
    s = s.replace("\n", "").replace("\\!", "").replace("\\\\", "\\")
    s = s.replace("tfrac", "frac").replace("dfrac", "frac")
    s = s.replace("\\left", "").replace("\\right", "")
    s = s.replace("^{\\circ}", "").replace("^\\circ", "")
    s = s.replace("\\$", "")
    s = s.split("\\text{ ")[0]
    s = _TEXT.sub(r"\1", s)
    s = s.replace("\\%", "")
    s = s.replace(" .", " 0.").replace("{.", "{0.")
    if not s:
        return s
    if s[0] == ".":
        s = "0" + s
    sides = s.split("=")
    if len(sides) == 2 and len(sides[0]) <= 2:
        s = sides[1]
    s = _fix_sqrt(s).replace(" ", "")
    s = _fix_fracs(s)
    if s == "0.5":
        s = "\\frac{1}{2}"
    return _fix_a_slash_b(s)


def boxed_match(prediction: str, answers: list[str]) -> float:
    """1.0 when the last boxed answer of the prediction (``last_boxed``) equals an answer after
    ``strip_math`` on both, else 0.0; a prediction with no closed box scores 0. This is the
    MATH benchmark's check (hendrycks/math ``is_equiv`` on ``remove_boxed(last_boxed_only_string())``,
    lm-eval's hendrycks_math), used for MATH-500 and AIME answers (AIME's are integers, which
    compare as strings: "017" is not "17", as in the reference). No numeric equality beyond the
    reference's own rewrites ("0.5" and "1/2" both become ``\\frac{1}{2}``; "0.50" stays itself).
    Differences: lm-eval's aime task, with no box, falls back to the text between the first and
    last ``$`` or the whole response (0 here); kvpress's math500/aime25 take the text from the
    first (math500) or last (aime25) ``boxed{`` to the next ``}``, which cuts ``\\frac{1}{2}`` short,
    and compare raw strings."""
    boxed = last_boxed(prediction)
    if boxed is None:
        return 0.0
    pred = strip_math(boxed)
    return max(1.0 if pred == strip_math(answer) else 0.0 for answer in answers)


# ------------------------------------------------- LongBench v2 (THUDM/LongBench pred.py)

_CHOICE_PARENS = re.compile(r"The correct answer is \(([A-D])\)")
_CHOICE_BARE = re.compile(r"The correct answer is ([A-D])")
_CHOICE_LONE = re.compile(r"\(?([A-D])\)?\.?")


def chosen_letter(prediction: str) -> str | None:
    """The letter (A-D) a prediction chooses: LongBench v2's ``extract_answer`` (pred.py), asterisks
    removed, the first "The correct answer is (X)", else the first "The correct answer is X"
    (case-sensitive, as there). Added: a prediction that is only a letter ("B", "(B)", "B.") chooses
    it. None otherwise."""
    text = prediction.replace("*", "")
    for pattern in (_CHOICE_PARENS, _CHOICE_BARE):
        found = pattern.search(text)
        if found:
            return found.group(1)
    lone = _CHOICE_LONE.fullmatch(text.strip())
    return lone.group(1) if lone else None


def multiple_choice(prediction: str, answers: list[str]) -> float:
    """LongBench v2's judge (``pred == answer``, THUDM/LongBench pred.py): 1.0 when
    ``chosen_letter(prediction)`` is one of the answer letters (compared stripped), else 0.0.
    kvpress's copy (evaluation/benchmarks/longbenchv2) tests both phrasings for the right letter
    anywhere, so a response naming two letters can score there and not here (the first one wins)."""
    letter = chosen_letter(prediction)
    return 1.0 if letter is not None and letter in {answer.strip() for answer in answers} else 0.0


# ---------------------------------------------------------------- the registry

Scorer = Callable[[str, list[str]], float]

SCORERS: dict[str, Scorer] = {
    "ruler_all": ruler_all,
    "ruler_part": ruler_part,
    "exact_match": exact_match,
    "qa_f1": qa_f1,
    "boxed": boxed_match,
    "multiple_choice": multiple_choice,
}


def scorer(name: str) -> Scorer:
    """The scorer of a metric name; ValueError (one line, the valid names) for any other name."""
    try:
        return SCORERS[name]
    except (KeyError, TypeError):
        raise ValueError(f"unknown metric {name!r}; use one of {', '.join(SCORERS)}") from None


def check_answers(answers: object) -> list[str]:
    """``answers`` when it is a non-empty list of strings with text in each; else ValueError, one
    line. (An empty answer would be a substring of every prediction: a free 1.0 under RULER.)"""
    if not isinstance(answers, (list, tuple)):
        raise ValueError(
            f"answers must be a list of strings, got {type(answers).__name__}: wrap a single answer in a list"
        )
    if not answers:
        raise ValueError("answers is an empty list: give each document at least one reference answer")
    for answer in answers:
        if not isinstance(answer, str) or not answer.strip():
            shown = repr(answer) if isinstance(answer, str) else type(answer).__name__
            raise ValueError(f"every answer must be a non-empty string, got {shown}: write each answer as its text")
    return list(answers)


def score(metric: str, prediction: str, answers: list[str]) -> float:
    """``metric``'s score of ``prediction`` against ``answers`` (0..1), after checking both."""
    fn = scorer(metric)
    if not isinstance(prediction, str):
        raise ValueError(f"the prediction must be a string, got {type(prediction).__name__}: decode the tokens first")
    return float(fn(prediction, check_answers(answers)))
