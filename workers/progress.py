"""Chunk-level progress from inside an actor, at a cost the hot path does not notice.

After every chunk the engine calls back with the chunk's token-configs (its tokens times the
configs of the batch); :class:`ChunkReporter` adds them to a Python int and sends the task's
running total to the driver's progress counter (orchestrator/pool/progress.py) on the task's
first chunk, then at most every ``REPORT_SECONDS``, and once more when the task ends. A report
is a fire-and-forget actor call (``counter.report.remote(...)``, whose result nobody waits for):
no chunk ever waits for the driver or the counter. The same batched deltas feed the actor's
``kvorch_tokens_evaluated`` Ray counter (``on_flush``).

On an asynchronous device (CUDA) a chunk is counted once it is queued; the document's end
synchronizes, so counts never run ahead of the device by more than one document.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any

# At most this often a task's running total goes to the counter (its first chunk goes at once).
REPORT_SECONDS = 0.5


class ChunkReporter:
    """One task attempt's token-configs, reported as a running total to ``counter`` (a Ray
    actor handle with ``report(task_id, total)``, or None: count only)."""

    def __init__(
        self,
        counter: Any,
        task_id: str,
        period: float = REPORT_SECONDS,
        on_flush: Callable[[int], None] | None = None,
    ) -> None:
        self.counter, self.task_id, self.period, self.on_flush = counter, task_id, period, on_flush
        self.count = 0  # token-configs evaluated in this attempt
        self.sent = 0  # the total last reported
        self.sent_at: float | None = None  # monotonic time of the last report; None before the first

    def add(self, token_configs: int) -> None:
        """After each chunk: count it, and report when the last report is ``period`` old."""
        self.count += token_configs
        now = time.monotonic()
        if self.sent_at is None or now - self.sent_at >= self.period:
            self.flush(now)

    def flush(self, now: float | None = None) -> None:
        """Report the running total now, if it moved since the last report."""
        if self.count == self.sent:
            return
        if self.counter is not None:
            self.counter.report.remote(self.task_id, self.count)
        if self.on_flush is not None:
            self.on_flush(self.count - self.sent)
        self.sent, self.sent_at = self.count, time.monotonic() if now is None else now
