"""Names and defaults the driver's options need, as plain values, free of torch: ``kvorch --help``
and every command's ``--help`` read them without loading torch or transformers.

``BACKENDS`` lives here (workers/attention.py imports it). ``ALL_METHODS`` mirrors the press
registry, which imports torch; ``tests/test_fast_help.py`` holds it equal. The engine's defaults
need no copy: workers/engine/settings.py loads no torch.
"""

from __future__ import annotations

# Where compiled chunk steps are cached on disk (--compile-cache; workers/compile_cache.py): one
# directory per machine, shared by every actor on it and by reruns and resumes. "~" is expanded
# on the machine that compiles, so one value serves every node of a cluster.
COMPILE_CACHE = "~/.cache/kvorch/compile"
# The attention kernels of --attn (workers/attention.py).
BACKENDS = ("eager", "sdpa", "flex")
# What `--methods all` means: workers.presses.ALL_METHODS (the presses with ``in_all``).
ALL_METHODS = (
    "baseline",
    "window",
    "streaming_llm",
    "random",
    "knorm",
    "expected_attention",
    "observed_attention",
    "h2o",
    "snapkv",
    "tova",
)
