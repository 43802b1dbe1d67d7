"""The result lake: its layout and atomic, checksummed writes (store), what a run's parts can be
trusted for (integrity), a run's status.json (run_status) and its record of incomplete configs
(incomplete), and DuckDB over it (queries). The bottom floor of orchestrator/: imports only
orchestrator.errors and workers.contract (the row schema; the plan's ConfigFailure, for annotations).
"""
