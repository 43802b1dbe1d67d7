"""Cluster-facing options without a cluster: pool sizing, the detached entrypoint, Jobs addresses."""

from __future__ import annotations

import shlex
from pathlib import Path

import pytest
import ray
import yaml
from ray.autoscaler._private.util import prepare_config, validate_config

from orchestrator.cli.submit import command
from orchestrator.errors import KvorchError
from orchestrator.pool import actors, ray_jobs


def fake_cluster(monkeypatch, gpus: float, node_cpus: list[int]) -> None:
    total = {"CPU": float(sum(node_cpus)), **({"GPU": gpus} if gpus else {})}
    monkeypatch.setattr(ray, "cluster_resources", lambda: total)
    monkeypatch.setattr(ray, "nodes", lambda: [{"Alive": True, "Resources": {"CPU": c}} for c in node_cpus])


def test_pool_sizes_gpu_fractions_and_cpu_nodes(monkeypatch):
    fake_cluster(monkeypatch, gpus=2, node_cpus=[8, 8])
    assert actors.plan_pool(None, "auto") == actors.PoolPlan(2, num_gpus=1.0, num_cpus=1, device="cuda")
    assert actors.plan_pool(None, "auto", gpus_per_actor=0.5) == actors.PoolPlan(4, 0.5, 1, "cuda")
    assert actors.plan_pool(3, "auto", gpus_per_actor=0.25) == actors.PoolPlan(3, 0.25, 1, "cuda")
    assert actors.plan_pool(3, "auto") == actors.PoolPlan(3, num_gpus=2 / 3, num_cpus=1, device="cuda")
    assert actors.plan_pool(2, "cpu") == actors.PoolPlan(2, num_gpus=0, num_cpus=8, device="cpu")
    fake_cluster(monkeypatch, gpus=0, node_cpus=[8])
    # --device cuda on a cluster scaled to zero GPU nodes: whole GPUs, so the autoscaler adds nodes.
    assert actors.plan_pool(2, "cuda") == actors.PoolPlan(2, num_gpus=1.0, num_cpus=1, device="cuda")
    fake_cluster(monkeypatch, gpus=0, node_cpus=[1, 1])
    # One actor may not ask for more cores than one node has, or Ray could never place it.
    assert actors.plan_pool(None, "auto") == actors.PoolPlan(1, num_gpus=0, num_cpus=1, device="cpu")
    assert actors.plan_pool(2, "cpu") == actors.PoolPlan(2, num_gpus=0, num_cpus=1, device="cpu")


def test_more_cpu_actors_than_cores_is_one_line_before_any_actor_starts(monkeypatch):
    """Issue 38, 18: --actors 2000 on 2 CPUs was announced as 2000 actors and placed 2."""
    fake_cluster(monkeypatch, gpus=0, node_cpus=[1, 1])
    with pytest.raises(KvorchError, match=r"^--actors 2000 asks for 2000 CPU actors, but the cluster has 2 CPU\(s\)"):
        actors.plan_pool(2000, "cpu", fixed_cluster=True)
    with pytest.raises(KvorchError, match="pass --actors 2 or fewer"):
        actors.plan_pool(3, "auto", fixed_cluster=True)
    # A cluster may get nodes: the pool starts on the actors that fit, and the line says how many.
    plan = actors.plan_pool(2000, "cpu")
    assert actors.fitting(plan) == " (2 fit the cluster now; the others start if nodes join within --actor-timeout)"
    assert actors.fitting(actors.plan_pool(2, "cpu")) == ""


def test_detached_entrypoint_repeats_the_users_options():
    ctx = command.make_context(
        "submit", ["--methods", "baseline,h2o", "--methods", "knorm", "--actors", "2", "--no-progress", "--detach"]
    )
    args = shlex.split(ray_jobs.entrypoint(ctx, "s3://bucket/lake", "r1"))
    assert args == [
        "kvorch",
        "submit",
        "--methods",
        "baseline,h2o",
        "--methods",
        "knorm",
        "--actors",
        "2",
        "--lake",
        "s3://bucket/lake",
        "--address",
        "auto",
        "--run-id",
        "r1",
        "--no-progress",
    ]


@pytest.mark.parametrize(
    "address, expected",
    [
        (None, None),
        ("auto", None),
        ("ray://head:10001", "http://head:8265"),
        ("head:6379", "http://head:8265"),
        ("http://head:8265", "http://head:8265"),
    ],
)
def test_jobs_api_address(address, expected):
    assert ray_jobs.jobs_address(address) == expected


def test_cluster_yaml_passes_the_cluster_launchers_own_validation():
    config = prepare_config(yaml.safe_load((Path(__file__).parents[1] / "cluster.yaml").read_text()))
    validate_config(config)  # what `ray up` runs first
    assert config["available_node_types"]["head"]["resources"] == {"CPU": 0}
    assert config["available_node_types"]["gpu_worker"]["resources"]["GPU"] == 1
    assert f"ray[default]=={ray.__version__}" in " ".join(config["setup_commands"])
