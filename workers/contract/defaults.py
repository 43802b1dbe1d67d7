"""Names and defaults the driver's options need, as plain values, free of torch: ``kvorch --help``
and every command's ``--help`` read them without loading torch or transformers.

``BACKENDS`` (the kernels of --attn) and ``ALL_METHODS`` (what ``--methods all`` runs) are owned
here; workers/presses/ re-exports ``ALL_METHODS`` and checks each name is registered. The engine's
defaults need no copy: workers/contract/settings.py loads no torch.
"""

from __future__ import annotations

# Where compiled chunk steps are cached on disk (--compile-cache; workers/engine/compile_cache.py): one
# directory per machine, shared by every actor on it and by reruns and resumes. "~" is expanded
# on the machine that compiles, so one value serves every node of a cluster.
COMPILE_CACHE = "~/.cache/kvorch/compile"
# The attention kernels of --attn (workers/modeling/attention.py).
BACKENDS = ("eager", "sdpa", "flex")
# What `--methods all` means, in its order (of configs, rows and resume fingerprints): the one list.
# A new press joins it here; a press with required parameters (kvzap's path=) cannot.
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
# What `--methods leaderboard` means (issue 37): the methods the 2025-2026 leaderboards rank, native,
# next to the strongest of the original study and the two references, each at its defaults.
LEADERBOARD_METHODS = (
    "baseline",
    "streaming_llm",
    "knorm",
    "expected_attention",
    "snapkv",
    "tova",
    "keydiff",
    "lagkv",
    "leverage",
    "compactor",
    "chunkkv",
    "criticalkv",
)
# The names --methods expands to a list of methods: the one place each preset is defined.
METHOD_PRESETS = {"all": ALL_METHODS, "leaderboard": LEADERBOARD_METHODS}
