"""A run's status.json: every key it holds, written and read through this one module.

The driver rewrites the whole file at three moments; each has its builder here:

- :func:`claimed`: when it takes the run, before spec.json exists, so that no other submission
  takes the run for an abandoned one;
- :func:`running`: while tasks run, every ``HEARTBEAT_SECONDS`` (``sweep/heartbeat.py``) and at
  once on a new incomplete config or fault event;
- :func:`ended`: once, when the run ends, however it ends (``sweep/endings.py`` says how).

The first two carry :func:`driving`, which tells other drivers and ``kvorch status`` that a live
driver holds the run. ``Lake.write_status`` adds ``run_id`` and ``finished_at`` (the time of
that write, not only of the end). Readers (``kvorch status``, the resume and the run lock, the
report, the SQL views ``statuses`` and ``workers``) read it as a :class:`RunStatus`.
"""

from __future__ import annotations

import dataclasses
import os
import platform
import time
from dataclasses import dataclass, field

RUNNING = "running"


@dataclass(frozen=True)
class RunStatus:
    """status.json as it reads: every key, and what a status without it reads as (a run from
    before the key existed, a moment that does not write it, a driver killed before it did)."""

    status: str = "unknown"  # running, then finished, failed or interrupted
    # Written while running (driving()): who holds the run, and when it last said so.
    driver: dict = field(default_factory=dict)  # {"host", "pid"}
    heartbeat: float = 0.0  # time.time()
    # Configs that failed on some documents of done tasks (orchestrator/lake/incomplete.py records).
    config_failures: list[dict] = field(default_factory=list)
    # This attempt's number; at the end also what it did alone: {"number", "rows", "tasks_done", "retries"}.
    attempt: dict = field(default_factory=dict)
    # Fault events of every attempt, each with its attempt's number (orchestrator/pool/events.py).
    events: list[dict] = field(default_factory=list)
    # Written at the end (ended()), of the whole run unless said otherwise:
    reason: str = ""  # why it ended, one line ("" when finished)
    failures: dict[str, str] = field(default_factory=dict)  # task id -> the error it failed with, last try
    tasks_total: int | None = None
    tasks_resumed: int | None = None  # done by earlier attempts when this one started
    tasks_done: list[str] = field(default_factory=list)  # earlier attempts' first
    rows: int | None = None  # what readers count (orchestrator/lake/integrity.py); None: lake unreadable
    retries: int = 0
    workers: list[dict] = field(default_factory=list)  # each actor as it described itself, + compile_seconds
    seconds: float | None = None  # this attempt's wall time
    # Written by Lake.write_status, with every write.
    run_id: str | None = None
    finished_at: str | None = None

    @classmethod
    def read(cls, payload: dict | None) -> RunStatus:
        """A status as read from the lake (None: no status, or a damaged one), unknown keys ignored."""
        known = {f.name for f in dataclasses.fields(cls)}
        return cls(**{key: value for key, value in (payload or {}).items() if key in known})


# What the SQL views read of every status.json (orchestrator/lake/queries.py), as DuckDB types:
# ``statuses`` and, one row per worker, ``workers``. A worker's compile_seconds is null in runs
# recorded before it was.
WORKERS_SQL_TYPE = "STRUCT(worker VARCHAR, host VARCHAR, device VARCHAR, device_name VARCHAR, compile_seconds DOUBLE)[]"
SQL_COLUMNS = {
    "run_id": "VARCHAR",
    "status": "VARCHAR",
    "finished_at": "VARCHAR",
    "rows": "BIGINT",
    "workers": WORKERS_SQL_TYPE,
}


def driving() -> dict:
    """The run is held by this driver, alive now (``resume.driver_alive`` reads it): every write
    while the run runs carries it afresh."""
    return {"status": RUNNING, "driver": {"host": platform.node(), "pid": os.getpid()}, "heartbeat": time.time()}


def claimed(config_failures: list[dict]) -> dict:
    """The status a driver writes when it takes the run: held, with the incomplete configs the
    earlier attempt recorded (until this attempt records its own)."""
    return {**driving(), "config_failures": config_failures}


def attempt_so_far(number: int, events: list[dict]) -> dict:
    """What a running status says of the attempts: this one's number, every attempt's events."""
    return {"attempt": {"number": number}, "events": events}


def running(config_failures: list[dict], so_far: dict) -> dict:
    """A running status without :func:`driving`, which the heartbeat adds to each write.
    ``so_far``: :func:`attempt_so_far`."""
    return {"config_failures": config_failures, **so_far}


def run_figures(*, rows: int | None, tasks_done: list[str], retries: int, attempt: dict, events: list[dict]) -> dict:
    """The run's figures over every attempt (``sweep/attempts.py`` adds them up); ``attempt``:
    :func:`attempt_figures`."""
    return {"rows": rows, "tasks_done": tasks_done, "retries": retries, "attempt": attempt, "events": events}


def attempt_figures(number: int, rows: int, tasks_done: int, retries: int) -> dict:
    """What the last attempt did alone."""
    return {"number": number, "rows": rows, "tasks_done": tasks_done, "retries": retries}


def ended(
    *,
    status: str,
    reason: str,
    tasks_total: int,
    tasks_resumed: int,
    failures: dict[str, str],
    config_failures: list[dict],
    workers: list[dict],
    figures: dict,
    seconds: float,
) -> dict:
    """The status a run ends with: how it ended and why, and its figures (:func:`run_figures`)."""
    return {
        "status": status,
        "reason": reason,
        "tasks_total": tasks_total,
        "tasks_resumed": tasks_resumed,
        "failures": failures,
        "config_failures": config_failures,
        "workers": workers,
        **figures,
        "seconds": seconds,
    }
