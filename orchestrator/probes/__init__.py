"""Retrieval probes and question tasks: a long context, a question, and an answer to find.

A probe is scored under kvorch's protocol (the context fed chunk by chunk with eviction, then
the answer span teacher-forced): its NLL and whether every answer token is the top-1 guess
say what a press's evictions cost retrieval, which perplexity on plain text hides. This
package only builds the probes as token ids and metadata:

- spec.py      the task names, defaults, ``ProbeSpec`` and the option parsers and checks
- probe.py     ``Probe``, the ids plus where the answer starts
- tasks.py     the built-ins (passkey, needle, kv): fact, question, answer, filler units
- haystack.py  needle's filler: the run's corpus as sentences
- filler.py    filler cut to an exact token count, and where a depth puts the fact
- custom.py    bring-your-own probes from a JSONL file
- build.py     ``build_probes``
- ruler.py     RULER's synthetic tasks, generated from a seed at a length in tokens
- questions.py ``Question`` and ``build_questions``: tasks answered in generated text (RULER's,
               or a JSONL of questions with reference answers), scored by workers/contract/scorers.py

Imports orchestrator.corpus, orchestrator.errors and workers.contract's tokenization and scorers only.
"""

from orchestrator.probes.build import build_probes
from orchestrator.probes.probe import Probe
from orchestrator.probes.questions import Question, build_questions, is_question_task
from orchestrator.probes.spec import (
    DEFAULT_DEPTHS,
    DEFAULT_LENGTHS,
    TASKS,
    ProbeSpec,
    check_task,
    parse_depths,
    parse_lengths,
)

__all__ = [
    "DEFAULT_DEPTHS",
    "DEFAULT_LENGTHS",
    "TASKS",
    "Probe",
    "ProbeSpec",
    "Question",
    "build_probes",
    "build_questions",
    "is_question_task",
    "check_task",
    "parse_depths",
    "parse_lengths",
]
