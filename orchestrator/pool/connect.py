"""Joining a Ray cluster at ``--address`` within a bounded time.

``ray.init(address=...)`` retries "Failed to connect to GCS" for as long as the process lives, so
an unreachable or mistyped address used to hang a submission. kvorch first opens a TCP
connection to the address (a refusal or silence is known in milliseconds, or after the
timeout), then lets ``ray.init`` run for what is left of the timeout; past it, the user gets one
line naming the address and what to check, and nothing has been written to the lake.
"""

from __future__ import annotations

import logging
import socket
import threading
import time

import ray

from orchestrator.errors import KvorchError, first_line
from orchestrator.pool import DEFAULT_CONNECT_TIMEOUT

__all__ = ["DEFAULT_CONNECT_TIMEOUT", "join_cluster"]
# Where a bare "host" points: the GCS of `ray start --head`, or Ray Client for ray:// addresses.
_DEFAULT_PORTS = {"ray": 10001, "": 6379}


def join_cluster(address: str, namespace: str, timeout: float) -> None:
    """``ray.init(address)`` that fails with a one-line KvorchError within ``timeout`` seconds."""
    if timeout <= 0:
        raise KvorchError(f"--connect-timeout must be > 0 seconds, got {timeout:g}")
    deadline = time.monotonic() + timeout
    endpoint = _endpoint(address)
    if endpoint is not None:
        _probe(address, *endpoint, timeout)
    outcome: dict[str, BaseException | None] = {}

    def connect() -> None:
        try:
            ray.init(address=address, namespace=namespace, log_to_driver=False)
            outcome["error"] = None
        except BaseException as exc:  # reported on the caller's thread below
            outcome["error"] = exc

    # A daemon thread: if Ray never answers, the process can still exit with the error. Off the
    # main thread Ray warns that it sets no SIGTERM handler: kvorch's job sets its own.
    quiet = _DropMessage("SIGTERM handler is not set")
    logging.getLogger("ray._private.worker").addFilter(quiet)
    thread = threading.Thread(target=connect, name="kvorch-ray-connect", daemon=True)
    thread.start()
    thread.join(max(0.0, deadline - time.monotonic()))
    logging.getLogger("ray._private.worker").removeFilter(quiet)
    if "error" not in outcome:
        raise KvorchError(
            f"--address {address}: no Ray cluster answered within {timeout:g} s; check that the address is the "
            "head node's GCS (HOST:6379) or Ray Client (ray://HOST:10001) and that its Ray version matches "
            f"this one ({ray.__version__}), or raise --connect-timeout"
        )
    error = outcome["error"]
    if error is not None:
        raise KvorchError(f"--address {address}: cannot join the Ray cluster: {first_line(error)}") from None


class _DropMessage(logging.Filter):
    def __init__(self, text: str) -> None:
        super().__init__()
        self.text = text

    def filter(self, record: logging.LogRecord) -> bool:
        return self.text not in record.getMessage()


def _endpoint(address: str) -> tuple[str, int] | None:
    """(host, port) to probe, or None for addresses Ray resolves itself ("auto", "local")."""
    scheme, _, rest = address.rpartition("://")
    if address in ("auto", "local") or not rest:
        return None
    host, _, port = rest.rpartition(":") if ":" in rest else (rest, "", "")
    host = host.strip("[]") or rest
    try:
        return host, int(port) if port else _DEFAULT_PORTS.get(scheme, 6379)
    except ValueError:
        raise KvorchError(f"--address {address}: {port!r} is not a port; use HOST:PORT or ray://HOST:PORT") from None


def _probe(address: str, host: str, port: int, timeout: float) -> None:
    try:
        with socket.create_connection((host, port), timeout=timeout):
            return
    except ConnectionRefusedError:
        why = "connection refused (nothing listens there)"
    except TimeoutError:
        why = f"no answer within {timeout:g} s"
    except socket.gaierror as exc:
        why = f"unknown host {host!r} ({exc.strerror})"
    except OSError as exc:
        why = exc.strerror or str(exc)
    raise KvorchError(
        f"--address {address}: cannot reach the Ray cluster: {why}; check that `ray start --head` runs there, "
        "the host and port (GCS 6379, Ray Client 10001), and the firewall, or drop --address to run on an "
        "embedded local Ray"
    )
