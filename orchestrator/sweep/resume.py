"""Which run a submission writes to: a fresh one, or the unfinished run of the same spec.

A run is identified by the canonical hash of what determines its rows (the spec minus pure
scheduling choices, plus each document's content hash), stored in spec.json. A resume
computes only the tasks whose parts are not all present and sound (``orchestrator/lake/integrity.py``);
a different spec under the same run id is refused, because mixing rows of two specs in one run
would corrupt it. A finished run whose parts were damaged since is resumed too: that repairs it.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass

import pyarrow as pa

from orchestrator.errors import KvorchError
from orchestrator.lake import integrity
from orchestrator.lake.run_status import RUNNING, RunStatus, driver_alive
from orchestrator.lake.store import Lake, new_run_id

# Scheduling choices: they change where and how fast rows are computed, never their values.
# Fields that change how a run is scheduled or executed, never a number: a run resumes across them.
SCHEDULING_FIELDS = ("actors", "cuda_graphs", "compile_cache")


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
        try:
            stored = lake.read_spec(candidate)
        except KvorchError:  # a damaged or linked spec.json: not this spec's run, and not ours to judge
            continue
        if stored and stored.get("spec_hash") == fingerprint and _resumable(lake, candidate):
            return Target(candidate, stored)
    return Target(new_run_id(), None)


def shown_state(status: dict | None) -> str:
    """A run's state as ``kvorch status`` shows it: a running run whose driver died (SIGKILL,
    a lost host) is ``interrupted (driver gone)``, not running forever."""
    state = RunStatus.read(status).status
    if state == RUNNING and not driver_alive(status):
        return "interrupted (driver gone)"
    return state


def same_spec_runs(lake: Lake, fingerprint: str, but: str) -> list[tuple[str, str]]:
    """(run id, ``finished`` or ``running``) of the lake's other runs of this spec and documents
    that hold its results or are computing them now (a live driver), oldest first: what a new
    run would compute again. Read from spec.json and status.json only (no part is read)."""
    found = []
    for candidate in lake.run_ids():
        if candidate == but:
            continue
        try:
            stored = lake.read_spec(candidate)
        except KvorchError:
            continue
        if not stored or stored.get("spec_hash") != fingerprint:
            continue
        status = lake.read_status(candidate, damaged_ok=True)
        if driver_alive(status):
            found.append((candidate, "running"))
        elif RunStatus.read(status).status == "finished":
            found.append((candidate, "finished"))
    return found


def _resumable(lake: Lake, run_id: str) -> bool:
    """Not being worked on by a live driver, and unfinished or finished but since damaged (a
    part that no longer verifies): the same command then repairs it instead of starting over."""
    status = lake.read_status(run_id, damaged_ok=True)
    if driver_alive(status):
        return False
    if RunStatus.read(status).status != "finished":
        return True
    return not integrity.audit(lake, run_id).complete


def _changes(stored: dict, spec_json: dict) -> str:
    changed = [
        f"{k}: {stored.get(k)!r} -> {v!r}"
        for k, v in spec_json.items()
        if k not in SCHEDULING_FIELDS and k != "configs" and json.loads(json.dumps(v, default=str)) != stored.get(k)
    ]
    return "; ".join(changed) or "the documents' contents changed"
