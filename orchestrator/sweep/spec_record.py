"""A run's spec.json: everything it records, built here and nowhere else.

spec.json says what a run is and how it was planned, so that a resume plans the same tasks and
a reader knows what the rows measure. It holds:

- :func:`identity`: the job spec's choices (``JobSpec.to_json``, orchestrator/sweep/spec.py)
  and ``tokenization``, what the run's fingerprint hashes (``resume.spec_hash``) and what a
  resume compares;
- ``spec_hash``: that fingerprint;
- what the submission settled on its pool (:class:`Resolved`), which a resume reads back;
- ``tasks`` (task id -> its methods: the plan, which ``integrity`` checks the parts against) and
  ``calibration`` (``--densities``);
- for the record: ``schema_version``, ``versions`` and ``hardware``.

``Lake.write_spec`` adds ``run_id``, ``created_at`` and ``part_checksums``.
"""

from __future__ import annotations

import platform
from dataclasses import dataclass
from importlib import metadata

import ray

from orchestrator.pool.actors import PoolPlan
from orchestrator.sweep.spec import JobSpec
from workers.contract.plan import Task
from workers.contract.schema import SCHEMA_VERSION


def identity(spec: JobSpec, tokenization: dict) -> dict:
    """What the run is: its spec's choices and how its token ids were made (a resume under
    another tokenization would mix rows of two tokenizations in one run)."""
    return {**spec.to_json(), "tokenization": tokenization}


@dataclass(frozen=True)
class Resolved:
    """What a submission settles on its pool that the spec may leave open. A resume takes its
    first attempt's shards and batch size, so it plans the same task ids, and its dtype."""

    dtype: str
    compile: bool
    batch_configs: int
    n_shards: int

    def to_json(self) -> dict:
        return {
            "dtype_resolved": self.dtype,
            "compile_resolved": self.compile,
            "batch_configs_resolved": self.batch_configs,
            "n_shards": self.n_shards,
        }

    @classmethod
    def recorded(cls, stored: dict) -> Resolved:
        """What a run's first attempt settled, from its spec.json."""
        return cls(
            dtype=stored.get("dtype_resolved"),
            compile=stored.get("compile_resolved"),
            batch_configs=stored["batch_configs_resolved"],
            n_shards=stored["n_shards"],
        )


@dataclass(frozen=True)
class SpecRecord:
    """spec.json's content (less what ``Lake.write_spec`` adds)."""

    spec: JobSpec  # as the tasks run it: with --densities, the calibrated thresholds
    tokenization: dict
    spec_hash: str  # the fingerprint, of the spec as submitted (before calibration)
    resolved: Resolved
    tasks: list[Task]
    calibration: dict | None  # calibration.to_json; None without --densities
    pool: PoolPlan

    def to_json(self) -> dict:
        return {
            **identity(self.spec, self.tokenization),
            "spec_hash": self.spec_hash,
            **self.resolved.to_json(),
            "schema_version": SCHEMA_VERSION,
            "versions": versions(),
            "hardware": hardware(self.pool),
            "tasks": {t.task_id: sorted({c.method for c in t.configs}) for t in self.tasks},
            "calibration": self.calibration,
        }


def versions() -> dict:
    """The versions of Python and of the packages that decide a run's numbers and files."""
    names = ("kvorch", "torch", "transformers", "ray", "pyarrow", "duckdb")
    out = {"python": platform.python_version()}
    for name in names:
        try:
            out[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            out[name] = None
    return out


def hardware(pool: PoolPlan) -> dict:
    """The cluster the run started on, and the pool it asked Ray for."""
    resources = ray.cluster_resources()
    return {
        "platform": platform.platform(),
        "cluster_cpus": resources.get("CPU"),
        "cluster_gpus": resources.get("GPU", 0),
        "actors": pool.n_actors,
        "device": pool.device,
        "cpus_per_actor": pool.num_cpus,
        "gpus_per_actor": pool.num_gpus,
    }
