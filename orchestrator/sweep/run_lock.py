"""One driver per run id: a second ``kvorch submit`` on a run that a live driver is computing is
refused, instead of both running every task.

On a local lake the claim is an exclusive ``flock`` on ``<lake>/.locks/run_id=<id>.lock``. The
kernel drops it when the driver exits, however it exits (SIGKILL included), so a claim never
outlives its driver and never needs a timeout. Other filesystems (object stores) have no locks:
there a ``running`` status.json whose driver still beats (``resume.driver_alive``) refuses the
second driver, which is as good as the heartbeat.

The lock file is a file of the lake like any other: never reached through a symbolic link
(``Lake.guard`` on its way, ``O_NOFOLLOW`` on the file itself), so a link planted at its name
can neither truncate a file elsewhere nor create one outside the lake.
"""

from __future__ import annotations

import fcntl
import os
import platform
from types import TracebackType

import pyarrow.fs as pafs

from orchestrator.errors import KvorchError
from orchestrator.lake.run_status import RUNNING, RunStatus
from orchestrator.lake.store import Lake, check_run_id
from orchestrator.sweep.resume import driver_alive

LOCKS_DIR = ".locks"


def live_holder(lake: Lake, run_id: str) -> dict | None:
    """The driver that holds ``run_id``'s lock on this host ({"pid", "host"}), None when none does.

    Read from the lock file alone (never locking it, so a driver starting now is never refused):
    a driver writes its pid there when it takes the lock and removes the file when it lets go,
    so a file whose pid lives on this host is held. ``kvorch status`` asks this while a resumed
    run's new driver loads its model, before it writes status.json. Other hosts' drivers, and
    object stores, which have no lock file, answer None.
    """
    if not isinstance(lake.fs, pafs.LocalFileSystem):
        return None
    path = os.path.join(lake.root, LOCKS_DIR, f"run_id={check_run_id(run_id, 'run id')}.lock")
    if lake.link_on(path):
        return None
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW)
    except OSError:
        return None
    try:
        words = os.read(fd, 200).decode(errors="replace").split()
    finally:
        os.close(fd)
    if len(words) < 2 or not words[0].isdigit() or words[1] != platform.node():
        return None
    holder = {"pid": int(words[0]), "host": words[1]}
    return holder if driver_alive({"status": RUNNING, "driver": holder}) else None


class RunLock:
    """Held for a driver's whole run; a context manager that releases it and removes its file."""

    def __init__(self, lake: Lake, run_id: str) -> None:
        self.lake, self.run_id = lake, check_run_id(run_id, "run id")
        self.local = isinstance(lake.fs, pafs.LocalFileSystem)
        self.path = os.path.join(lake.root, LOCKS_DIR, f"run_id={run_id}.lock")
        self._fd: int | None = None
        self._created: str | None = None  # the outermost directory acquire() had to create

    def __enter__(self) -> RunLock:
        self.acquire()
        return self

    def __exit__(self, kind: type | None, exc: BaseException | None, tb: TracebackType | None) -> None:
        self.release()

    def acquire(self) -> None:
        if not self.local:
            status = self.lake.read_status(self.run_id)
            if driver_alive(status):
                self._refuse(RunStatus.read(status).driver)
            return
        self.lake.guard(self.path)
        self._created = self.lake.first_missing(os.path.dirname(self.path))
        os.makedirs(os.path.dirname(self.path), exist_ok=True)
        while True:
            try:
                fd = os.open(self.path, os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW, 0o644)
            except OSError as exc:
                if os.path.islink(self.path):  # planted between the guard and the open
                    self.lake.guard(self.path)
                raise KvorchError(f"cannot take the run's lock {self.path} ({exc.strerror or exc})") from None
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                holder = os.read(fd, 200).decode(errors="replace").split()
                os.close(fd)
                self._refuse({"pid": holder[0] if holder else "?", "host": holder[1] if len(holder) > 1 else "?"})
            # The holder before us may have unlinked the file between our open and our lock:
            # then we hold a lock on a name no one else sees, and must take the new file.
            if os.path.exists(self.path) and os.stat(self.path).st_ino == os.fstat(fd).st_ino:
                break
            os.close(fd)
        os.ftruncate(fd, 0)
        os.write(fd, f"{os.getpid()} {platform.node()}\n".encode())
        self._fd = fd

    def release(self) -> None:
        if self._fd is None:
            return
        os.unlink(self.path)  # while still locked: a waiter then re-opens a fresh file
        os.close(self._fd)
        self._fd = None
        if self._created is not None:  # only while empty: a lake the run wrote into stays
            self.lake.remove_empty_dirs(os.path.dirname(self.path), up_to=self._created)

    def _refuse(self, driver: dict) -> None:
        raise KvorchError(
            f"run {self.run_id} in lake {self.lake.uri} is being computed by another driver "
            f"(pid {driver.get('pid', '?')} on {driver.get('host', '?')}); wait for it to finish, stop it, "
            "or pass another --run-id"
        )
