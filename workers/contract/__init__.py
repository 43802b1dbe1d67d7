"""What the driver and the actors share: the plan they exchange, the configs and settings it
carries, the lake's schema, tokenization, model resolution, memory estimates, defaults and error
lines. The driver (orchestrator/) may import these freely; they import nothing else of workers/
but each other, so the driver never loads the engine by accident.
"""
