"""``--batch-configs auto`` on the driver: configs per forward from the pool's free memory.

The count is fixed once per run, before planning, because it shapes the task ids: a resume
reuses the recorded count (spec.json ``batch_configs_resolved``) instead of measuring again.
"""

from __future__ import annotations

import ray
from ray.exceptions import GetTimeoutError

from orchestrator.errors import KvorchError
from orchestrator.pool.actors import PoolPlan
from orchestrator.sweep.spec import JobSpec
from workers.contract import memory
from workers.contract.models import DTYPES
from workers.contract.settings import EngineSettings


def resolve(
    spec: JobSpec, pool: PoolPlan, dtype: str, engine: EngineSettings, longest: int, wait_s: float
) -> int:
    """``spec.batch_configs`` as a number: as given, or what one worker's free memory holds for
    the run's ``longest`` document (a corpus document or a probe) on the path ``engine`` runs.
    The probe needs a node of the pool's kind; Ray has ``wait_s`` (``--actor-timeout``) to place
    it, as it has for an actor, so a pool no node can host (``--device cuda`` without a free
    GPU) stops in one line instead of waiting forever."""
    if spec.batch_configs != "auto":
        return spec.batch_configs
    try:
        per_config = memory.config_bytes(
            memory.model_config(spec.model),
            longest,
            engine.chunk_size,
            DTYPES[dtype].itemsize,
            static=engine.static_shapes,
        )
    except ValueError as exc:  # memory.model_config and memory.config_bytes raise only this
        reason = " ".join(str(exc).split())
        raise KvorchError(
            f"--batch-configs auto cannot size the batch for model {spec.model} ({reason}); "
            "pass --batch-configs N, the configs per forward, e.g. 4"
        ) from None
    # Measured where the workers will run: on a node of the pool's kind, before any actor starts.
    probe = ray.remote(memory.available_bytes).options(num_cpus=0, num_gpus=min(1.0, pool.num_gpus))
    pending = probe.remote(pool.device)
    try:
        free = ray.get(pending, timeout=wait_s)
    except GetTimeoutError:
        ray.cancel(pending, force=True)
        kind = "a free GPU" if pool.device == "cuda" else f"{pool.num_cpus} free CPU(s)"
        raise KvorchError(
            f"--batch-configs auto: no node with {kind} took the memory probe within --actor-timeout {wait_s:g} s; "
            "free a device, pass --device cpu, or pass --batch-configs N (e.g. 4)"
        ) from None
    # Actors packed onto one GPU split it; CPU actors may share one node's memory.
    share = min(1.0, pool.num_gpus) if pool.device == "cuda" else 1.0 / pool.n_actors
    return memory.configs_per_forward(per_config, int(free * share))
