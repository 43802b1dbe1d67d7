"""Fault events of a pool in kvorch's own words: a lost node or worker, a restart, a re-queued
task, a smaller pool.

Ray's own lines about a fault name internal ids, come from the raylet and vanish with
``--no-progress`` or ``log_to_driver=False``; a user needs to know what kvorch did about it. Each
event goes to three places: one ``kvorch:`` line on stderr (above the progress bar), the run's
``status.json`` (``events``, shown by ``kvorch status``), and the Ray dashboard as custom
metrics: ``kvorch_fault_events`` (a counter tagged ``kind``) and ``kvorch_pool_actors`` (a gauge:
actors that have loaded the model and take tasks), both tagged with the driver's namespace.
"""

from __future__ import annotations

import sys
import time

import ray
from ray.util import metrics
from tqdm import tqdm

NODE_LOST = "node_lost"
ACTOR_LOST = "actor_lost"
ACTOR_RESTARTED = "actor_restarted"
TASK_REQUEUED = "task_requeued"
POOL_SHRUNK = "pool_shrunk"
ACTOR_GIVEN_UP = "actor_given_up"
KINDS = (NODE_LOST, ACTOR_LOST, ACTOR_RESTARTED, TASK_REQUEUED, POOL_SHRUNK, ACTOR_GIVEN_UP)


class EventLog:
    """The pool's fault events, in order: ``{"time": unix seconds, "kind": one of KINDS, "detail": line}``."""

    def __init__(self) -> None:
        self.events: list[dict] = []
        self._metrics = _Metrics.create()

    def record(self, kind: str, detail: str) -> None:
        """Keep the event, print it, count it."""
        assert kind in KINDS, kind
        self.events.append({"time": round(time.time(), 3), "kind": kind, "detail": detail})
        tqdm.write(f"kvorch: {detail}", file=sys.stderr)
        if self._metrics:
            self._metrics.events.inc(tags={"kind": kind})

    def pool_size(self, working: int) -> None:
        """Actors that have loaded the model and take tasks, for the dashboard."""
        if self._metrics:
            self._metrics.actors.set(working)


def status_line(run_id: str, event: dict) -> str:
    """One event of a run's status.json, as ``kvorch status`` prints it."""
    when = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(event["time"]))
    attempt = f" (attempt {event['attempt']})" if "attempt" in event else ""
    return f"{run_id} {when}{attempt} {event['kind']}: {event['detail']}"


class _Metrics:
    """The driver's custom Ray metrics (exported like the actors' own, see workers/actor.py)."""

    def __init__(self, namespace: str) -> None:
        self.events = metrics.Counter(
            "kvorch_fault_events",
            f"kvorch's fault events, tagged kind: {', '.join(KINDS)}.",
            tag_keys=("namespace", "kind"),
        )
        self.actors = metrics.Gauge(
            "kvorch_pool_actors",
            "Actors of the pool that have loaded the model and take tasks.",
            tag_keys=("namespace",),
        )
        for metric in (self.events, self.actors):
            metric.set_default_tags({"namespace": namespace})

    @classmethod
    def create(cls) -> _Metrics | None:
        """None outside a Ray driver, or in a Ray Client driver (``ray://``), which has no
        metrics exporter of its own."""
        if not ray.is_initialized() or ray.util.client.ray.is_connected():
            return None
        return cls(ray.get_runtime_context().namespace)
