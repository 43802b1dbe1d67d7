"""A test-only fault hook, off unless ``KVORCH_TEST_FAULT`` is set in the driver's environment.

The fault tests need a worker that dies, raises or stalls at a chosen point of a real job. The
driver forwards every ``KVORCH_TEST_*`` variable to its actors (Ray ``runtime_env``), and the
actor consults :class:`Fault` after each chunk. Grammar: ``action[:key=value,...]`` with

- ``action``: ``exit`` (the process dies, like an OOM kill), ``raise`` (the task raises),
  ``hang`` (the task never returns), ``pause`` (the task stops for ``seconds=S``, then goes on:
  a slow chunk, so a test can see what the driver shows mid-task);
- ``after=k``: fire once the task has evaluated k chunks (default 0: before the first);
- ``task=ID``: only in that task;
- ``once=PATH``: only if PATH does not exist yet, creating it, so a re-run attempt succeeds;
  PATH then holds the Ray node id of the actor it fired in, so a test can kill that node.

Example: ``KVORCH_TEST_FAULT=exit:after=1,once=/tmp/marker``.
"""

from __future__ import annotations

import os
import time
from dataclasses import dataclass
from pathlib import Path

import ray

ENV_PREFIX = "KVORCH_TEST_"
FAULT_ENV = ENV_PREFIX + "FAULT"
ACTIONS = ("exit", "raise", "hang", "pause")


@dataclass(frozen=True)
class Fault:
    action: str
    after: int = 0
    task: str | None = None
    once: str | None = None
    seconds: float = 0.0

    @classmethod
    def from_env(cls) -> Fault | None:
        text = os.environ.get(FAULT_ENV, "").strip()
        if not text:
            return None
        action, _, params = text.partition(":")
        if action not in ACTIONS:
            raise ValueError(f"{FAULT_ENV}={text!r}: action must be one of {', '.join(ACTIONS)}")
        fields = dict(item.split("=", 1) for item in params.split(",") if item)
        after, seconds = int(fields.get("after", 0)), float(fields.get("seconds", 0))
        return cls(action, after, fields.get("task"), fields.get("once"), seconds)

    def maybe_fire(self, task_id: str, chunks_done: int) -> None:
        """Fire if this task has reached ``after`` chunks (and the once-marker allows it)."""
        if chunks_done != self.after or (self.task is not None and self.task != task_id):
            return
        if self.once is not None:
            try:
                with Path(self.once).open("x") as marker:
                    marker.write(_node_id())
            except FileExistsError:
                return
        if self.action == "exit":
            os._exit(1)
        if self.action == "pause":
            time.sleep(self.seconds)
            return
        if self.action == "hang":
            while True:
                time.sleep(3600)
        raise RuntimeError(f"{FAULT_ENV}: injected failure in task {task_id} after {chunks_done} chunks")


def _node_id() -> str:
    """The Ray node this process runs on ('' outside Ray)."""
    return ray.get_runtime_context().get_node_id() if ray.is_initialized() else ""


def forwarded_env() -> dict[str, str]:
    """The test variables the driver hands to its actors (empty outside tests)."""
    return {k: v for k, v in os.environ.items() if k.startswith(ENV_PREFIX)}
