"""One line of an exception: what a one-line message quotes of a cause whose text may run to
tracebacks (Ray's errors, inductor's compiler output). The one owner of that rule, for the
worker side and the driver (orchestrator/errors.py re-exports it)."""

from __future__ import annotations


def first_line(exc: BaseException) -> str:
    """An exception's first non-empty line, stripped (its type name when it has none)."""
    return next((line.strip() for line in str(exc).splitlines() if line.strip()), type(exc).__name__)


def error_line(exc: BaseException) -> str:
    """``Type: first line of the message``: why a config (or a compile) failed, on one line."""
    line = first_line(exc)
    return type(exc).__name__ if line == type(exc).__name__ else f"{type(exc).__name__}: {line}"
