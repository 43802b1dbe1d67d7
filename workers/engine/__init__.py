"""The engine package: the chunk step that implements the protocol, one file per job (``step``
drives a document's chunks, ``compiling`` compiles it, ``document_state`` holds what a chunk
reads and writes, ``layer_work`` and ``scoring`` are one layer's work and each press group's
decisions in it), the KV cache (``cache``, sized by ``capacity``), the rows of a document run
(``layout``), the keep rules (``decisions``), generation (``generation``) and the engine that
hooks a model and picks each batch's path (``core``).

Nothing is re-exported here; the driver imports none of it (tests/test_layering.py).
"""
