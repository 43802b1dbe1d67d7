"""Everything that runs inside a kvorch actor: model loading, the chunked engine, presses.

Nothing here imports :mod:`orchestrator`; the driver imports these modules, never the reverse.
"""
