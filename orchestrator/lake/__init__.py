"""The result lake: its layout and atomic, checksummed writes (store), what a run's parts can be
trusted for (integrity), the status.json record of incomplete configs, and DuckDB over it
(queries). The bottom floor of orchestrator/: imports only orchestrator.errors and workers.contract.schema.
"""
