"""Checks, in the driver before any task starts, that what the job asks of torch can run here.

``--compile on`` must fail before an actor is started, not in the middle of one; ``--compile
auto`` falls back to eager with a note instead. And presses that cannot be traced are named once,
since their batches run the chunk step uncompiled.
"""

from __future__ import annotations

import dataclasses
import sys

import torch

from orchestrator.errors import KvorchError
from workers.contract.configs import EvalConfig
from workers.contract.errors import error_line
from workers.contract.settings import EngineSettings


def compiler_problem(device: str) -> str | None:
    """Why torch.compile (inductor) cannot compile on ``device`` in this process, or None: a tiny
    function is compiled and run, which needs what a real step needs (a C++ compiler on CPU,
    triton on CUDA)."""
    if device == "cuda" and not torch.cuda.is_available():
        device = "cpu"  # a driver without the workers' GPU still checks its toolchain
    torch._dynamo.reset()
    try:
        probe = torch.compile(lambda x: torch.relu(x) * 2 + 1, backend="inductor", fullgraph=True)
        probe(torch.ones(8, device=device))
    except Exception as exc:  # noqa: BLE001 - any failure to compile is the answer
        return error_line(exc)[:200]
    finally:
        torch._dynamo.reset()
    return None


def resolve_compile(settings: EngineSettings, requested: str, device: str) -> EngineSettings:
    """The engine settings with compile confirmed: an impossible ``--compile on`` is a KvorchError,
    an impossible ``auto`` runs eager with a note."""
    if not settings.compile:
        return settings
    problem = compiler_problem(device)
    if problem is None:
        return settings
    if requested == "on":
        raise KvorchError(
            f"--compile on: torch.compile cannot compile on this machine ({problem}); "
            "install a C++ compiler (CPU) or triton (CUDA), or pass --compile off"
        )
    print(f"kvorch: --compile auto: compiling is not possible here ({problem}); running eager", file=sys.stderr)
    return dataclasses.replace(settings, compile=False)


def eager_note(settings: EngineSettings, configs: list[EvalConfig], answering: bool = False) -> str | None:
    """One line naming what keeps batches off the compiled chunk step: presses that cannot be
    traced, or a question task (``answering``), whose prompt and answer run at exact shapes."""
    if answering and settings.compile:
        return "question tasks run uncompiled (the prompt and each generated token at exact shapes): --compile unused"
    eager = sorted({c.press.label() for c in configs if not c.press.traceable})
    if not eager:
        return None
    return (
        f"{', '.join(eager)} cannot be traced by torch.compile: batches with it run the chunk step uncompiled"
    )
