"""The engine package: settings (``settings``), the rows of a document run (``layout``), the
keep rules (``decisions``), the chunk step that implements the protocol (``step``) and the
engine that hooks a model and picks each batch's path (``core``).

Nothing is re-exported here, so the driver's ``from workers.contract.settings import ...`` loads
neither torch nor the engine.
"""
