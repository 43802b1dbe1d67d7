"""Which run a submission writes to: a fresh one, or the unfinished run of the same spec.

A run is identified by the canonical hash of what determines its rows (the spec minus pure
scheduling choices, plus each document's content hash), stored in spec.json. A resume
computes only the tasks whose parts are not all present and valid; a different spec under the
same run id is refused, because mixing rows of two specs in one run would corrupt it.
"""

from __future__ import annotations

import hashlib
import json
import os
import platform
import time
from dataclasses import dataclass

import pyarrow as pa

from orchestrator.errors import KvorchError
from orchestrator.lake import Lake, new_run_id

# Scheduling choices: they change where and how fast rows are computed, never their values.
SCHEDULING_FIELDS = ("actors",)
HEARTBEAT_SECONDS = 30
STALE_AFTER_SECONDS = 4 * HEARTBEAT_SECONDS


@dataclass(frozen=True)
class Target:
    run_id: str
    previous: dict | None  # the stored spec.json when resuming, None for a fresh run


def spec_hash(spec_json: dict, docs: pa.Table) -> str:
    """sha256 of the canonical JSON of the result-determining spec and the documents' hashes."""
    canonical = {k: v for k, v in spec_json.items() if k not in SCHEDULING_FIELDS}
    canonical["documents"] = sorted(zip(docs.column("doc_id").to_pylist(), docs.column("sha256").to_pylist()))
    text = json.dumps(canonical, sort_keys=True, separators=(",", ":"), default=str)
    return hashlib.sha256(text.encode()).hexdigest()


def choose_run(lake: Lake, run_id: str | None, fingerprint: str, spec_json: dict, must_exist: bool) -> Target:
    """The run to write: ``run_id`` if given (resumed when it exists), else an unfinished run of
    this spec that no live driver is working on, else a fresh id."""
    if run_id is not None:
        stored = lake.read_spec(run_id)
        if stored is None:
            if must_exist:
                runs = ", ".join(lake.run_ids()) or "none"
                raise KvorchError(f"--resume {run_id}: no such run in lake {lake.uri} (runs there: {runs})")
            return Target(run_id, None)
        if "spec_hash" not in stored:
            raise KvorchError(
                f"run {run_id} in lake {lake.uri} predates resumable runs (no spec_hash in its spec.json); "
                "pass a new --run-id"
            )
        if stored["spec_hash"] != fingerprint:
            raise KvorchError(
                f"run {run_id} in lake {lake.uri} was made with a different spec ({_changes(stored, spec_json)}); "
                "pass the same options to resume it, or a new --run-id"
            )
        return Target(run_id, stored)
    for candidate in reversed(lake.run_ids()):
        stored = lake.read_spec(candidate)
        if stored and stored.get("spec_hash") == fingerprint and _resumable(lake.read_status(candidate)):
            return Target(candidate, stored)
    return Target(new_run_id(), None)


def done_tasks(valid_parts: dict[tuple[str, str], int], tasks: dict[str, list[str]] | list[str]) -> set[str]:
    """Tasks whose every part (one per method) is present and valid. A task with a part missing
    or damaged is not done: its re-run writes all its parts again, renaming over the old ones.

    ``tasks`` is spec.json's ``{task_id: [methods]}``; runs from before resumable runs stored a
    bare list of ids, for which any valid part counts (they are never resumed, only shown).
    """
    if isinstance(tasks, list):
        return {t for t, _ in valid_parts if t in tasks}
    return {t for t, methods in tasks.items() if all((t, m) in valid_parts for m in methods)}


def running_status() -> dict:
    """What a live driver writes to status.json (and refreshes) so others leave its run alone."""
    return {"status": "running", "driver": {"host": platform.node(), "pid": os.getpid()}, "heartbeat": time.time()}


def _resumable(status: dict | None) -> bool:
    """Unfinished, and not being worked on by a live driver."""
    if status is None:
        return True
    if status.get("status") == "finished":
        return False
    if status.get("status") != "running":
        return True
    driver = status.get("driver", {})
    if driver.get("host") == platform.node():
        return not _pid_alive(int(driver.get("pid", 0)))
    return time.time() - float(status.get("heartbeat", 0)) > STALE_AFTER_SECONDS


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return pid > 0


def _changes(stored: dict, spec_json: dict) -> str:
    changed = [
        f"{k}: {stored.get(k)!r} -> {v!r}"
        for k, v in spec_json.items()
        if k not in SCHEDULING_FIELDS and k != "configs" and json.loads(json.dumps(v, default=str)) != stored.get(k)
    ]
    return "; ".join(changed) or "the documents' contents changed"
