"""The on-disk cache of compiled chunk steps: compile once per machine, not once per actor.

torch.compile keeps what inductor built (generated kernels, FX graphs, AOTAutograd graphs;
triton's binaries on CUDA) in the directory ``TORCHINDUCTOR_CACHE_DIR`` names, read each time a
graph is compiled. Pointing every actor of a node at one directory that outlives the process
(``--compile-cache``, default workers/contract/defaults.py ``COMPILE_CACHE``) means the first actor on a
machine compiles and every later actor, rerun and resume on it loads: a warm start does not run
inductor again. Dynamo still traces the step in every process (seconds); inductor's code
generation and the C++/triton compiles, the minutes, are what the cache saves.
"""

from __future__ import annotations

import os
from pathlib import Path


def use_compile_cache(directory: str | None) -> Path | None:
    """Make this process's torch.compile read and write its caches under ``directory`` (created
    if missing; ``~`` expanded here, on the machine that compiles). ``None`` leaves torch's own
    default (a per-user directory under the system's temporary directory)."""
    if directory is None:
        return None
    path = Path(directory).expanduser()
    path.mkdir(parents=True, exist_ok=True)
    os.environ["TORCHINDUCTOR_CACHE_DIR"] = str(path)
    os.environ.setdefault("TRITON_CACHE_DIR", str(path / "triton"))
    import torch._functorch.config
    import torch._inductor.config

    # On by default in recent torch; said here because the cache is the point of this module.
    torch._inductor.config.fx_graph_cache = True
    torch._functorch.config.enable_autograd_cache = True
    return path
