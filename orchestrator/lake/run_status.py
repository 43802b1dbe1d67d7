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
import types
import typing
from dataclasses import dataclass, field

RUNNING = "running"
# A running driver rewrites status.json this often (sweep/heartbeat.py); one silent for
# STALE_AFTER_SECONDS is taken for dead by readers on other hosts (driver_alive).
HEARTBEAT_SECONDS = 30
STALE_AFTER_SECONDS = 4 * HEARTBEAT_SECONDS


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
        """A status as read from the lake (None: no status, or a damaged one), unknown keys ignored.
        Valid JSON of another shape (a list, a string pid, ``rows: "many"``) reads as an unknown
        status whose ``reason`` says what is wrong: every reader (status, report, sql, resume)
        reads through here, so none of them meets a wrong type."""
        why = problem(payload) if payload is not None else ""
        if why:
            return cls(reason=f"status.json is damaged ({why}); the run reads as not finished, a resume rewrites it")
        known = {f.name for f in dataclasses.fields(cls)}
        return cls(**{key: value for key, value in (payload or {}).items() if key in known})


# Keys of the nested objects that readers use, with their types (RunStatus's own come from its fields).
_NESTED = {
    "driver": {"host": str, "pid": int},
    "attempt": {"number": int, "rows": int, "tasks_done": int, "retries": int},
}


# Keys every record of a list holds, with their types (incomplete.py and pool/events.py read them).
_RECORDS = {
    "config_failures": {"task_id": str, "doc_id": str, "config": str, "reason": str},
    "events": {"time": float, "kind": str, "detail": str},
}


def problem(payload: object) -> str:
    """"" when ``payload`` has status.json's shape (every key of :class:`RunStatus` it holds of
    that key's type), else the first thing that is wrong, in a few words."""
    if not isinstance(payload, dict):
        return f"a JSON {type(payload).__name__}, not an object"
    for name, hint in typing.get_type_hints(RunStatus).items():
        if name in payload and not _fits(payload[name], hint):
            return f"{name} is {_shown(payload[name])}, not {getattr(hint, '__name__', hint)}"
    for name, keys in _NESTED.items():
        nested = payload.get(name) or {}
        for key, kind in keys.items():
            if key in nested and not _fits(nested[key], kind):
                return f"{name}.{key} is {_shown(nested[key])}, not {kind.__name__}"
    for name, keys in _RECORDS.items():
        for record in payload.get(name) or []:
            for key, kind in keys.items():
                if not _fits(record.get(key), kind):
                    return f"a record of {name} has {key} {_shown(record.get(key))}, not {kind.__name__}"
    return ""


def _fits(value: object, hint: object) -> bool:
    """Whether JSON ``value`` has type ``hint`` (int, float, str, dict, list, their parameters, X | None)."""
    origin, args = typing.get_origin(hint), typing.get_args(hint)
    if origin in (types.UnionType, typing.Union):
        return any(_fits(value, arg) for arg in args)
    if hint is type(None):
        return value is None
    if isinstance(value, bool):
        return hint is bool
    if hint is float:
        return isinstance(value, int | float)
    if origin is list:
        return isinstance(value, list) and all(_fits(item, args[0]) for item in value)
    if origin is dict:
        return isinstance(value, dict) and all(_fits(item, args[1]) for item in value.values())
    return isinstance(value, typing.cast(type, hint))


def _shown(value: object) -> str:
    text = repr(value)
    return text if len(text) <= 40 else text[:37] + "..."


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


def driver_alive(status: dict | None) -> bool:
    """Whether the driver a ``running`` status names is still at work: on this host, its pid
    lives; on another, its heartbeat is recent. False for any other status."""
    record = RunStatus.read(status)
    if record.status != RUNNING:
        return False
    if record.driver.get("host") == platform.node():
        return _pid_alive(int(record.driver.get("pid", 0)))
    return time.time() - float(record.heartbeat) <= STALE_AFTER_SECONDS


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return pid > 0


def driving() -> dict:
    """The run is held by this driver, alive now (:func:`driver_alive` reads it): every write
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
