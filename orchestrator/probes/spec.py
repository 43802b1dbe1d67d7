"""What the user asks for: the task, lengths, depths and samples, parsed and checked.

Every mistake is a one-line KvorchError naming the option and the fix, raised before any probe
is built, so a bad ``--lengths`` never costs a model load.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass
from decimal import Decimal
from pathlib import Path

from orchestrator.corpus import check_regular_file
from orchestrator.errors import KvorchError

TASKS: tuple[str, ...] = ("passkey", "needle", "kv")
CUSTOM_TASK = "custom"  # Probe.task of a bring-your-own JSONL probe
RULER_PREFIX = "ruler"  # --task ruler[:family[+family...]]: RULER's question tasks (probes/questions.py)
DEFAULT_LENGTHS: tuple[int, ...] = (256, 512, 1024)
DEFAULT_DEPTHS: tuple[float, ...] = (0.0, 0.25, 0.5, 0.75, 1.0)
KILO = 1024  # "4k" means 4096 tokens: context windows are powers of two
# A run's probes are built in memory before the first task (each probe's token ids as a list): a
# stated ceiling on their count and on their tokens (lengths x depths x samples), checked before
# any is built, instead of memory growing until the machine swaps. 100M tokens is about 4 GB as
# Python lists of ids (36 bytes a token).
MAX_PROBES = 100_000
MAX_PROBE_TOKENS = 100_000_000

_LENGTH = re.compile(r"(\d+(?:\.\d+)?)([kK]?)")
_LENGTHS_FIX = "use token counts like 512,1k,16k (k = 1024)"
_DEPTHS_FIX = "use fractions like 0,0.25,0.5,0.75,1 (0 = start of the context, 1 = just before the question)"


@dataclass(frozen=True)
class ProbeSpec:
    """Which probes to build. For a bring-your-own ``.jsonl`` task the file's records are the
    probes: ``lengths``, ``depths``, ``samples`` and ``seed`` do not apply to it."""

    task: str  # a name in TASKS, or a path to a .jsonl file (bring-your-own)
    lengths: tuple[int, ...] = DEFAULT_LENGTHS  # tokens, BOS included
    depths: tuple[float, ...] = DEFAULT_DEPTHS  # where the fact sits in the filler, 0..1
    samples: int = 1  # probes per (length, depth), each from its own seed
    seed: int = 0


def parse_lengths(text: str) -> tuple[int, ...]:
    """``"1k,4k,16k"`` -> ``(1024, 4096, 16384)``; ``"512,1.5k"`` -> ``(512, 1536)``."""
    items = [item.strip() for item in text.split(",")]
    if not any(items):
        raise KvorchError(f"--lengths is empty; {_LENGTHS_FIX}")
    lengths = []
    for item in items:
        match = _LENGTH.fullmatch(item)
        if match is None:
            raise KvorchError(f"--lengths {item!r} is not a length; {_LENGTHS_FIX}")
        value = Decimal(match.group(1)) * (KILO if match.group(2) else 1)
        if value != value.to_integral_value():
            raise KvorchError(f"--lengths {item} is not a whole number of tokens ({value}); {_LENGTHS_FIX}")
        lengths.append(int(value))
    check_lengths(tuple(lengths), None)
    return tuple(lengths)


def parse_depths(text: str) -> tuple[float, ...]:
    """``"0,0.25,1"`` -> ``(0.0, 0.25, 1.0)``."""
    items = [item.strip() for item in text.split(",")]
    if not any(items):
        raise KvorchError(f"--depths is empty; {_DEPTHS_FIX}")
    depths = []
    for item in items:
        try:
            depths.append(float(item))
        except ValueError:
            raise KvorchError(f"--depths must lie in [0, 1], got {item!r}; {_DEPTHS_FIX}") from None
    check_depths(tuple(depths))
    return tuple(d + 0.0 for d in depths)  # -0.0 -> 0.0: one label per depth


def is_ruler(task: str) -> bool:
    """Whether the task is RULER's (``ruler`` or ``ruler:<family>[+<family>...]``): question tasks."""
    return task == RULER_PREFIX or task.startswith(RULER_PREFIX + ":")


def ruler_families(task: str) -> list[str]:
    """``ruler`` -> every family; ``ruler:a+b`` -> those; a one-line KvorchError for an unknown one."""
    from orchestrator.probes import ruler

    names = list(ruler.TASKS) if task == RULER_PREFIX else task.removeprefix(RULER_PREFIX + ":").split("+")
    unknown = [name for name in names if name not in ruler.TASKS]
    if unknown:
        raise KvorchError(
            f"--task {task}: unknown RULER task {', '.join(repr(n) for n in unknown)}; use ruler, or ruler:NAME "
            f"(NAME+NAME for several) with NAME one of {', '.join(ruler.TASKS)}"
        )
    return names


