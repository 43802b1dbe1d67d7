"""What a run's parts can be trusted for: the one audit that status, report, sql and resume share.

A part counts only when its checksum verifies (``Lake.verify_part``) and its task is done, i.e.
every method's part of the task is sound. A task cut short (a disk that filled between two of
its parts, a driver killed between them) therefore adds no rows to any query, and a resume
re-runs it whole. Damaged parts are named by path, so a user can see what a resume will redo.
"""

from __future__ import annotations

from dataclasses import dataclass

from orchestrator.errors import KvorchError
from orchestrator.lake.store import RUN_ID_PATTERN, Lake


@dataclass(frozen=True)
class RunAudit:
    run_id: str
    planned: dict[str, list[str]] | list[str]  # spec.json's tasks: {task_id: [methods]} (or old runs' id list)
    sound: dict[tuple[str, str], int]  # (task_id, method) -> rows, for parts whose checksum verifies
    paths: dict[tuple[str, str], str]  # (task_id, method) -> path of each sound part
    damaged: dict[str, str]  # path -> why

    @property
    def done(self) -> set[str]:
        return done_tasks(self.sound, self.planned) if self.planned else {t for t, _ in self.sound}

    @property
    def missing(self) -> list[str]:
        """Planned tasks without all their sound parts."""
        return sorted(set(self.planned) - self.done)

    @property
    def readable(self) -> list[str]:
        """Parts readers count: sound, and of a done task."""
        done = self.done
        return sorted(path for (task, _), path in self.paths.items() if task in done)

    @property
    def rows(self) -> int:
        done = self.done
        return sum(rows for (task, _), rows in self.sound.items() if task in done)

    @property
    def complete(self) -> bool:
        return not self.damaged and not self.missing

    def problem(self) -> str:
        """One line on what is wrong ("" for a complete run), naming the first damaged part."""
        if self.complete:
            return ""
        said = []
        if self.missing:
            said.append(f"{len(self.missing)} of {len(self.planned)} tasks not done")
        if self.damaged:
            path, why = next(iter(sorted(self.damaged.items())))
            more = f" and {len(self.damaged) - 1} more" if len(self.damaged) > 1 else ""
            said.append(f"damaged part {path} ({why}){more}")
        return "; ".join(said)


def done_tasks(valid_parts: dict[tuple[str, str], int], tasks: dict[str, list[str]] | list[str]) -> set[str]:
    """Tasks whose every part (one per method) is present and valid. A task with a part missing
    or damaged is not done: its re-run writes all its parts again, renaming over the old ones.

    ``tasks`` is spec.json's ``{task_id: [methods]}``; runs from before resumable runs stored a
    bare list of ids, for which any valid part counts (they are never resumed, only shown).
    """
    if isinstance(tasks, list):
        return {t for t, _ in valid_parts if t in tasks}
    return {t for t, methods in tasks.items() if all((t, m) in valid_parts for m in methods)}


def audit(lake: Lake, run_id: str) -> RunAudit:
    """Verify every part of ``run_id`` against its checksum and the run's plan."""
    return _audit(lake, run_id, lake.parts(run_id))


def audit_lake(lake: Lake) -> dict[str, RunAudit]:
    """Every run that has parts, audited; the parts are listed once for the whole lake."""
    by_run: dict[str, list[str]] = {}
    for path in lake.parts():
        by_run.setdefault(Lake.part_run_id(path), []).append(path)
    return {run_id: _audit(lake, run_id, paths) for run_id, paths in sorted(by_run.items())}


def _audit(lake: Lake, run_id: str, parts: list[str]) -> RunAudit:
    if not RUN_ID_PATTERN.fullmatch(run_id):  # a directory kvorch did not make: nothing in it counts
        return RunAudit(run_id, {}, {}, {}, {path: "its run id is not a valid kvorch run id" for path in parts})
    try:
        spec = lake.read_spec(run_id) or {}
    except KvorchError as exc:  # a damaged or linked spec.json: its parts cannot be judged, so none counts
        return RunAudit(run_id, {}, {}, {}, {path: f"its run's spec.json cannot be read ({exc})" for path in parts})
    required = spec.get("part_checksums") == "sha256"
    sound: dict[tuple[str, str], int] = {}
    paths: dict[tuple[str, str], str] = {}
    damaged: dict[str, str] = {}
    for path in parts:
        rows, why = lake.verify_part(path, checksum_required=required)
        if rows is None:
            damaged[path] = why
            continue
        key = Lake.part_key(path)
        sound[key], paths[key] = rows, path
    return RunAudit(run_id, spec.get("tasks") or {}, sound, paths, damaged)


def left_out(audits: dict[str, RunAudit]) -> list[str]:
    """One line per run with damaged parts, for readers of ``chunks`` (``kvorch sql``, the notebook
    API): the rows of its unsound parts, and of their tasks, are not in the view."""
    return [
        f"run {run_id}: {audit.problem()}; its rows are left out of chunks"
        for run_id, audit in audits.items()
        if audit.damaged
    ]


def repair_hint(run_id: str) -> str:
    """What repairs a run: its own submit command again (a resume redoes exactly what is missing)."""
    return f"run its kvorch submit command again (same options; --resume {run_id} names the run) to redo it"
