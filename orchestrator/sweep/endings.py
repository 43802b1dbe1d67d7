"""How a run ends, in status.json: finished, failed or interrupted, always with a one-line reason.

A driver that stops for any reason it can see (Ctrl-C, SIGTERM, a full disk, a task that kept
failing, a bug) records that reason before it exits, so ``kvorch status`` says what happened
instead of ``running`` forever. One it cannot see (SIGKILL, a lost host) is caught by the reader
instead: ``resume.shown_state`` calls a running run whose driver is gone ``interrupted``.
"""

from __future__ import annotations

import signal
import sys
import threading
from collections.abc import Iterator
from contextlib import contextmanager

from orchestrator.errors import KvorchError, first_line
from orchestrator.lake.store import Lake

# Signals that stopped the driver, newest last. A flag, not an exception subclass: Ray's
# ray.get/ray.wait turn any KeyboardInterrupt raised inside them into a plain one.
_received: list[str] = []


def stopping_signal() -> str | None:
    """ "SIGTERM" when a SIGTERM, not Ctrl-C, is what raised the current KeyboardInterrupt."""
    return _received[-1] if _received else None


@contextmanager
def interrupts_as_exceptions() -> Iterator[None]:
    """SIGTERM (a scheduler, ``kill``, a container shutdown) raises KeyboardInterrupt in the main
    thread while the block runs, so it is handled like Ctrl-C: every finished part is kept and
    the run is recorded as interrupted and resumable. Ray's own driver handler would
    ``sys.exit`` without a word. The previous handler comes back after."""
    _received.clear()
    if threading.current_thread() is not threading.main_thread():
        yield
        return

    def on_sigterm(signum: int, frame: object) -> None:
        _received.append("SIGTERM")
        raise KeyboardInterrupt("SIGTERM")

    previous = signal.signal(signal.SIGTERM, on_sigterm)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


def ending(exc: BaseException) -> tuple[str, str]:
    """(status, reason) for a run stopped by ``exc``."""
    if isinstance(exc, KeyboardInterrupt):
        if stopping_signal():
            return "interrupted", f"terminated by {stopping_signal()}; finished parts are kept"
        return "interrupted", "interrupted by Ctrl-C; finished parts are kept"
    if isinstance(exc, SystemExit):
        return "interrupted", f"the driver exited (code {exc.code})"
    if isinstance(exc, KvorchError):
        return "failed", str(exc).splitlines()[0]
    first = first_line(exc)
    return "failed", type(exc).__name__ if first == type(exc).__name__ else f"{type(exc).__name__}: {first}"


def outcome(failures: dict[str, str], total: int) -> tuple[str, str]:
    """(status, reason) for a pool that ran to its end: finished, or failed naming the first
    failed task of ``total``."""
    if not failures:
        return "finished", ""
    first_task, first_error = next(iter(failures.items()))
    return "failed", f"{len(failures)} of {total} tasks failed (first: {first_task}: {first_error})"


def write_final_status(lake: Lake, run_id: str, status: dict) -> None:
    """Record the run's end; if even that fails (the disk that stopped the run is still full),
    say so and let the original error through: readers then see the driver gone."""
    try:
        lake.write_status(run_id, status)
    except OSError as exc:
        print(
            f"kvorch: could not record run {run_id}'s end in status.json ({exc.strerror or exc}); "
            "kvorch status will show it as interrupted",
            file=sys.stderr,
        )
