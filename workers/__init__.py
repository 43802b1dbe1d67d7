"""Everything that runs inside a kvorch actor, in rooms from the bottom up:

- ``contract/``: what the driver and the actors share (plan, configs, settings, schema, ...);
- ``modeling/``: kvorch's attention interface and rotary embeddings inside a transformers model;
- ``presses/``: the compression methods and their registry;
- ``engine/``: the chunk step and everything only it uses;
- ``studies/``: per-head statistics and KVzap targets;
- ``actor.py`` (the Ray actor), ``faults.py`` (fault injection), ``progress.py`` (chunk progress).

Nothing here imports :mod:`orchestrator`. tests/test_layering.py holds the rooms' order and the
exact list of modules the driver may import.
"""
