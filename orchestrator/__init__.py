"""The kvorch driver: CLI, job spec, corpus, planning, the Ray pool, the lake and reports."""
