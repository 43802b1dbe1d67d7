"""The driver's live progress bar: token-configs (with tokens/s and ETA), tasks and failures."""

from __future__ import annotations

from tqdm import tqdm

from orchestrator.pool.actors import PoolResult
from workers.plan import Task


class Progress:
    """A tqdm bar over token-configs; a resumed run starts at what is already in the lake."""

    def __init__(self, tasks: list[Task], done: set[str], enabled: bool) -> None:
        self.total_tasks = len(tasks)
        self.tasks_done = len(done)
        self.bar = tqdm(
            total=sum(t.cost for t in tasks),
            initial=sum(t.cost for t in tasks if t.task_id in done),
            unit="tok",
            unit_scale=True,
            disable=not enabled,
            desc="token-configs",
        )
        self._postfix(failed=0, retries=0)

    def update(self, task: Task, succeeded: bool, state: PoolResult) -> None:
        """After each attempt: advance on success, always refresh tasks / failures / retries."""
        if succeeded:
            self.tasks_done += 1
            self.bar.update(task.cost)
        self._postfix(failed=len(state.failures), retries=state.retries)

    def close(self) -> None:
        self.bar.close()

    def _postfix(self, failed: int, retries: int) -> None:
        self.bar.set_postfix_str(f"tasks {self.tasks_done}/{self.total_tasks}, failed {failed}, retries {retries}")
