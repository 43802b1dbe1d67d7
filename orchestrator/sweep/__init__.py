"""`kvorch submit`: the job spec and its defaults, what a run's spec.json records (spec_record),
planning, batching, calibration, resume, the run's lifecycle (claim, heartbeat, endings,
attempts) and the submission itself. Imports pool/ and
lake/; nothing imports sweep/ but heads/ (the spec) and the CLI.
"""
