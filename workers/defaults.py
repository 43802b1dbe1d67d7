"""Names and defaults the driver's options need, as plain values, free of torch: ``kvorch --help``
and every command's ``--help`` read them without loading torch or transformers.

``BACKENDS`` lives here (workers/attention.py imports it). The others mirror what their owner
defines, since the owner imports torch:
``tests/test_fast_help.py`` holds each equal to it.
"""

from __future__ import annotations

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
# workers.engine.EngineSettings' defaults.
CHUNK_SIZE = 128
WINDOW = 128
COMPACT = False
AGREEMENT = True
