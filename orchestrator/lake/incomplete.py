"""Incomplete configs: configs that raised on some documents of tasks that otherwise succeeded.

The actor reports each as a :class:`~workers.contract.plan.ConfigFailure` (workers/contract/plan.py);
the driver records it with its task in status.json (``config_failures``, orchestrator/lake/run_status.py),
where ``kvorch status`` and ``kvorch report`` read it. A config's means then cover fewer documents
than the other configs', which the report says. This module is the one place that knows a
failure record's form.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from orchestrator.lake.run_status import RunStatus

if TYPE_CHECKING:  # the report reads records without importing the worker side (torch, Ray)
    from workers.contract.plan import ConfigFailure


def record(task_id: str, failure: ConfigFailure) -> dict:
    """The status.json form of one failure."""
    return {"task_id": task_id, "doc_id": failure.doc_id, "config": failure.config, "reason": failure.reason}


def recorded(status: dict | None) -> list[dict]:
    """The failures a run's status.json records (none for runs from before they were)."""
    return list(RunStatus.read(status).config_failures)


def carried_over(status: dict | None, done: set[str]) -> list[dict]:
    """An earlier attempt's failures that a resume keeps: those of tasks that are done. A task
    that is not done runs again, and records its failures afresh."""
    return [r for r in recorded(status) if r["task_id"] in done]


def merged(*groups: list[dict]) -> list[dict]:
    """Records in one canonical order, each once."""
    unique = {(r["config"], r["doc_id"], r["task_id"]): r for group in groups for r in group}
    return [unique[key] for key in sorted(unique)]


def by_config(records: list[dict]) -> dict[str, list[dict]]:
    """Config label -> its failures, in label order."""
    out: dict[str, list[dict]] = {}
    for r in sorted(records, key=lambda r: (r["config"], r["doc_id"])):
        out.setdefault(r["config"], []).append(r)
    return out


def status_line(run_id: str, r: dict) -> str:
    """One line per failure, for ``kvorch status``: which config lacks which document, and why."""
    return f"{run_id} {r['config']} incomplete on {r['doc_id']} (task {r['task_id']}): {r['reason']}"


# A warning names this many documents, then counts the rest: a config that failed on 63k documents
# is one readable line, not a megabyte (``kvorch status`` lists them all, one line each).
SHOWN_DOCS = 5


def warnings(run_id: str, records: list[dict]) -> list[str]:
    """One line per incomplete config, for the report: which documents its means lack, and why."""
    lines = []
    for config, failures in by_config(records).items():
        docs = ", ".join(str(r["doc_id"]) for r in failures[:SHOWN_DOCS])
        docs += f" and {len(failures) - SHOWN_DOCS} more" if len(failures) > SHOWN_DOCS else ""
        lines.append(
            f"kvorch: warning: run {run_id}: {config} is incomplete, it failed on {len(failures)} document(s) "
            f"({docs}): {failures[0]['reason']}; its means cover fewer documents than the other configs'"
        )
    return lines
