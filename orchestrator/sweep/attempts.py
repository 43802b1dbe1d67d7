"""A run's ``status.json`` across attempts: the figures of a resumed run count every attempt.

A run may take several attempts (a killed driver, Ctrl-C, a lost cluster); each resume computes
only the missing tasks. Its status must still describe the run, not the last attempt: ``rows``
are the rows readers count (orchestrator/lake/integrity.py: verified parts of done tasks),
``tasks_done`` every task done so far, ``retries`` and ``events`` add up over the attempts.
What the last attempt did alone is kept under ``attempt``.
"""

from __future__ import annotations

from orchestrator.lake import integrity, run_status
from orchestrator.lake.run_status import RunStatus
from orchestrator.lake.store import Lake
from orchestrator.pool.actors import PoolResult


def number(earlier: dict | None) -> int:
    """This attempt's number: 1 for a fresh run, one more than the attempt it resumes otherwise
    (a status without a number, as a killed driver leaves it, counts as one attempt)."""
    if earlier is None:
        return 1
    return int((RunStatus.read(earlier).attempt or {}).get("number", 1)) + 1


def events(earlier: dict | None, new: list[dict]) -> list[dict]:
    """The run's fault events: the earlier attempts', then this attempt's, each with its attempt."""
    attempt = number(earlier)
    return [*RunStatus.read(earlier).events, *({**e, "attempt": attempt} for e in new)]


def running(earlier: dict | None, result: PoolResult) -> dict:
    """What a heartbeat adds to the running status: the attempt and the events so far."""
    return run_status.attempt_so_far(number(earlier), events(earlier, result.events))


def totals(lake: Lake, run_id: str, earlier: dict | None, done: set[str], result: PoolResult) -> dict:
    """The run's figures at the end of this attempt; ``done``: the tasks earlier attempts did."""
    return run_status.run_figures(
        rows=_lake_rows(lake, run_id),
        tasks_done=[*sorted(done), *result.tasks_done],
        retries=int(RunStatus.read(earlier).retries) + result.retries,
        attempt=run_status.attempt_figures(
            number(earlier), rows=result.rows_written, tasks_done=len(result.tasks_done), retries=result.retries
        ),
        events=events(earlier, result.events),
    )


def _lake_rows(lake: Lake, run_id: str) -> int | None:
    """The rows readers count; None when the lake cannot be read (the final status is written on
    the way out of any failure, and must not replace that failure with its own)."""
    try:
        return integrity.audit(lake, run_id).rows
    except OSError:
        return None