def check_task(task: str) -> None:
    """A built-in name, RULER's tasks, or an existing ``.jsonl`` file of bring-your-own probes or questions."""
    if task in TASKS:
        return
    if is_ruler(task):
        ruler_families(task)
        return
    fix = (
        f"use one of {', '.join(TASKS)}, ruler[:NAME], or a .jsonl file with context, question and answer "
        "(a probe) or answers (a question)"
    )
    if task.endswith(".jsonl"):
        check_regular_file(Path(task), f"--task {task}")
        if not Path(task).is_file():
            raise KvorchError(f"--task {task}: no such file; {fix}")
        return
    raise KvorchError(f"--task {task!r} is unknown; {fix}")


def is_custom(task: str) -> bool:
    """Whether the task is a bring-your-own JSONL file rather than a built-in."""
    return task not in TASKS and not is_ruler(task)


def check_spec(spec: ProbeSpec, max_context: int | None) -> None:
    """The spec's numbers, checked again: a ProbeSpec may be built without the parsers."""
    if isinstance(spec.samples, bool) or not isinstance(spec.samples, int) or spec.samples < 1:
        raise KvorchError(f"--samples {spec.samples}: use 1 or more probes per length and depth")
    if not isinstance(spec.seed, int) or isinstance(spec.seed, bool):
        raise KvorchError(f"--seed {spec.seed!r}: use a whole number")
    check_lengths(spec.lengths, max_context)
    check_depths(spec.depths)
    count = len(spec.lengths) * len(spec.depths) * spec.samples
    tokens = sum(spec.lengths) * len(spec.depths) * spec.samples
    if count > MAX_PROBES or tokens > MAX_PROBE_TOKENS:
        raise KvorchError(
            f"--samples {spec.samples} x {len(spec.lengths)} lengths x {len(spec.depths)} depths makes {count} probes "
            f"of {tokens} tokens in all; a run builds at most {MAX_PROBES} probes and {MAX_PROBE_TOKENS} tokens: "
            "lower --samples, --lengths or --depths, or split the sweep into runs"
        )


def check_lengths(lengths: tuple[int, ...], max_context: int | None) -> None:
    """Positive whole numbers, each listed once, none longer than the model's context."""
    if not lengths:
        raise KvorchError(f"--lengths is empty; {_LENGTHS_FIX}")
    for length in lengths:
        if isinstance(length, bool) or not isinstance(length, int):
            raise KvorchError(f"--lengths {length!r} is not a length; {_LENGTHS_FIX}")
        if length <= 0:
            raise KvorchError(f"--lengths {length}: lengths must be positive; {_LENGTHS_FIX}")
        if max_context is not None and length > max_context:
            raise KvorchError(
                f"--lengths {length_label(length)}: {length} tokens exceed the model's context of {max_context}; "
                f"use lengths <= {max_context}"
            )
    _check_unique("--lengths", [length_label(n) for n in lengths])


def check_depths(depths: tuple[float, ...]) -> None:
    """Numbers in [0, 1] (NaN is not), each listed once."""
    if not depths:
        raise KvorchError(f"--depths is empty; {_DEPTHS_FIX}")
    for depth in depths:
        if isinstance(depth, bool) or not isinstance(depth, (int, float)) or math.isnan(depth) or not 0 <= depth <= 1:
            raise KvorchError(f"--depths must lie in [0, 1], got {depth}; {_DEPTHS_FIX}")
    _check_unique("--depths", [depth_label(d) for d in depths])


def length_label(length: int) -> str:
    """How a length reads in messages: 16384 -> "16k", 1536 -> "1.5k", 1000 -> "1000", and
    1000000000 -> "1000000000": the k form only where it is short and exact, so a message never
    shows another number than the one given (976562.5k printed as "976562k" did)."""
    if length >= KILO and (length * 2) % KILO == 0:
        short = f"{length / KILO:g}"
        if "e" not in short and Decimal(short) * KILO == length:
            return f"{short}k"
    return str(length)


def depth_label(depth: float) -> str:
    """A depth as ids and seeds spell it: 0.0 -> "0", 0.25 -> "0.25", 1.0 -> "1"."""
    return format(depth + 0.0, ".15g")


def _check_unique(option: str, labels: list[str]) -> None:
    seen: set[str] = set()
    for label in labels:
        if label in seen:
            raise KvorchError(f"{option} lists {label} twice; list each value once")
        seen.add(label)
