"""A running run's status.json, kept fresh while tasks run.

Other submissions and ``kvorch status`` on other hosts judge a driver alive by its heartbeat
(``run_status.driver_alive``: younger than ``STALE_AFTER_SECONDS``). Writing it only when a task ends
let a live driver whose tasks each take longer than that look dead: ``kvorch status`` showed it
as ``interrupted (driver gone)``, and on a lake without file locks (object stores) a second
driver could take the run over. A thread rewrites the latest status every ``period`` seconds;
the driver's own updates (a new incomplete config, a fault event) are written at once.
"""

from __future__ import annotations

import threading
from types import TracebackType

from orchestrator.lake import run_status
from orchestrator.lake.run_status import HEARTBEAT_SECONDS
from orchestrator.lake.store import Lake


class Heartbeat:
    """A context manager: beats while the block runs; the final status is written after it."""

    def __init__(self, lake: Lake, run_id: str, payload: dict, period: float = HEARTBEAT_SECONDS) -> None:
        self.lake, self.run_id, self.period = lake, run_id, period
        self._payload = dict(payload)
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._beat, name="kvorch-heartbeat", daemon=True)

    def update(self, payload: dict) -> None:
        """Record ``payload`` (a running status without ``run_status.driving``, which each write
        adds afresh: ``run_status.running``) and write it now."""
        with self._lock:
            self._payload = dict(payload)
            self._write()

    def __enter__(self) -> Heartbeat:
        self.update(self._payload)
        self._thread.start()
        return self

    def __exit__(self, kind: type | None, exc: BaseException | None, tb: TracebackType | None) -> None:
        self._stop.set()
        self._thread.join()

    def _write(self) -> None:
        self.lake.write_status(self.run_id, {**self._payload, **run_status.driving()})

    def _beat(self) -> None:
        while not self._stop.wait(self.period):
            with self._lock:
                if self._stop.is_set():
                    return
                try:
                    self._write()
                except OSError:  # a full disk: the driver's own next write reports it
                    pass
