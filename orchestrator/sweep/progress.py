"""The driver's live progress bar: token-configs as actors finish chunks (with tokens/s and ETA),
tasks and failures.

The bar moves per chunk, not per task: each worker tells the sweep's progress counter
(orchestrator/pool/progress.py) its task's running total, batched (workers/progress.py), and a
thread here reads the counter every ``POLL_SECONDS``. A finished task counts its exact cost; a
failed attempt's partial count is dropped, so the bar may step back when a task starts over. The
pool loop never waits on the counter: finishing and forgetting are fire-and-forget calls, and only
the polling thread waits for an answer.
"""

from __future__ import annotations

import threading
import time
from typing import Any

import ray
from tqdm import tqdm

from orchestrator.pool.actors import PoolResult
from workers.contract.plan import Task

# How often the driver's thread reads the progress counter.
POLL_SECONDS = 0.5
# A snapshot that takes longer than this is skipped; the thread stops once the counter is gone.
SNAPSHOT_TIMEOUT = 10.0


class Progress:
    """A tqdm bar over token-configs; a resumed run starts at what is already in the lake.

    ``counter``: the sweep's progress counter (None: the bar moves only when a task ends).
    A context manager: the polling thread runs while the block does (only for a bar shown).
    """

    def __init__(
        self,
        tasks: list[Task],
        done: set[str],
        enabled: bool,
        counter: Any = None,
        poll_seconds: float = POLL_SECONDS,
    ) -> None:
        self.total_tasks = len(tasks)
        self.tasks_done = len(done)
        self.cost = {t.task_id: t.cost for t in tasks}
        self.finished = set(done)
        self.done_cost = sum(self.cost[t] for t in self.finished)
        self.total = sum(self.cost.values())
        self.partial: dict[str, int] = {}  # the counter's latest totals of running tasks
        self.compiling: dict[str, tuple[str, float]] = {}  # worker -> (what, started at) from the counter
        self.counter, self.poll_seconds = counter, poll_seconds
        self.failed = self.retries = 0
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._poll, name="kvorch-progress", daemon=True)
        self.bar = tqdm(
            total=self.total,
            initial=self.done_cost,
            # A token evaluated under one config; "tok/s" counted these and read as tokens (10x, for 10 configs).
            unit=" token-configs",
            unit_scale=True,
            # The rate and ETA are the average since the bar began, not tqdm's moving average of the
            # last updates: the first chunks report in bursts, and the first ETA (00:31) grew to 10:32.
            smoothing=0,
            miniters=1,  # every poll prints: tqdm's adaptive miniters would hide a small step after a task's jump
            disable=not enabled,
            desc="token-configs",
        )
        self._postfix()

    def __enter__(self) -> Progress:
        if self.counter is not None and not self.bar.disable:
            self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        if self._thread.is_alive():
            self._thread.join()

    @property
    def value(self) -> int:
        """Token-configs done: finished tasks' costs plus running tasks' reported totals (each at
        most its task's cost: a batch that raised is evaluated again config by config)."""
        running = sum(min(n, self.cost.get(t, 0)) for t, n in self.partial.items() if t not in self.finished)
        return self.done_cost + running

    def update(self, task: Task, succeeded: bool, state: PoolResult) -> None:
        """After each attempt: count a finished task's exact cost, drop a failed attempt's
        partial count, always refresh tasks / failures / retries."""
        with self._lock:
            self.partial.pop(task.task_id, None)
            if succeeded and task.task_id not in self.finished:
                self.finished.add(task.task_id)
                self.tasks_done += 1
                self.done_cost += task.cost
            if self.counter is not None:  # fire-and-forget: the pool loop never waits on the counter
                if succeeded:
                    self.counter.finish.remote(task.task_id, task.cost)
                else:
                    self.counter.forget.remote(task.task_id)
            self.failed, self.retries = len(state.failures), state.retries
            self._postfix(refresh=False)
            self._show()

    def close(self) -> None:
        self._stop.set()
        with self._lock:
            self.bar.close()

    def _poll(self) -> None:
        while not self._stop.wait(self.poll_seconds):
            try:
                snapshot, compiling = ray.get(
                    [self.counter.snapshot.remote(), self.counter.compiling_now.remote()], timeout=SNAPSHOT_TIMEOUT
                )
            except ray.exceptions.GetTimeoutError:
                continue
            except Exception:  # the counter is gone (its node was lost): the bar moves per task from now on
                return
            with self._lock:
                if self._stop.is_set():
                    return
                self.partial = snapshot
                if compiling or self.compiling:
                    self.compiling = compiling
                    self._postfix(refresh=False)
                self._show()

    def _show(self) -> None:
        """Move the bar to :attr:`value` (back, when a failed attempt's count was dropped)."""
        step = self.value - self.bar.n
        if step and not self.bar.update(step):
            self.bar.refresh()  # within tqdm's mininterval of the last print: print this step anyway

    def _postfix(self, refresh: bool = True) -> None:
        self.bar.set_postfix_str(
            f"tasks {self.tasks_done}/{self.total_tasks}, failed {self.failed}, retries {self.retries}"
            + compiling_note(self.compiling, time.time()),
            refresh=refresh,
        )


def compiling_note(compiling: dict[str, tuple[str, float]], now: float) -> str:
    """``, compiling on w0: the chunk step (...) for 42 s`` (the longest-running compile, and how
    many more workers compile), or nothing: compile time stays apart from the rate in the bar."""
    if not compiling:
        return ""
    worker, (what, started) = min(compiling.items(), key=lambda item: item[1][1])
    more = f" (+{len(compiling) - 1} more)" if len(compiling) > 1 else ""
    return f", compiling on {worker}: {what} for {max(0.0, now - started):.0f} s{more}"
