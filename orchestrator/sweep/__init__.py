"""`kvorch submit`: the job spec and its defaults, planning, batching, calibration, resume,
the run's lifecycle (claim, heartbeat, endings) and the submission itself. Imports pool/ and
lake/; nothing imports sweep/ but heads/ (the spec) and the CLI.
"""
